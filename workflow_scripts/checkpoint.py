"""Reading a Hugging Face Mistral checkpoint folder: its config and which files are what."""
import fnmatch
import shutil
from pathlib import Path

from .common import InputError, read_json

ARCHITECTURE = "MistralForCausalLM"
# Mistral's hub repos also carry consolidated.safetensors, the same weights in
# Mistral's own layout: fetching them would double the download for nothing.
WEIGHT_PATTERNS = ("model*.safetensors",)
PICKLE_PATTERNS = ("pytorch_model*.bin",)
METADATA_PATTERNS = ("*.json", "tokenizer.model", "tokenizer.model.*", "*.jinja")
# what a runtime needs beside the weights to turn text into tokens and back
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "tekken.json", "generation_config.json")


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


def copy_tokenizer_files(folder, target):
    """Copy the tokenizer files ``folder`` has into the existing folder ``target``."""
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).exists():
            shutil.copyfile(Path(folder) / name, Path(target) / name)


def load_vacc_model(folder, dtype, **config_overrides):
    """A checkpoint whose modeling files this workflow wrote (patched or quantized), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype,
                                                **config_overrides).eval()
