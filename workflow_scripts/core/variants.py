"""The variants of a model, by name: what each runs from and how it runs.

A variant is ``float`` (the patched checkpoint) or a quantize scheme (``rtn-int8``, ``gptq-int8``), run eagerly;
``aoti-<eager>``, that checkpoint compiled by AOTInductor; or ``vacc-<dtype>``, a vamc build (``fp16``, ``int8``).
Every rule, check and stage that branches on a variant parses its name here, so a new scheme or kind is added
in one place.
"""

import re
from dataclasses import dataclass

from workflow_scripts.core.errors import InputError

SCHEMES = ("rtn-int8", "gptq-int8")
EAGER = ("float", *SCHEMES)
VAMC_DTYPES = ("fp16", "int8")
# each kind: the prefix of its names and the bases it is built from
PREFIXES = {"eager": "", "aoti": "aoti-", "vacc": "vacc-"}
BASES = {"eager": EAGER, "aoti": EAGER, "vacc": VAMC_DTYPES}
KINDS = tuple(PREFIXES)


@dataclass(frozen=True)
class Variant:
    """A parsed variant name: its kind (eager, aoti, vacc) and the checkpoint or dtype it is built from."""

    kind: str
    base: str

    @property
    def name(self):
        return PREFIXES[self.kind] + self.base

    @property
    def compiled(self):
        return self.kind != "eager"

    def folder(self, model):
        """The folder whose MANIFEST.json this variant runs from, relative to the workflow's root."""
        if self.kind == "aoti":
            return f"results/{model}/aoti/{self.base}"
        if self.kind == "vacc":
            return f"results/{model}/vacc/{self.base}"
        return f"results/{model}/patched" if self.base == "float" else f"results/{model}/quantized/{self.base}"

    def manifest(self, model):
        return f"{self.folder(model)}/MANIFEST.json"


def parse(name):
    """The :class:`Variant` of ``name``; an :class:`InputError` names what is accepted."""
    for kind, prefix in PREFIXES.items():
        if name.startswith(prefix) and name[len(prefix) :] in BASES[kind]:
            return Variant(kind, name[len(prefix) :])
    raise InputError(f"{name!r} is no variant: one of {', '.join(all_names())}")


def all_names(kinds=KINDS):
    """Every variant name of these kinds, eager first."""
    return [Variant(kind, base).name for kind in kinds for base in BASES[kind]]


def pattern(kinds=KINDS):
    """A regular expression matching exactly the variant names of these kinds (wildcard constraints)."""
    return "|".join(re.escape(name) for name in all_names(kinds))


def model_variants(settings, kinds=("eager", "aoti")):
    """A model's variants of these kinds, from its settings: float and its quantize schemes, their compiled
    packages (aoti.variants), its VACC builds."""
    built = {
        "eager": ["float", *settings["quantize"]["schemes"]],
        "aoti": [Variant("aoti", base).name for base in settings["aoti"]["variants"]],
        "vacc": [Variant("vacc", dtype).name for dtype in VAMC_DTYPES],
    }
    return [name for kind in kinds for name in built[kind]]
