"""Fixed-length token rows: batching, size limits, seeded sample choice and padding."""

import hashlib

import numpy as np

from workflow_scripts.core.errors import InputError

BATCH_SIZE = 256


MAX_TOKENS = 1 << 28  # nsamples x seqlen beyond this (1 GiB of int32) is a config mistake


def sample_key(seed, record, purpose="choice"):
    digest = hashlib.blake2b(f"{seed}:{record}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def check_size(dataset, nsamples, seqlen):
    if nsamples < 1 or seqlen < 1:
        raise InputError(f"dataset {dataset}: nsamples ({nsamples}) and seqlen ({seqlen}) must be positive")
    if nsamples * seqlen > MAX_TOKENS:
        raise InputError(f"dataset {dataset}: nsamples x seqlen = {nsamples} x {seqlen} exceeds {MAX_TOKENS} tokens")


def pad_rows(rows, seqlen, pad_id):
    """int32 ids and int8 mask ``[len(rows), seqlen]``: truncated, or right-padded with ``pad_id``."""
    input_ids = np.full((len(rows), seqlen), pad_id, dtype=np.int32)
    attention_mask = np.zeros((len(rows), seqlen), dtype=np.int8)
    for index, row in enumerate(rows):
        row = row[:seqlen]
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask
