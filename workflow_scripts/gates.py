"""Stage 6, quality gates: ``results/{model}/gate.json``, written only when every variant passes.

Each variant other than float eager is held to the model's ``gates`` against
the float eager model: c4 perplexity at most ``max_perplexity_increase``
above float's on the same positions, top-1 agreement at least ``min_top1_agreement``, KL divergence
at most ``max_kl_divergence``. Non-finite logits fail every gate. A failure
names the variant, the metric and both values; the summary and the report
show the same verdicts, so they still build when a gate fails.

Usage: python -m workflow_scripts.gates --model ID --evaluations JSON [JSON ...] --settings JSON --output PATH
"""
import argparse
import json
from pathlib import Path

from .common import CheckFailed, atomic_write_json, read_json, run_cli


def check_variants(evaluations, settings):
    """One ``{variant, metric, value, limit, passed}`` per gate and variant; ``evaluations`` by variant name."""
    checks = []
    for variant, record in sorted(evaluations.items()):
        if variant == "float":
            continue
        c4 = record["c4"]
        broken = c4["non_finite_positions"] > 0
        gates = (("max_perplexity_increase", "perplexity_increase", perplexity_increase(c4), "<="),
                 ("min_top1_agreement", "top1_agreement", c4.get("top1_agreement"), ">="),
                 ("max_kl_divergence", "kl_divergence", c4.get("kl_divergence"), "<="))
        for key, metric, value, sense in gates:
            limit = settings[key]
            if limit is None:
                continue
            passed = not broken and value is not None and (value <= limit if sense == "<=" else value >= limit)
            checks.append({"variant": variant, "metric": metric, "value": value, "limit": limit, "sense": sense,
                           "passed": passed, "non_finite_positions": c4["non_finite_positions"]})
    return checks


def perplexity_increase(c4):
    """Relative to the float eager model's perplexity on the same positions (None when not finite)."""
    if c4["perplexity"] is None or not c4.get("reference_perplexity"):
        return None
    return c4["perplexity"] / c4["reference_perplexity"] - 1


def describe(check):
    value = "not finite" if check["value"] is None else f"{check['value']:.6g}"
    reason = f" ({check['non_finite_positions']} positions with non-finite logits)" if check["non_finite_positions"] else ""
    return f"{check['variant']}: {check['metric']} {value}, required {check['sense']} {check['limit']}{reason}"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--evaluations", required=True, nargs="+", type=Path)
    parser.add_argument("--settings", required=True, type=json.loads)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    evaluations = {path.stem: read_json(path, what="evaluation") for path in args.evaluations}
    checks = check_variants(evaluations, args.settings)
    failed = [describe(check) for check in checks if not check["passed"]]
    if failed:
        raise CheckFailed(f"model {args.model}: quality gates failed: " + "; ".join(failed))
    atomic_write_json(args.output, {"model": args.model, "settings": args.settings, "checks": checks})


if __name__ == "__main__":
    run_cli(main)
