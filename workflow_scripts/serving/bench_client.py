"""The serving benchmark's client: a sweep (:mod:`workflow_scripts.serving.sweep`) run against an
OpenAI-compatible endpoint, and its record.

Each request streams a completion of exactly the asked number of tokens (``ignore_eos``) for a prompt of
exactly the asked number of tokens (:mod:`workflow_scripts.serving.prompts`). The record holds, per case, the
figures of :mod:`workflow_scripts.serving.timings`.
"""

import asyncio
import logging
import time

from openai import AsyncOpenAI

from workflow_scripts.core.errors import InputError
from workflow_scripts.serving.prompts import case_prompts, single_token_words, warmup_prompts
from workflow_scripts.serving.sweep import plan_cases
from workflow_scripts.serving.timings import Sample, case_record, progress_line

LOG = logging.getLogger(__name__)

ERROR_CHARS = 300
WARMUP_OUTPUT_TOKENS = 4


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


async def run_sweep(client, served_model, cases, prompts, warmup, settings):
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
    cases, skipped = plan_cases(settings, limits)
    for input_tokens, output_tokens, reason in dict.fromkeys(
        (case["input_tokens"], case["output_tokens"], case["reason"]) for case in skipped
    ):
        LOG.info("bench: skipped input %d, output %d at every concurrency: %s", input_tokens, output_tokens, reason)
    words = single_token_words(tokenizer)
    prompts = case_prompts(tokenizer, words, cases, settings)
    warmup = warmup_prompts(tokenizer, words, cases, settings)
    # no retries: a retried request would report the time of two
    async with AsyncOpenAI(base_url=url, api_key=api_key or "none", max_retries=0) as client:
        await check_served(client, served_model)
        records = await run_sweep(client, served_model, cases, prompts, warmup, settings)
    return records, skipped


def run_benchmark(url, served_model, tokenizer, limits, settings, *, model=None, variant=None, api_key=None):
    """Run the sweep of ``settings`` (a :class:`~workflow_scripts.serving.sweep.BenchSettings`) against the
    OpenAI-compatible endpoint ``url`` (``http://host:port/v1``) serving ``served_model``, with prompts made by
    ``tokenizer`` (a ``tokenizers.Tokenizer``: the one the server encodes with) within ``limits`` (a
    :class:`~workflow_scripts.serving.sweep.Limits`); return the record. ``model`` and ``variant`` label the
    record (default: the served model, no variant)."""
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
