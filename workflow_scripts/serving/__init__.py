"""Serving a built variant over an OpenAI-compatible HTTP API, and benchmarking such a server."""


def output_budget(seq_in, seq_total):
    """Most new tokens a request to graphs of these lengths can get: its first from the prefill, then one per
    cache slot after the prompt's."""
    return seq_total - seq_in + 1
