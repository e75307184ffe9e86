"""Which tokenizer made a file of token ids: one provenance for calibration shards and evaluation sets.

Token ids mean text only under the tokenizer that made them, so every token file (a calibration shard, evaluation
windows, the ceval prompts) records its provenance, :func:`provenance`: the dataset, the tokenizer's fingerprint
and the source files it was made from. The JSON record holds it (the record beside a safetensors file, or the
ceval prompts' file itself); a safetensors file also holds its dataset and tokenizer in its own metadata, under
``provenance``, so that a reader checks the tokenizer without the record. Every reader of token ids for a model
(GPTQ's calibration, the evaluation) checks them with :func:`check_tokenizer`.
"""

import json
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_path, atomic_write_json, read_json
from workflow_scripts.core.manifest import MANIFEST_NAME

METADATA_KEY = "provenance"
MADE_BY = ("dataset", "tokenizer_fingerprint")  # what a safetensors file's own metadata repeats of its record


def provenance(dataset, files, fingerprint):
    """The provenance of a token file made from the fetched dataset folder ``files`` with tokenizer
    ``fingerprint``: the start of its JSON record."""
    manifest = read_json(Path(files) / MANIFEST_NAME, what=f"dataset {dataset}: manifest")
    return {
        "dataset": dataset,
        "tokenizer_fingerprint": fingerprint,
        "source_files": manifest["files"],
        "source_origin": manifest["origin"],
    }


def write_token_tensors(tensors, record, path, record_path):
    """``tensors`` (numpy) as safetensors at ``path`` with the record's dataset and tokenizer in its metadata, and
    ``record`` (a :func:`provenance` and more) as JSON at ``record_path``; both written atomically."""
    from safetensors.numpy import save_file

    made_by = {key: record[key] for key in MADE_BY}
    with atomic_path(path) as tmp:
        # One metadata key: safetensors writes several in hash-map order, which varies between runs.
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(made_by, sort_keys=True)})
    atomic_write_json(record_path, record)


def metadata_provenance(path, metadata):
    """The provenance in safetensors file ``path``'s ``metadata`` (a dict, as ``safe_open`` gives it)."""
    text = (metadata or {}).get(METADATA_KEY)
    if text is None:
        raise InputError(
            f"{path}: has no {METADATA_KEY!r} metadata naming the tokenizer that made it (not a token file of "
            "this workflow, or one written before it recorded that): make it again"
        )
    return json.loads(text)


def read_provenance(path):
    """The dataset and tokenizer of a token safetensors file, from its metadata."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as handle:
            metadata = handle.metadata()
    except SafetensorError as error:
        raise InputError(f"{path}: not a readable safetensors file ({error})") from None
    return metadata_provenance(path, metadata)


def check_tokenizer(path, fingerprint, record=None):
    """Refuse token file ``path`` unless it was made with the model's tokenizer, of fingerprint ``fingerprint``.

    ``record``: the file's JSON when the caller has read it (the ceval prompts); a safetensors file's own
    metadata is read otherwise."""
    made_with = (read_provenance(path) if record is None else record).get("tokenizer_fingerprint")
    if made_with != fingerprint:
        raise InputError(f"{path}: made with tokenizer {made_with}, but the model's tokenizer is {fingerprint}")
