"""Reading a Hugging Face Mistral checkpoint folder: its config and which files are what."""

import fnmatch
import shutil
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json, read_json

ARCHITECTURE = "MistralForCausalLM"
# Mistral's hub repos also carry consolidated.safetensors, the same weights in
# Mistral's own layout: fetching them would double the download for nothing.
WEIGHT_PATTERNS = ("model*.safetensors",)
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin",)
METADATA_PATTERNS = ("*.json", "tokenizer.model", "tokenizer.model.*", "*.jinja")
# what a runtime needs beside the weights to turn text into tokens and back
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "tekken.json",
    "generation_config.json",
    "chat_template.jinja",  # where transformers 4.43 and later save a chat template
)


def stop_token_ids(folder):
    """The token ids that end generation: ``config.json``'s ``eos_token_id`` (one id or a list)."""
    eos = read_json(Path(folder) / "config.json", what="config").get("eos_token_id")
    return set(eos) if isinstance(eos, list) else {eos}


def write_weight_index(folder, weight_map, total_size=None):
    """``model.safetensors.index.json``: which shard holds each tensor (and the weights' bytes, where known)."""
    metadata = {} if total_size is None else {"total_size": total_size}
    atomic_write_json(Path(folder) / INDEX_FILE, {"metadata": metadata, "weight_map": weight_map})


def is_weight_file(name):
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_PATTERNS)


def read_mistral_config(folder, model):
    """The checkpoint's ``config.json``, refused unless it declares ``MistralForCausalLM``."""
    path = Path(folder) / "config.json"
    config = read_json(path, what=f"model {model}: config")
    architectures = config.get("architectures") or []
    if ARCHITECTURE not in architectures:
        raise InputError(
            f"model {model}: {path} declares architectures {architectures}; "
            f"this workflow builds {ARCHITECTURE} checkpoints only"
        )
    return config


def read_weight_map(index):
    """``{tensor: shard}`` of a safetensors index, each shard a plain ``model*.safetensors`` name beside it:
    an index from the hub never makes a later stage read or write outside the checkpoint folder."""
    weight_map = read_json(index, what="checkpoint index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: has no weight_map object")
    for tensor, shard in weight_map.items():
        if not (isinstance(shard, str) and Path(shard).name == shard and is_weight_file(shard)):
            raise InputError(
                f"{index}: weight_map[{tensor!r}] = {shard!r} is not a model*.safetensors file name "
                "in the checkpoint's folder"
            )
    return weight_map


def weight_files(folder, model):
    """The safetensors shards of a checkpoint folder, refused when there are none."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and is_weight_file(p.name))
    if not names:
        raise InputError(
            f"model {model}: {folder} has no model*.safetensors weights (where a checkpoint has only "
            "pickled pytorch_model*.bin weights, source.allow_pickle: true converts them, loading "
            "tensors only)"
        )
    return names


def copy_tokenizer_files(folder, target):
    """Copy the tokenizer files ``folder`` has into the existing folder ``target``."""
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).exists():
            shutil.copyfile(Path(folder) / name, Path(target) / name)
