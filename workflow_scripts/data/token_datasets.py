"""Calibration shards and evaluation windows as a ``datasets.Dataset``, the form most quantizers take.

The workflow's stages read these safetensors files directly (memory-mapped,
the tokenizer checked: workflow_scripts/data/provenance.py); this loader is for
the tools that expect Hugging Face ``datasets`` rows of ``input_ids`` and
``attention_mask``, such as llm-compressor's ``oneshot``
(tests/benchmarks/gptq_vs_llmcompressor.py). The raw text files are not read
through ``datasets`` (workflow_scripts/data/readers.py says why).
"""

import json
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.data.provenance import metadata_provenance


def token_dataset(path, limit=None):
    """The rows of a calibration shard (``results/calibration/{tokenizer}/{dataset}.safetensors``) or an evaluation
    set (``results/evaluation-sets/...-validation.safetensors``, every position a real token) as a ``Dataset`` of
    ``input_ids`` and ``attention_mask``; its ``info.description`` is the file's provenance (dataset, tokenizer)
    as JSON."""
    import datasets
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "np") as handle:
            names = set(handle.keys())
            if "input_ids" not in names:
                raise InputError(f"{path}: has no input_ids tensor (not a calibration shard or evaluation set)")
            provenance = metadata_provenance(path, handle.metadata())
            ids = handle.get_tensor("input_ids")[:limit]
            mask = handle.get_tensor("attention_mask")[:limit] if "attention_mask" in names else ids * 0 + 1
    except SafetensorError as error:
        raise InputError(f"{path}: not a readable safetensors file ({error})") from None
    columns = {"input_ids": ids.astype("int64").tolist(), "attention_mask": mask.astype("int64").tolist()}
    info = datasets.DatasetInfo(description=json.dumps(provenance, sort_keys=True))
    return datasets.Dataset.from_dict(columns, info=info)
