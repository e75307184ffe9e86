"""The patched checkpoint that vamc loads (stage 2, ``results/{model}/patched/``).

The downloaded weights and tokenizer files are linked (never copied); the VACC
modeling, configuration and quantization files are added; ``config.json`` is
the model's own config with ``auto_map`` merged in, and ``config_vacc.json``
adds the keys of vamc's ``model_arch: vacc`` loader.
"""

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from workflow_scripts.checkpoint.folder import is_weight_file, read_mistral_config
from workflow_scripts.checkpoint.vacc_code import AUTO_MAP, VACC_FILES, VACC_FILES_DIR
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json, link_file, read_json, sha256_file, staged_directory
from workflow_scripts.core.manifest import MANIFEST_NAME, describe_files
from workflow_scripts.core.settings import Settings
from workflow_scripts.data.tokenizers import TOKENIZER_FILE

LOG = logging.getLogger(__name__)

WRITTEN_HERE = {"config.json", "config_vacc.json", MANIFEST_NAME, *VACC_FILES}


@dataclass(frozen=True)
class PatchSettings(Settings):
    """``models.<id>.patch``: the keys of vamc's ``model_arch: vacc`` loader."""

    insert_slice: bool
    iter_num: int


def check_shapes(model, config, path):
    """Refuse configs the static-graph model cannot express, naming the key."""
    for key in (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "num_hidden_layers",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
    ):
        value = config.get(key)
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"model {model}: {path} key {key} must be a positive integer, got {value!r}")
    if config["num_attention_heads"] % config["num_key_value_heads"]:
        raise InputError(
            f"model {model}: {path} num_attention_heads ({config['num_attention_heads']}) is not a "
            f"multiple of num_key_value_heads ({config['num_key_value_heads']})"
        )


def check_tokenizer(model, source, config):
    """The fast tokenizer every later stage encodes with: present, and no token id past the embedding."""
    from tokenizers import Tokenizer

    path = source / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(
            f"model {model}: {path} does not exist; the workflow needs the checkpoint's fast tokenizer "
            "(calibration, verification and the compiled artifacts encode with it)"
        )
    try:
        vocabulary = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except Exception as error:  # noqa: BLE001 (tokenizers raises a bare Exception for a file it cannot parse)
        raise InputError(f"model {model}: {path} is not a tokenizers file ({error})") from None
    largest = max(vocabulary.values(), default=-1)
    if largest >= config["vocab_size"]:
        raise InputError(
            f"model {model}: {path} has token ids up to {largest}, but {source / 'config.json'} "
            f"vocab_size is {config['vocab_size']} (the tokenizer of another model?)"
        )


def check_weight_headers(model, source, names):
    """Open each shard's header: a truncated or corrupt file fails here, naming it, not in a later traceback."""
    from safetensors import SafetensorError, safe_open

    for name in sorted(filter(is_weight_file, names)):
        try:
            with safe_open(str(source / name), framework="numpy"):
                pass
        except SafetensorError as error:
            raise InputError(
                f"model {model}: {source / name}: truncated or corrupt safetensors file ({error}); "
                "fix or fetch the source again"
            ) from None


def patched_configs(config, settings):
    """``config.json`` and ``config_vacc.json`` contents: the model's own keys, nothing overwritten but auto_map."""
    # an upstream auto_map would name code this workflow did not write: it is replaced, never merged
    patched = {**config, "auto_map": AUTO_MAP}
    vacc = {
        **patched,
        "_attn_implementation": "eager",
        "insert_slice": settings.insert_slice,
        "iter_num": settings.iter_num,
    }
    return patched, vacc


def source_files(model, source, manifest):
    """The downloaded files, checked against the sizes their manifest recorded."""
    files = manifest["files"]
    for name, entry in files.items():
        path = source / name
        if not path.is_file() or path.stat().st_size != entry["size"]:
            raise InputError(
                f"model {model}: {path} is missing or differs from {source / MANIFEST_NAME}; "
                "rerun the download (delete the manifest to force it)"
            )
    return files


def patch_checkpoint(model, source, folder, settings):
    source = Path(source)
    source_manifest = read_json(source / MANIFEST_NAME, what=f"model {model}: download manifest")
    files = source_files(model, source, source_manifest)
    config = read_mistral_config(source, model)
    check_shapes(model, config, source / "config.json")
    check_tokenizer(model, source, config)
    check_weight_headers(model, source, files)
    with staged_directory(folder) as staging:
        methods = set()
        linked = sorted(name for name in files if name not in WRITTEN_HERE)
        for name in linked:
            methods.add(link_file(source / name, staging / name))
        for name in VACC_FILES:
            shutil.copyfile(VACC_FILES_DIR / name, staging / name)
        patched, vacc = patched_configs(config, settings)
        atomic_write_json(staging / "config.json", patched)
        atomic_write_json(staging / "config_vacc.json", vacc)
        written = describe_files(staging, ["config.json", "config_vacc.json", *VACC_FILES])
        manifest = {
            "model": model,
            "source_manifest_sha256": sha256_file(source / MANIFEST_NAME),
            "link": sorted(methods),
            "settings": settings.record(),
            "files": {**{name: files[name] for name in linked}, **written},
        }
        atomic_write_json(staging / MANIFEST_NAME, manifest)
    LOG.info(
        "model %s: patched checkpoint in %s (%d files linked by %s)",
        model,
        folder,
        len(linked),
        ", ".join(sorted(methods)) or "nothing",
    )
    return manifest
