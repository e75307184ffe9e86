"""The serving benchmark's plan: which cases a sweep runs, after the sweep VastAI runs on its VACC servers.

The vendor sends prompts of 510, 1020 and 2040 tokens, asks for 512, 1024 and 2048 output tokens, at 1, 4,
8 and 16 requests in flight, and skips the cases longer than the compiled lengths. Here the same lengths are
fractions of ``reference_length`` (2048), scaled to the endpoint's own limits: a VACC build's prompt length
and output budget, or, for a compiled package whose prompt and answer share one context, half the context
each (the vendor's 1024 in and 1024 out of 2048: :meth:`Limits.scale_bases`), so any endpoint runs the
same shape of sweep; ``reference_length: null`` takes them as absolute token counts (an external server
whose limits are unknown).

The Snakefile imports this module to size the benchmark's jobs: it imports no torch, transformers or openai.
The settings' defaults and bounds are those of ``config/schema.yaml`` (``models.<id>.bench``), read from the
checkout this package runs from.
"""

import dataclasses
import functools
import math
from pathlib import Path

import jsonschema
import yaml

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.settings import Settings

SCHEMA = Path(__file__).resolve().parents[2] / "config" / "schema.yaml"


@functools.cache
def bench_schema():
    """The schema of ``models.<id>.bench``, with the draft of the whole schema."""
    if not SCHEMA.is_file():
        raise InputError(
            f"{SCHEMA} does not exist: the benchmark's defaults and bounds are the workflow schema's; run it from a "
            "checkout of the workflow (PYTHONPATH=the checkout), not from an installed copy of workflow_scripts"
        )
    schema = yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))
    return {"$schema": schema["$schema"], **schema["$defs"]["model"]["properties"]["bench"]}


def check_bounds(values, where):
    """Refuse ``values`` where the bench schema does, naming every key it refuses."""
    schema = bench_schema()
    errors = jsonschema.validators.validator_for(schema)(schema).iter_errors(values)
    refused = sorted(f"{where}{key_path(error.absolute_path)}: {error.message}" for error in errors)
    if refused:
        raise InputError("; ".join(refused))


def key_path(parts):
    """``.concurrency[0]`` for the path ``concurrency, 0``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


@dataclasses.dataclass(frozen=True)
class BenchSettings(Settings):
    """The sweep: every input length with every output length at every concurrency. The keys are those of
    ``models.<id>.bench`` but the rule's own (``variants``, ``vastgenx_batch_size``); a rule hands them all,
    validated; :meth:`with_defaults` takes the schema's defaults where no config gives them."""

    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    concurrency: tuple[int, ...]
    # the lengths above are fractions of this, scaled to the endpoint's limits; None: absolute token counts
    reference_length: int | None
    # requests per case; a case sends at least as many as its concurrency, so that all are in flight once
    requests: int
    timeout_s: float
    seed: int
    # short requests before the sweep, not recorded: the first request of a fresh server pays for its lazy
    # set-up (loading, graph capture), which would otherwise land in the first case's time to first token
    warmup_requests: int

    @classmethod
    def of(cls, values, where="bench"):
        """``values`` within the schema's bounds: a rule hands them validated, a stage run by hand may not."""
        check_bounds(values, where)
        return super().of(values, where)

    @classmethod
    def with_defaults(cls, given, where="bench"):
        """``given`` (a mapping of some of the keys) over the schema's defaults: where no config gives them."""
        properties = bench_schema()["properties"]
        defaults = {field.name: properties[field.name]["default"] for field in dataclasses.fields(cls)}
        return cls.of(defaults | given, where)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the endpoint serves at most; None where unknown (an external server). ``context_tokens``: prompt and
    output together, where they share one context (a compiled package) rather than having lengths of their own."""

    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    context_tokens: int | None = None

    @classmethod
    def of_context(cls, context):
        """A compiled package's: any prompt that leaves room for one new token, any output the prompt leaves room
        for."""
        return cls(context - 1, context - 1, context)

    def record(self):
        return dataclasses.asdict(self)

    def scale_bases(self):
        """The prompt and output lengths the sweep's fractions are of: the limits, or for a shared context the
        vendor's split of it (1024 in, 1024 out of 2048) within the limits."""
        if self.context_tokens is None:
            return self.max_prompt_tokens, self.max_output_tokens
        half = self.context_tokens // 2
        return min(self.max_prompt_tokens, half), min(self.max_output_tokens, self.context_tokens - half)


@dataclasses.dataclass(frozen=True)
class Case:
    input_tokens: int
    output_tokens: int
    concurrency: int

    def requests(self, settings):
        return max(settings.requests, self.concurrency)


def scaled(length, compiled, reference_length):
    return max(1, math.floor(length * compiled / reference_length))


def scaled_lengths(settings, limits):
    """The input and output lengths in tokens, each list in the settings' order."""
    if settings.reference_length is None:
        return list(settings.inputs), list(settings.outputs)
    unknown = [key for key in ("max_prompt_tokens", "max_output_tokens") if getattr(limits, key) is None]
    if unknown:
        raise InputError(
            f"bench.reference_length = {settings.reference_length} scales the lengths to the compiled ones, but "
            f"the endpoint's {' and '.join(unknown)} {'are' if len(unknown) > 1 else 'is'} not known: give "
            "the limits (--max-prompt-tokens, --max-output-tokens), or set reference_length to null "
            "(--reference-length none) for absolute lengths"
        )
    prompt_base, output_base = limits.scale_bases()
    return (
        [scaled(length, prompt_base, settings.reference_length) for length in settings.inputs],
        [scaled(length, output_base, settings.reference_length) for length in settings.outputs],
    )


def too_long(case, limits):
    """Why the endpoint cannot serve ``case``, or None."""
    reasons = []
    if limits.max_prompt_tokens is not None and case.input_tokens > limits.max_prompt_tokens:
        reasons.append(f"input {case.input_tokens} tokens > compiled prompt length {limits.max_prompt_tokens}")
    if limits.max_output_tokens is not None and case.output_tokens > limits.max_output_tokens:
        reasons.append(f"output {case.output_tokens} tokens > compiled output budget {limits.max_output_tokens}")
    if limits.context_tokens is not None and case.input_tokens + case.output_tokens > limits.context_tokens:
        reasons.append(
            f"input and output {case.input_tokens + case.output_tokens} tokens > context {limits.context_tokens}"
        )
    return "; ".join(reasons) or None


def plan_cases(settings, limits):
    """``(cases, skipped)``: the distinct cases to run, in sweep order, and those longer than ``limits`` allow
    (dicts with the case's lengths, its concurrency and the ``reason``), as the vendor skips them."""
    inputs, outputs = scaled_lengths(settings, limits)
    cases, skipped, seen = [], [], set()
    for input_tokens in inputs:
        for output_tokens in outputs:
            for concurrency in settings.concurrency:
                case = Case(input_tokens, output_tokens, concurrency)
                # small limits can scale two of the vendor's lengths to one count
                if case in seen:
                    continue
                seen.add(case)
                reason = too_long(case, limits)
                if reason is None:
                    cases.append(case)
                else:
                    skipped.append({**dataclasses.asdict(case), "reason": reason})
    return cases, skipped
