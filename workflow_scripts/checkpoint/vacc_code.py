"""The VACC code every patched and quantized checkpoint carries, and loading such a checkpoint.

This is the only code the workflow lets transformers run (``trust_remote_code``):
before a checkpoint loads, its Python files and ``auto_map`` are checked
against the copies shipped in ``workflow_scripts/checkpoint/vacc_files``.
"""

from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import read_json, sha256_file

PACKAGE_DATA = ("vacc_files",)
VACC_FILES_DIR = Path(__file__).parent / PACKAGE_DATA[0]
VACC_FILES = ("modeling_mistral_vacc.py", "configuration_mistral_vacc.py", "quantization_vacc.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mistral_vacc.MistralConfig",
    "AutoModel": "modeling_mistral_vacc.MistralModel",
    "AutoModelForCausalLM": "modeling_mistral_vacc.MistralForCausalLM",
    "AutoModelForSequenceClassification": "modeling_mistral_vacc.MistralForSequenceClassification",
}


def check_own_code(folder):
    """Refuse a folder whose code is not, byte for byte, the VACC code this workflow writes.

    ``trust_remote_code`` runs the Python files of a folder; only these may be
    there, each equal to its copy in ``workflow_scripts/checkpoint/vacc_files``, and
    ``config.json``'s ``auto_map`` may name nothing else (no other module, no
    ``repo--module`` reference to code on the hub).
    """
    folder = Path(folder)
    for path in sorted(folder.rglob("*.py")):
        name = str(path.relative_to(folder))
        if name not in VACC_FILES:
            raise InputError(
                f"{path}: this workflow did not write this code; it refuses to load {folder}, which would run it"
            )
        if sha256_file(path) != sha256_file(VACC_FILES_DIR / name):
            raise InputError(
                f"{path}: differs from workflow_scripts/checkpoint/vacc_files/{name}; it refuses to run "
                "altered code (rebuild the checkpoint)"
            )
    auto_map = read_json(folder / "config.json", what="config").get("auto_map", {})
    for key, reference in auto_map.items():
        if AUTO_MAP.get(key) != reference:
            raise InputError(
                f"{folder / 'config.json'}: auto_map.{key} = {reference!r} names code this workflow "
                "did not write; it refuses to load it"
            )


INT8_ALIGNMENT = 64


def load_vacc_model(folder, dtype, device="cpu", **config_overrides):
    """A checkpoint whose modeling files this workflow wrote (patched or quantized), in eval mode on ``device``;
    their hashes are checked before transformers may run them."""
    import torch
    from transformers import AutoModelForCausalLM

    check_own_code(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=dtype, device_map=device, **config_overrides
    ).eval()
    for parameter in model.parameters():
        # int8 weights mapped from the file at 8-byte offsets, copied to aligned memory for the CPU's int8 kernel
        # (quantization_vacc.ALIGNMENT), once here rather than at their first forward
        if parameter.dtype == torch.int8 and parameter.data_ptr() % INT8_ALIGNMENT:
            parameter.data = parameter.data.clone()
    return model
