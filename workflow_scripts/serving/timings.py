"""The serving benchmark's figures: each request's timings, and a case's record over them (the time to the first
token, the time per further output token and the latency, each as p50, p95 and mean; output tokens and
requests per second over the case's wall time)."""

import dataclasses
import statistics

# The distinct error messages a case keeps: enough to tell apart a timeout from a refusal, not a log.
KEPT_ERRORS = 5


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


def spread(values):
    """p50, p95 (linear interpolation between the closest ranks) and mean of the values that are not None;
    None for each when there are none."""
    values = [value for value in values if value is not None]
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    # quantiles wants two values before Python 3.13; one value twice has the same percentiles
    percentiles = statistics.quantiles(values * 2 if len(values) == 1 else values, n=100, method="inclusive")
    return {"p50": percentiles[49], "p95": percentiles[94], "mean": statistics.fmean(values)}


def case_record(case, results, wall_s):
    """The record of ``case`` (a :class:`~workflow_scripts.serving.sweep.Case`) from its requests' results: a
    :class:`Sample`, or the error text of a request that failed."""
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
    """A case's record in one log line."""

    def ms(value):
        return "n/a" if value is None else f"{1000 * value:.1f} ms"

    return (
        f"bench: input {record['input_tokens']}, output {record['output_tokens']}, concurrency "
        f"{record['concurrency']}: {record['completed']}/{record['requests']} completed in {record['wall_s']:.1f} s, "
        f"TTFT p50 {ms(record['ttft_s']['p50'])}, TPOT p50 {ms(record['tpot_s']['p50'])}, "
        f"{record['output_tokens_per_s'] or 0:.1f} output tokens/s"
        + (f"; first error: {record['errors'][0]}" if record["errors"] else "")
    )
