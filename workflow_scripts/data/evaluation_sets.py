"""Evaluation sets, tokenized per tokenizer, for the evaluation stage (stage 6).

* ``c4-windows``: perplexity windows from the validation file of a c4-format
  dataset (c4 itself, or e.g. python-docs): documents in file order, each
  encoded as the tokenizer does (with BOS where it adds one), concatenated and
  cut into consecutive ``[nsamples, seqlen]`` windows (the GPTQ evaluation
  recipe, streamed; reading stops once enough tokens are in).
* ``ceval``: every question of a split (default ``val``) as a few-shot prompt:
  the subject's header, the first ``shots`` ``dev`` questions with their
  answers, then the question; with the token id of each answer letter, so the
  letters' logits can be compared.

Both carry the provenance of every token file: the dataset and the tokenizer
that made them (:mod:`workflow_scripts.data.provenance`).
"""

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json
from workflow_scripts.core.settings import Settings
from workflow_scripts.data.datasets import dataset_file
from workflow_scripts.data.provenance import provenance, write_token_tensors
from workflow_scripts.data.readers import LETTERS, C4Lines, ceval_header, ceval_question, read_ceval
from workflow_scripts.data.tokenizers import encode, load_tokenizer, pad_token_id
from workflow_scripts.data.windows import BATCH_SIZE, check_size, pad_rows

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowSettings(Settings):
    """``datasets.<id>.evaluation``: how many perplexity windows of how many tokens."""

    nsamples: int
    seqlen: int


@dataclass(frozen=True)
class CevalSettings(Settings):
    """``datasets.ceval.evaluation``: the split asked and the number of ``dev`` examples before each question."""

    split: str
    shots: int


def c4_windows(files, tokenizer, settings):
    nsamples, seqlen = settings.nsamples, settings.seqlen
    check_size(f"{Path(files).name} evaluation", nsamples, seqlen)
    path = dataset_file(files, "c4", "validation")
    needed = nsamples * seqlen
    tokens, documents = [], 0
    stream = iter(C4Lines(path))
    while len(tokens) < needed and (batch := list(itertools.islice(stream, BATCH_SIZE))):
        for ids in encode(tokenizer, [text for _, text in batch]):
            if len(tokens) < needed:
                tokens.extend(ids)
                documents += 1
    if len(tokens) < needed:
        raise InputError(f"{path}: has {len(tokens)} tokens, fewer than nsamples x seqlen = {nsamples} x {seqlen}")
    rows = [tokens[index * seqlen : (index + 1) * seqlen] for index in range(nsamples)]
    input_ids, _ = pad_rows(rows, seqlen, 0)
    return input_ids, {"documents_used": documents, "tokens": needed}


def ceval_prompts(files, tokenizer, settings):
    path = dataset_file(files, "ceval", "archive")
    questions = read_ceval(path, settings.split)
    examples = read_ceval(path, "dev")
    shots = settings.shots
    entries = []
    for subject, rows in questions.items():
        shots_rows = examples.get(subject, [])[:shots]
        if len(shots_rows) < shots:
            raise InputError(f"{path}: subject {subject} has {len(shots_rows)} dev questions, fewer than shots={shots}")
        context = ceval_header(subject) + "".join(f"{ceval_question(row)}{row['answer']}\n\n" for row in shots_rows)
        for row in rows:
            if row["answer"] not in LETTERS:
                raise InputError(
                    f"{path}: {settings.split}/{subject} question {row['id']} has answer "
                    f"{row['answer']!r}, not one of A-D"
                )
            entries.append(
                {"subject": subject, "id": row["id"], "answer": row["answer"], "prompt": context + ceval_question(row)}
            )
    encoded = encode(tokenizer, [entry["prompt"] for entry in entries])
    letter_ids = {}
    for letter in LETTERS:
        with_letter = encode(tokenizer, [entries[0]["prompt"] + letter])[0]
        # The letter after "答案：" must be one token of its own for the logit comparison.
        if with_letter[:-1] != encoded[0] or len(with_letter) != len(encoded[0]) + 1:
            raise InputError(
                f"the tokenizer does not encode the answer letter {letter!r} as one token after "
                "the prompt; ceval scoring by letter logits is not possible"
            )
        letter_ids[letter] = with_letter[-1]
    for entry, ids in zip(entries, encoded, strict=True):
        entry["input_ids"] = ids
        del entry["prompt"]
    return entries, letter_ids


def set_record(files, fingerprint, settings):
    """The start of an evaluation set's record: its provenance (the dataset named by its folder) and settings."""
    return {**provenance(Path(files).name, files, fingerprint), "settings": settings.record()}


def write_c4_windows(files, tokenizer_folder, fingerprint, settings, output, record):
    """The windows as safetensors (``input_ids``, its provenance in the metadata) and their JSON record."""
    input_ids, stats = c4_windows(files, load_tokenizer(tokenizer_folder, fingerprint), settings)
    write_token_tensors(
        {"input_ids": input_ids},
        {**set_record(files, fingerprint, settings), **stats, "shape": list(input_ids.shape)},
        output,
        record,
    )
    LOG.info(
        "%s validation: %d windows of %d tokens from %d documents",
        Path(files).name,
        *input_ids.shape,
        stats["documents_used"],
    )


def write_ceval_prompts(files, tokenizer_folder, fingerprint, settings, output):
    """Every question's few-shot prompt as token ids, the answer letters' token ids, as JSON."""
    tokenizer = load_tokenizer(tokenizer_folder, fingerprint)
    entries, letter_ids = ceval_prompts(files, tokenizer, settings)
    lengths = [len(entry["input_ids"]) for entry in entries]
    atomic_write_json(
        output,
        {
            **set_record(files, fingerprint, settings),
            "letter_token_ids": letter_ids,
            "pad_token_id": pad_token_id(tokenizer),
            "prompt_tokens_max": max(lengths),
            "questions": entries,
        },
    )
    LOG.info(
        "ceval %s: %d questions, %d-shot, prompts up to %d tokens",
        settings.split,
        len(entries),
        settings.shots,
        max(lengths),
    )
