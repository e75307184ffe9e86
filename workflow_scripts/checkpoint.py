"""Reading a Hugging Face Mistral checkpoint folder: its config and which files are what."""
import fnmatch
from pathlib import Path

from .common import InputError, read_json

ARCHITECTURE = "MistralForCausalLM"
# Mistral's hub repos also carry consolidated.safetensors, the same weights in
# Mistral's own layout: fetching them would double the download for nothing.
WEIGHT_PATTERNS = ("model*.safetensors",)
PICKLE_PATTERNS = ("pytorch_model*.bin",)
METADATA_PATTERNS = ("*.json", "tokenizer.model", "tokenizer.model.*", "*.jinja")


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


def weight_files(folder, model):
    """The safetensors shards of a checkpoint folder, refused when there are none."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and is_weight_file(p.name))
    if not names:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f" (it has only pickled weights: {', '.join(pickled)})" if pickled else "")
        raise InputError(f"model {model}: {folder} has no model*.safetensors weights{hint}")
    return names
