"""Calibration shards: a dataset tokenized and sampled, per tokenizer (stage 3).

Output ``{dataset}.safetensors`` holds ``input_ids`` (int32) and
``attention_mask`` (int8), both ``[nsamples, seqlen]``; ``{dataset}.json``
records where every sample came from, after the provenance every token file
carries (:mod:`workflow_scripts.data.provenance`). Shards are keyed by the tokenizer's
fingerprint (the sha256 of its ``tokenizer.json``, 16 hex digits), so models
that share a tokenizer share shards.

The dataset's format (c4, alpaca or ceval; for the datasets of those names,
the name) decides how it is read:

* c4: the GPTQ recipe, windows of exactly ``seqlen`` tokens at a random offset
  of random training documents longer than ``seqlen`` tokens. The train shard
  is streamed and tokenized in batches; only the current batch and the
  ``nsamples`` documents chosen so far are held.
* alpaca, ceval: one sample per randomly chosen record (Alpaca prompt; ceval
  question, options and answer), truncated or right-padded to ``seqlen``.

Random choices come from a keyed hash of ``(seed, record id)``: a document is
chosen when its key is among the ``nsamples`` smallest of the eligible ones, so
the choice is uniform, independent of batch sizes, and byte-identical for the
same inputs and seed.
"""

import heapq
import itertools
import logging
from dataclasses import dataclass

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.progress import Progress
from workflow_scripts.core.settings import Settings
from workflow_scripts.data.datasets import dataset_file, dataset_format
from workflow_scripts.data.provenance import provenance, write_token_tensors
from workflow_scripts.data.readers import C4Lines, alpaca_prompt, ceval_text, read_alpaca, read_ceval
from workflow_scripts.data.tokenizers import encode, load_tokenizer, pad_token_id
from workflow_scripts.data.windows import BATCH_SIZE, check_size, pad_rows, sample_key

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationSettings(Settings):
    """``datasets.<id>`` as a calibration shard reads it (``split``: which ceval split; c4's is always train)."""

    nsamples: int
    seqlen: int
    seed: int
    split: str = "train"


def c4_windows(path, tokenizer, nsamples, seqlen, seed):
    """Rows of ``seqlen`` tokens from random documents longer than ``seqlen``, and their provenance."""
    chosen = []  # max-heap by key of the nsamples smallest-key eligible documents: (-key, line, ids)
    documents = eligible = 0
    lines = C4Lines(path)
    progress = Progress(f"c4 {path.name}", lines.size, " MB compressed", 1e6)
    records = tokens = 0
    stream = iter(lines)
    while batch := list(itertools.islice(stream, BATCH_SIZE)):
        encoded = encode(tokenizer, [text for _, text in batch])
        for (line, _), ids in zip(batch, encoded, strict=True):
            documents += 1
            if len(ids) <= seqlen:
                continue
            eligible += 1
            entry = (-sample_key(seed, line), line, ids)
            if len(chosen) < nsamples:
                heapq.heappush(chosen, entry)
            elif entry > chosen[0]:
                heapq.heapreplace(chosen, entry)
        records, tokens = records + len(batch), tokens + sum(map(len, encoded))
        progress.reach(lines.position, f", {records} records, {tokens} tokens")
    if eligible < nsamples:
        raise InputError(
            f"{path}: only {eligible} of {documents} documents are longer than seqlen={seqlen} "
            f"tokens, fewer than nsamples={nsamples}"
        )
    rows, samples = [], []
    for _, line, ids in sorted(chosen, reverse=True):
        offset = sample_key(seed, line, "offset") % (len(ids) - seqlen)
        rows.append(ids[offset : offset + seqlen])
        samples.append({"record": line, "offset": offset, "tokens": len(ids)})
    stats = {"records_total": documents, "records_eligible": eligible, "tokens_tokenized": tokens}
    return rows, samples, stats


def record_samples(texts, tokenizer, nsamples, seed, source):
    """One sample per chosen record; ``texts`` maps a record id to its formatted text."""
    if len(texts) < nsamples:
        raise InputError(f"{source}: has {len(texts)} records, fewer than nsamples={nsamples}")
    ids = sorted(texts, key=lambda record: sample_key(seed, record))[:nsamples]
    encoded = encode(tokenizer, [texts[record] for record in ids])
    samples = [
        {"record": record, "offset": 0, "tokens": len(tokens)} for record, tokens in zip(ids, encoded, strict=True)
    ]
    stats = {"records_total": len(texts), "records_eligible": len(texts), "tokens_tokenized": sum(map(len, encoded))}
    return encoded, samples, stats


def alpaca_texts(files, settings):
    path = dataset_file(files, "alpaca", "train")
    return {index: alpaca_prompt(record) for index, record in enumerate(read_alpaca(path))}, path


def ceval_texts(files, settings):
    path = dataset_file(files, "ceval", "archive")
    subjects = read_ceval(path, settings.split)
    return {f"{subject}/{row['id']}": ceval_text(row) for subject, rows in subjects.items() for row in rows}, path


RECORD_TEXTS = {"alpaca": alpaca_texts, "ceval": ceval_texts}
SAMPLE_FORMATS = {
    "c4": "raw text window",
    "alpaca": "Alpaca prompt with response",
    "ceval": "question, options A-D and answer",
}


def build_shard(dataset, files, tokenizer_folder, fingerprint, settings, data_format=None):
    """Tokenize and sample one dataset of ``data_format`` (default: its id); return ``(tensors, record)``."""
    data_format = dataset_format(dataset, data_format)
    nsamples, seqlen, seed = settings.nsamples, settings.seqlen, settings.seed
    check_size(dataset, nsamples, seqlen)
    tokenizer = load_tokenizer(tokenizer_folder, fingerprint)
    if data_format == "c4":
        if settings.split != "train":
            raise InputError(f"dataset {dataset}: calibration windows come from the train file, not {settings.split!r}")
        rows, samples, stats = c4_windows(dataset_file(files, "c4", "train"), tokenizer, nsamples, seqlen, seed)
    else:
        texts, path = RECORD_TEXTS[data_format](files, settings)
        rows, samples, stats = record_samples(texts, tokenizer, nsamples, seed, path)
    pad_id = pad_token_id(tokenizer)
    input_ids, attention_mask = pad_rows(rows, seqlen, pad_id)
    lengths = [sample["tokens"] for sample in samples]
    record = {
        **provenance(dataset, files, fingerprint),
        "format": SAMPLE_FORMATS[data_format],
        "split": settings.split,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "samples": samples,
        "stats": {
            **stats,
            "sample_tokens_min": min(lengths),
            "sample_tokens_mean": sum(lengths) / len(lengths),
            "sample_tokens_max": max(lengths),
            "longer_than_seqlen": sum(length > seqlen for length in lengths),
            "shorter_than_seqlen": sum(length < seqlen for length in lengths),
            "pad_token_id": pad_id,
            "attended_tokens": int(attention_mask.sum()),
        },
    }
    return {"input_ids": input_ids, "attention_mask": attention_mask}, record


def calibrate(dataset, data_format, files, tokenizer_folder, fingerprint, settings, shard, record_path):
    """Build one dataset's shard for one tokenizer and write it with its record."""
    tensors, record = build_shard(dataset, files, tokenizer_folder, fingerprint, settings, data_format)
    write_token_tensors(tensors, record, shard, record_path)
    stats = record["stats"]
    LOG.info(
        "dataset %s: %d x %d tokens (%d records read, %d tokens tokenized)",
        dataset,
        record["nsamples"],
        record["seqlen"],
        stats["records_total"],
        stats["tokens_tokenized"],
    )
