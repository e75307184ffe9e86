"""Serving a built variant over an OpenAI-compatible HTTP API, and benchmarking such a server."""
