"""Quality gates: each variant's figures against the configured bounds, and how a failed check reads."""

from dataclasses import dataclass

from workflow_scripts.core.errors import CheckFailed
from workflow_scripts.core.settings import Settings


@dataclass(frozen=True)
class GateSettings(Settings):
    """``models.<id>.gates``: a bound left ``None`` is not checked."""

    max_perplexity_increase: float | None
    min_top1_agreement: float | None
    max_kl_divergence: float | None


def gate_record(model, evaluations, settings):
    """The gate record of a model's evaluations (by variant name); a failed gate raises :class:`CheckFailed`."""
    checks = check_variants(evaluations, settings)
    failed = [describe(check) for check in checks if not check["passed"]]
    if failed:
        raise CheckFailed(f"model {model}: quality gates failed: " + "; ".join(failed))
    return {"model": model, "settings": settings.record(), "checks": checks}


def check_variants(evaluations, settings):
    """One ``{variant, metric, value, limit, passed}`` per gate and variant; ``evaluations`` by variant name."""
    checks = []
    for variant, record in sorted(evaluations.items()):
        if variant == "float":
            continue
        c4 = record["c4"]
        broken = c4["non_finite_positions"] > 0
        gates = (
            ("max_perplexity_increase", "perplexity_increase", perplexity_increase(c4), "<="),
            ("min_top1_agreement", "top1_agreement", c4.get("top1_agreement"), ">="),
            ("max_kl_divergence", "kl_divergence", c4.get("kl_divergence"), "<="),
        )
        for key, metric, value, sense in gates:
            limit = getattr(settings, key)
            if limit is None:
                continue
            passed = not broken and value is not None and (value <= limit if sense == "<=" else value >= limit)
            checks.append(
                {
                    "variant": variant,
                    "metric": metric,
                    "value": value,
                    "limit": limit,
                    "sense": sense,
                    "passed": passed,
                    "non_finite_positions": c4["non_finite_positions"],
                }
            )
    return checks


def perplexity_increase(c4):
    """Relative to the float eager model's perplexity on the same positions (None when not finite)."""
    if c4["perplexity"] is None or not c4.get("reference_perplexity"):
        return None
    return c4["perplexity"] / c4["reference_perplexity"] - 1


def describe(check):
    value = "not finite" if check["value"] is None else f"{check['value']:.6g}"
    reason = (
        f" ({check['non_finite_positions']} positions with non-finite logits)" if check["non_finite_positions"] else ""
    )
    return f"{check['variant']}: {check['metric']} {value}, required {check['sense']} {check['limit']}{reason}"
