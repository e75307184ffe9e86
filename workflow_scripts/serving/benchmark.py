"""A serving benchmark of an OpenAI-compatible endpoint, after the sweep VastAI runs on its VACC servers.

The vendor sends prompts of 510, 1020 and 2040 tokens, asks for 512, 1024 and 2048 output tokens, at 1, 4,
8 and 16 requests in flight, and skips the cases longer than the compiled lengths. Here the same lengths are
fractions of ``reference_length`` (2048) and are scaled to the variant's own compiled prompt length and
output budget, so a small compiled variant runs the same shape of sweep; ``reference_length: null`` takes
them as absolute token counts (an external server whose limits are unknown).

Each request streams a completion of exactly the asked number of tokens (``ignore_eos``) for a prompt of
exactly the asked number of tokens, made of real words and different for every request, so that no prefix
cache serves it for free. The record holds, per case, the time to the first token, the time per further
output token, the latency, and the output tokens and requests per second over the case's wall time.

Usage: python -m workflow_scripts.serving.benchmark --url URL --model NAME --tokenizer FOLDER --output PATH
           [--variant LABEL] [--max-prompt-tokens N] [--max-output-tokens N] [--inputs N [N ...]]
           [--outputs N [N ...]] [--concurrency N [N ...]] [--requests N] [--reference-length N|none]
           [--timeout-s S] [--seed N] [--api-key KEY]
"""

import argparse
import asyncio
import dataclasses
import logging
import math
import os
import random
import re
import time
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json
from workflow_scripts.core.settings import Settings
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, read_tokenizer

LOG = logging.getLogger(__name__)

