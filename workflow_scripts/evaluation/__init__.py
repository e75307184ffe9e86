"""Evaluation: verification against upstream, quality figures (token metrics), the quality gates and the report."""

# The float reference's logits held at once at the least, while the variant scores them: the reference and the
# variant then take turns per group of windows (evaluation/evaluate.py). Here, free of torch, because the
# Snakefile sizes evaluate jobs from it (planning/job_resources.py).
REFERENCE_LOGITS_BYTES = 2 * 10**9
