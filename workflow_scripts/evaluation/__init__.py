"""Evaluation: greedy decoding, token metrics and the quality gates."""
