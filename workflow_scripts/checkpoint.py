"""Reading a Hugging Face Mistral checkpoint folder: its config and which files are what."""
import fnmatch
import shutil
from pathlib import Path

from .common import InputError, read_json, sha256_file

ARCHITECTURE = "MistralForCausalLM"
# Mistral's hub repos also carry consolidated.safetensors, the same weights in
# Mistral's own layout: fetching them would double the download for nothing.
WEIGHT_PATTERNS = ("model*.safetensors",)
INDEX_FILE = "model.safetensors.index.json"
PICKLE_PATTERNS = ("pytorch_model*.bin",)
METADATA_PATTERNS = ("*.json", "tokenizer.model", "tokenizer.model.*", "*.jinja")
# what a runtime needs beside the weights to turn text into tokens and back
# The VACC modeling code every patched and quantized checkpoint carries, and
# the only code the workflow ever lets transformers run (trust_remote_code).
PACKAGE_DATA = ("checkpoint_files",)
CHECKPOINT_FILES = Path(__file__).parent / PACKAGE_DATA[0]
VACC_FILES = ("modeling_mistral_vacc.py", "configuration_mistral_vacc.py", "quantization_vacc.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mistral_vacc.MistralConfig",
    "AutoModel": "modeling_mistral_vacc.MistralModel",
    "AutoModelForCausalLM": "modeling_mistral_vacc.MistralForCausalLM",
    "AutoModelForSequenceClassification": "modeling_mistral_vacc.MistralForSequenceClassification",
}
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


def read_weight_map(index):
    """``{tensor: shard}`` of a safetensors index, each shard a plain ``model*.safetensors`` name beside it:
    an index from the hub never makes a later stage read or write outside the checkpoint folder."""
    weight_map = read_json(index, what="checkpoint index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: has no weight_map object")
    for tensor, shard in weight_map.items():
        if not (isinstance(shard, str) and Path(shard).name == shard and is_weight_file(shard)):
            raise InputError(f"{index}: weight_map[{tensor!r}] = {shard!r} is not a model*.safetensors file name "
                             "in the checkpoint's folder")
    return weight_map


def weight_files(folder, model):
    """The safetensors shards of a checkpoint folder, refused when there are none."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and is_weight_file(p.name))
    if not names:
        raise InputError(f"model {model}: {folder} has no model*.safetensors weights (where a checkpoint has only "
                         "pickled pytorch_model*.bin weights, source.allow_pickle: true converts them, loading "
                         "tensors only)")
    return names


def copy_tokenizer_files(folder, target):
    """Copy the tokenizer files ``folder`` has into the existing folder ``target``."""
    for name in TOKENIZER_FILES:
        if (Path(folder) / name).exists():
            shutil.copyfile(Path(folder) / name, Path(target) / name)


def check_own_code(folder):
    """Refuse a folder whose code is not, byte for byte, the VACC code this workflow writes.

    ``trust_remote_code`` runs the Python files of a folder; only these may be
    there, each equal to its copy in ``workflow_scripts/checkpoint_files``, and
    ``config.json``'s ``auto_map`` may name nothing else (no other module, no
    ``repo--module`` reference to code on the hub).
    """
    folder = Path(folder)
    for path in sorted(folder.rglob("*.py")):
        name = str(path.relative_to(folder))
        if name not in VACC_FILES:
            raise InputError(f"{path}: this workflow did not write this code; it refuses to load {folder}, "
                             "which would run it")
        if sha256_file(path) != sha256_file(CHECKPOINT_FILES / name):
            raise InputError(f"{path}: differs from workflow_scripts/checkpoint_files/{name}; it refuses to run "
                             "altered code (rebuild the checkpoint)")
    auto_map = read_json(folder / "config.json", what="config").get("auto_map", {})
    for key, reference in auto_map.items():
        if AUTO_MAP.get(key) != reference:
            raise InputError(f"{folder / 'config.json'}: auto_map.{key} = {reference!r} names code this workflow "
                             "did not write; it refuses to load it")


def load_vacc_model(folder, dtype, **config_overrides):
    """A checkpoint whose modeling files this workflow wrote (patched or quantized), in eval mode; their hashes
    are checked before transformers may run them."""
    from transformers import AutoModelForCausalLM

    check_own_code(folder)
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype,
                                                **config_overrides).eval()
