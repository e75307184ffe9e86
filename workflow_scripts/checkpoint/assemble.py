"""A model's folder under ``resources/models/``, assembled from what a fetch stage fills in, checked, with its manifest.

The download, download_demo and download_gguf stages differ only in how they
fill the folder; this module checks the result the same way for all three.
"""

import logging
import pickle

from workflow_scripts.checkpoint.folder import (
    INDEX_FILE,
    read_mistral_config,
    read_weight_map,
    weight_files,
    write_weight_index,
)
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.fetch import assemble

LOG = logging.getLogger(__name__)


def convert_pickled_weights(model, staging):
    """Turn ``pytorch_model*.bin`` into safetensors shards, loading tensors only (``weights_only``)."""
    import torch
    from safetensors.torch import save_file

    pickles = sorted(staging.glob("pytorch_model*.bin"))
    weight_map = {}
    for index, path in enumerate(pickles, start=1):
        LOG.info("model %s: converting %s to safetensors", model, path.name)
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise InputError(
                f"model {model}: {path.name} holds more than tensors; it is refused, since unpickling "
                "it could run code (only plain tensor files are converted)"
            ) from None
        shard = f"model-{index:05d}-of-{len(pickles):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(staging / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        path.unlink()
    (staging / "pytorch_model.bin.index.json").unlink(missing_ok=True)
    write_weight_index(staging, weight_map)


def describe_origin(origin):
    if "hub" in origin:
        return f"hub repo {origin['hub']}@{origin['revision']}"
    if "gguf" in origin:
        package = f" of package {origin['package']} {origin['package_version']}" if "package" in origin else ""
        return f"the import of GGUF file {origin['gguf']}{package}"
    return origin.get("local", "the generated demo checkpoint")


def assemble_checkpoint(model, source, folder, fill):
    """Build ``folder`` with ``fill(model, source, staging) -> (origin, link methods)``, check it, add the manifest."""

    def check(staging, origin):
        try:
            if source.get("allow_pickle") and not any(staging.glob("model*.safetensors")):
                convert_pickled_weights(model, staging)
            config = read_mistral_config(staging, model)
            weight_files(staging, model)
            if (staging / INDEX_FILE).exists():
                read_weight_map(staging / INDEX_FILE)
        except InputError as error:
            # the staging folder is gone when the user reads this: name where the files came from
            raise InputError(str(error).replace(str(staging), describe_origin(origin))) from None
        return {"architecture": config["architectures"][0]}

    return assemble("model", model, folder, lambda staging: fill(model, source, staging), check)