# The distinct error messages a case keeps: enough to tell apart a timeout from a refusal, not a log.
KEPT_ERRORS = 5
ERROR_CHARS = 300
# Fewer distinct words than this and the prompts would repeat each other too much to defeat a prefix cache.
MIN_WORDS = 100
WORD = re.compile(r" [A-Za-z]{2,}")
WARMUP_OUTPUT_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class BenchSettings(Settings):
    """The sweep: every input length with every output length at every concurrency."""

    inputs: tuple[int, ...] = (510, 1020, 2040)
    outputs: tuple[int, ...] = (512, 1024, 2048)
    concurrency: tuple[int, ...] = (1, 4, 8, 16)
    # the lengths above are fractions of this, scaled to the compiled lengths; null: absolute token counts
    reference_length: int | None = 2048
    # requests per case; a case sends at least as many as its concurrency, so that all are in flight once
    requests: int = 8
    timeout_s: float = 600.0
    seed: int = 0
    # short requests before the sweep, not recorded: the first request of a fresh server pays for its lazy
    # set-up (loading, graph capture), which would otherwise land in the first case's time to first token
    warmup_requests: int = 1


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the endpoint serves at most; None where unknown (an external server)."""

    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None

    def record(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Case:
    input_tokens: int
    output_tokens: int
    concurrency: int

    def requests(self, settings):
        return max(settings.requests, self.concurrency)


def check_settings(settings, where="bench"):
    for key in ("inputs", "outputs", "concurrency"):
        values = getattr(settings, key)
        if not values or not all(isinstance(value, int) and value >= 1 for value in values):
            raise InputError(f"{where}.{key}: expected a non-empty list of positive integers, got {list(values)}")
    for key in ("requests", "warmup_requests"):
        value = getattr(settings, key)
        if not isinstance(value, int) or value < (1 if key == "requests" else 0):
            raise InputError(f"{where}.{key}: expected a {'positive' if key == 'requests' else 'non-negative'} integer")
    if settings.reference_length is not None and not (
        isinstance(settings.reference_length, int) and settings.reference_length >= 1
    ):
        raise InputError(f"{where}.reference_length: expected a positive integer or null")
    if not settings.timeout_s > 0:
        raise InputError(f"{where}.timeout_s: expected a positive number of seconds")


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
    return (
        [scaled(length, limits.max_prompt_tokens, settings.reference_length) for length in settings.inputs],
        [scaled(length, limits.max_output_tokens, settings.reference_length) for length in settings.outputs],
    )


def too_long(case, limits):
    """Why the endpoint cannot serve ``case``, or None."""
    reasons = []
    if limits.max_prompt_tokens is not None and case.input_tokens > limits.max_prompt_tokens:
        reasons.append(f"input {case.input_tokens} tokens > compiled prompt length {limits.max_prompt_tokens}")
    if limits.max_output_tokens is not None and case.output_tokens > limits.max_output_tokens:
        reasons.append(f"output {case.output_tokens} tokens > compiled output budget {limits.max_output_tokens}")
    return "; ".join(reasons) or None


def plan_cases(settings, limits):
    """``(cases, skipped)``: the distinct cases to run, in sweep order, and those longer than ``limits`` allow
    (dicts with the case's lengths, its concurrency and the ``reason``), as the vendor skips them."""
    check_settings(settings)
    inputs, outputs = scaled_lengths(settings, limits)
    cases, skipped, seen = [], [], set()
    for input_tokens in inputs:
        for output_tokens in outputs:
            for concurrency in settings.concurrency:
                case = Case(input_tokens, output_tokens, concurrency)
                # small compiled lengths can scale two of the vendor's lengths to one count
                if case in seen:
                    continue
                seen.add(case)
                reason = too_long(case, limits)
                if reason is None:
                    cases.append(case)
                else:
                    skipped.append({**dataclasses.asdict(case), "reason": reason})
    return cases, skipped


def single_token_words(tokenizer, probe="the"):
    """Words that each add exactly one token when they follow another word and a space: the vocabulary's
    tokens that decode to a space and letters, kept when the tokenizer encodes them back as one token."""
    probe_ids = tokenizer.encode(probe, add_special_tokens=False).ids
    probe_text = tokenizer.decode(probe_ids)
    decoded = tokenizer.decode_batch([[*probe_ids, token] for token in range(tokenizer.get_vocab_size())])
    candidates = sorted(
        {
            text[len(probe_text) + 1 :]
            for text in decoded
            if text.startswith(probe_text) and WORD.fullmatch(text[len(probe_text) :])
        }
    )
    encoded = tokenizer.encode_batch([f"{probe} {word}" for word in candidates], add_special_tokens=False)
    words = [
        word for word, encoding in zip(candidates, encoded, strict=True) if len(encoding.ids) == len(probe_ids) + 1
    ]
    if len(words) < MIN_WORDS:
        raise InputError(
            f"the tokenizer has {len(words)} words that encode as one token each, fewer than the {MIN_WORDS} "
            "the benchmark's prompts are made of"
        )
    return words


def exact_prompt(tokenizer, words, tokens, rng, attempts=8):
    """A text of random ``words`` that the server encodes (special tokens included) as exactly ``tokens`` ids."""
    specials = len(tokenizer.encode("").ids)
    for _ in range(attempts):
        chosen = rng.choices(words, k=tokens + 16)
        count = tokens - specials
        # each word is one token, so this converges at once unless neighbouring words merge
        for _ in range(8):
            if not 1 <= count <= len(chosen):
                break
            text = " ".join(chosen[:count])
            encoded = len(tokenizer.encode(text).ids)
            if encoded == tokens:
                return text
            count += tokens - encoded
    raise InputError(
        f"cannot make a prompt of exactly {tokens} tokens with this tokenizer (it adds {specials} special "
        "token(s) of its own)"
    )


def case_prompts(tokenizer, words, cases, settings):
    """Every case's prompts, made before the first request so that a length the tokenizer cannot make stops the
    run before it starts, and no prompt is built inside a timed case."""
    rng = random.Random(settings.seed)
    return [
        [exact_prompt(tokenizer, words, case.input_tokens, rng) for _ in range(case.requests(settings))]
        for case in cases
    ]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One request's timings (seconds) and token counts."""

    ttft: float | None
    latency: float
    output_tokens: int
    prompt_tokens: int | None

    @property
    def tpot(self):
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def timed_request(client, served_model, prompt, output_tokens):
    start = time.perf_counter()
    first = None
    text_chunks = 0
    usage = None
    stream = await client.completions.create(
        model=served_model,
        prompt=prompt,
        max_tokens=output_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                text_chunks += 1
                if first is None:
                    first = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
    latency = time.perf_counter() - start
    # the usage chunk counts tokens; text chunks undercount where a token decodes to no text on its own
    received = usage.completion_tokens if usage is not None else text_chunks
    if not received:
        raise RuntimeError("the stream ended without any output")
    return Sample(
        ttft=None if first is None else first - start,
        latency=latency,
        output_tokens=received,
        prompt_tokens=None if usage is None else usage.prompt_tokens,
    )


def describe_error(error, timeout_s):
    if isinstance(error, TimeoutError):
        return f"timed out after {timeout_s:g} s"
    return f"{type(error).__name__}: {error}"[:ERROR_CHARS]


async def run_requests(client, served_model, prompts, output_tokens, concurrency, timeout_s):
    """Every prompt's :class:`Sample`, or the error text of the request that failed; and the wall time."""
    in_flight = asyncio.Semaphore(concurrency)

    async def one(prompt):
        async with in_flight:
            try:
                return await asyncio.wait_for(timed_request(client, served_model, prompt, output_tokens), timeout_s)
            except Exception as error:  # a failed request is a figure of the case, not the end of the sweep
                return describe_error(error, timeout_s)

    start = time.perf_counter()
    results = await asyncio.gather(*(one(prompt) for prompt in prompts))
    return results, time.perf_counter() - start


def percentile(values, q):
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation between the closest ranks; None
    for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spread(values):
    values = [value for value in values if value is not None]
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "mean": sum(values) / len(values) if values else None,
    }


def case_record(case, results, wall_s):
    samples = [result for result in results if isinstance(result, Sample)]
    errors = [result for result in results if isinstance(result, str)]
    output_tokens = sum(sample.output_tokens for sample in samples)
    return {
        **dataclasses.asdict(case),
        "requests": len(results),
        "completed": len(samples),
        "failed": len(errors),
        "errors": list(dict.fromkeys(errors))[:KEPT_ERRORS],
        "wall_s": wall_s,
        "ttft_s": spread([sample.ttft for sample in samples]),
        "tpot_s": spread([sample.tpot for sample in samples]),
        "latency_s": spread([sample.latency for sample in samples]),
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(samples) / wall_s if wall_s > 0 else None,
        # what the server says it read and wrote: a prompt count other than input_tokens means it encodes
        # differently from the tokenizer given here, an output count short of output_tokens that it stopped early
        "prompt_tokens_reported": sorted({s.prompt_tokens for s in samples if s.prompt_tokens is not None}),
        "output_tokens_received": sorted({sample.output_tokens for sample in samples}),
    }


def progress_line(record):
    def ms(value):
        return "n/a" if value is None else f"{1000 * value:.1f} ms"

    return (
        f"bench: input {record['input_tokens']}, output {record['output_tokens']}, concurrency "
        f"{record['concurrency']}: {record['completed']}/{record['requests']} completed in {record['wall_s']:.1f} s, "
        f"TTFT p50 {ms(record['ttft_s']['p50'])}, TPOT p50 {ms(record['tpot_s']['p50'])}, "
        f"{record['output_tokens_per_s'] or 0:.1f} output tokens/s"
        + (f"; first error: {record['errors'][0]}" if record["errors"] else "")
    )


async def check_served(client, served_model):
    """Stop before the sweep when the endpoint lists its models and ``served_model`` is not among them; an
    endpoint that does not list them is not refused for that."""
    try:
        served = [model.id async for model in client.models.list()]
    except Exception as error:
        LOG.warning("bench: the endpoint did not list its models (%s); going on", describe_error(error, 0))
        return
    if served_model not in served:
        raise InputError(f"the endpoint does not serve model {served_model!r}; it serves {', '.join(served)}")


async def sweep(client, served_model, cases, prompts, warmup, settings):
    if warmup:
        output_tokens = min(WARMUP_OUTPUT_TOKENS, cases[0].output_tokens)
        results, _ = await run_requests(client, served_model, warmup, output_tokens, len(warmup), settings.timeout_s)
        failed = [result for result in results if isinstance(result, str)]
        if failed:
            LOG.warning("bench: %d of %d warm-up request(s) failed: %s", len(failed), len(results), failed[0])
    records = []
    for case, prompts_of_case in zip(cases, prompts, strict=True):
        results, wall_s = await run_requests(
            client, served_model, prompts_of_case, case.output_tokens, case.concurrency, settings.timeout_s
        )
        records.append(case_record(case, results, wall_s))
        LOG.info("%s", progress_line(records[-1]))
    return records


async def benchmark(url, served_model, tokenizer, limits, settings, api_key=None):
    """The cases' records and the skipped cases (see :func:`run_benchmark`)."""
    # imported here: only a benchmark needs the client, not the stages that import this module's helpers
    from openai import AsyncOpenAI

    # a line per HTTP request from the client's transport would bury the one line per case
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cases, skipped = plan_cases(settings, limits)
    for input_tokens, output_tokens, reason in dict.fromkeys(
        (case["input_tokens"], case["output_tokens"], case["reason"]) for case in skipped
    ):
        LOG.info("bench: skipped input %d, output %d at every concurrency: %s", input_tokens, output_tokens, reason)
    words = single_token_words(tokenizer)
    prompts = case_prompts(tokenizer, words, cases, settings)
    rng = random.Random(f"warm-up {settings.seed}")
    warmup = [exact_prompt(tokenizer, words, case.input_tokens, rng) for case in cases[:1] * settings.warmup_requests]
    # no retries: a retried request would report the time of two
    async with AsyncOpenAI(base_url=url, api_key=api_key or "none", max_retries=0) as client:
        await check_served(client, served_model)
        records = await sweep(client, served_model, cases, prompts, warmup, settings)
    return records, skipped


def run_benchmark(url, served_model, tokenizer, limits, settings, *, model=None, variant=None, api_key=None):
    """Run the sweep of ``settings`` (:class:`BenchSettings`) against the OpenAI-compatible endpoint ``url``
    (``http://host:port/v1``) serving ``served_model``, with prompts made by ``tokenizer`` (a
    ``tokenizers.Tokenizer``: the one the server encodes with) within ``limits`` (:class:`Limits`); return the
    record. ``model`` and ``variant`` label the record (default: the served model, no variant)."""
    start = time.perf_counter()
    records, skipped = asyncio.run(benchmark(url, served_model, tokenizer, limits, settings, api_key))
    return {
        "model": model or served_model,
        "variant": variant,
        "endpoint": {"url": url, "served_model": served_model},
        "limits": limits.record(),
        "settings": settings.record(),
        "cases": records,
        "skipped": skipped,
        "wall_s": time.perf_counter() - start,
    }


def optional_length(text):
    return None if text.lower() in ("none", "null") else int(text)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the OpenAI-compatible base URL, e.g. http://host:9000/v1")
    parser.add_argument("--model", required=True, help="the model id the endpoint serves")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a folder with the served model's tokenizer.json")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--variant", help="a label for the record")
    parser.add_argument("--api-key", help="default: $OPENAI_API_KEY, else none")
    parser.add_argument("--max-prompt-tokens", type=int)
    parser.add_argument("--max-output-tokens", type=int)
    parser.add_argument("--inputs", nargs="+", type=int)
    parser.add_argument("--outputs", nargs="+", type=int)
    parser.add_argument("--concurrency", nargs="+", type=int)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--reference-length", type=optional_length, default=argparse.SUPPRESS, help="N or none")
    parser.add_argument("--timeout-s", type=float)
    parser.add_argument("--seed", type=int)
    args = vars(parser.parse_args(argv))
    # only what was given: the rest keeps the vendor's defaults; reference_length is absent unless given, as it
    # may be given as null
    given = {field.name: args.get(field.name) for field in dataclasses.fields(BenchSettings)}
    settings = BenchSettings.of(
        {key: value for key, value in given.items() if value is not None or key in args and key == "reference_length"},
        "command line",
    )
    limits = Limits(args["max_prompt_tokens"], args["max_output_tokens"])
    if not (args["tokenizer"] / TOKENIZER_FILE).is_file():
        raise InputError(f"{args['tokenizer'] / TOKENIZER_FILE} does not exist (--tokenizer names the folder)")
    tokenizer = read_tokenizer(args["tokenizer"])
    api_key = args["api_key"] or os.environ.get("OPENAI_API_KEY")
    record = run_benchmark(
        args["url"], args["model"], tokenizer, limits, settings, variant=args["variant"], api_key=api_key
    )
    atomic_write_json(args["output"], record)


if __name__ == "__main__":
    run_cli(main)
