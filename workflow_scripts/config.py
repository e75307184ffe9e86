"""Checks of the workflow config that a JSON schema cannot state clearly.

The schema (``config/schema.yaml``) rejects unknown keys and wrong types and
fills defaults; these checks cover relations between keys, each with a
message that names the model and the key.
"""
import re

from .common import InputError

SOURCE_KINDS = ("hub", "local", "demo")
SOURCE_KEYS_BY_KIND = {
    "hub": {"hub", "revision", "allow_pickle"},
    "local": {"local", "allow_pickle"},
    "demo": {"demo", "seed", "shape"},
}


def rule_name(model):
    """The per-model target rule: the model id with every character outside [A-Za-z0-9_] made ``_``."""
    name = re.sub(r"\W", "_", model)
    return f"model_{name}" if name[0].isdigit() else name


def source_kind(model, source):
    kinds = [kind for kind in SOURCE_KINDS if kind in source]
    if len(kinds) != 1:
        raise InputError(f"config: models.{model}.source must have exactly one of {', '.join(SOURCE_KINDS)}; "
                         f"found {', '.join(kinds) or 'none'}")
    kind = kinds[0]
    stray = set(source) - SOURCE_KEYS_BY_KIND[kind]
    if stray:
        raise InputError(f"config: models.{model}.source.{sorted(stray)[0]} does not apply to a {kind} source")
    if kind == "hub" and "revision" not in source:
        raise InputError(f"config: models.{model}.source.revision is required for a hub source "
                         "(pin a commit hash for reproducible builds)")
    return kind


def check_config(config):
    """Raise :class:`InputError` on the first relation between keys that does not hold."""
    models = config["models"]
    for model, settings in models.items():
        source_kind(model, settings["source"])
    for index, target in enumerate(config["targets"]):
        if target not in models:
            raise InputError(f"config: targets[{index}] names model {target!r}, which is not under models "
                             f"(known: {', '.join(sorted(models))})")
    seen = {}
    for model in models:
        name = rule_name(model)
        if name in seen:
            raise InputError(f"config: models {seen[name]!r} and {model!r} both map to target rule {name!r}; "
                             "rename one of them")
        seen[name] = model
