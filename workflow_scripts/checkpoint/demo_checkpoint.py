"""Small random-weight Mistral checkpoints, generated offline and deterministically.

They have the hub layout of the real models (config.json in the hub's style,
sharded bf16 safetensors with an index, generation config, the real
tokenizer), so every later stage runs the code paths it runs for a 7-8B model.
Weights are generated and written one tensor at a time, so a model of a 7-8B
shape (``config/scale-7b.yaml``) is built in the memory of its largest tensor.
"""

import itertools
import logging
import math

import torch

from workflow_scripts.checkpoint.demo_presets import PRESETS, demo_config
from workflow_scripts.checkpoint.folder import INDEX_FILE, write_weight_index
from workflow_scripts.checkpoint.layout import tensor_shapes
from workflow_scripts.checkpoint.safetensors_stream import SafetensorsWriter
from workflow_scripts.core.files import atomic_path, atomic_write_json
from workflow_scripts.core.progress import Progress
from workflow_scripts.data.tokenizer_files import write_tokenizer

LOG = logging.getLogger(__name__)

SHARD_BYTES = 2 * 10**9  # at most this many bytes of weights per shard, and at least two shards


def random_tensors(config, seed):
    """Seeded bf16 weights in file order, one at a time: N(0, initializer_range) matrices, norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in tensor_shapes(config).items():
        values = torch.randn(shape, generator=generator)
        if len(shape) == 1:
            values = 1.0 + 0.1 * values
        else:
            values = config["initializer_range"] * values
        yield name, values.to(torch.bfloat16)


def shard_names(config):
    """The tensor names of each shard: consecutive runs of about equal count."""
    shapes = tensor_shapes(config)
    names = list(shapes)
    total = 2 * sum(math.prod(shape) for shape in shapes.values())
    shards = max(2, math.ceil(total / SHARD_BYTES))
    per_shard = -(-len(names) // shards)
    return [names[first : first + per_shard] for first in range(0, len(names), per_shard)]


def write_demo_checkpoint(preset, folder, seed, overrides=None):
    """Write a complete hub-layout checkpoint into ``folder``, a tensor at a time; return the file names."""
    config = demo_config(preset, overrides)
    shapes = tensor_shapes(config)
    tensors = random_tensors(config, seed)
    groups = shard_names(config)
    weight_map, files = {}, []
    total_bytes = 2 * sum(math.prod(shape) for shape in shapes.values())
    progress = Progress("generating weights", total_bytes, " GB", 1e9)
    for index, names in enumerate(groups):
        shard_name = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        with atomic_path(folder / shard_name) as tmp:
            writer = SafetensorsWriter(tmp, [(name, torch.bfloat16, shapes[name]) for name in names], {"format": "pt"})
            for _, values in itertools.islice(tensors, len(names)):  # the shards split the file order
                writer.write(values)
                progress.advance(values.numel() * values.element_size())
            writer.close()
        weight_map.update(dict.fromkeys(names, shard_name))
        files.append(shard_name)
    write_weight_index(folder, weight_map, total_bytes)
    atomic_write_json(folder / "config.json", config)
    atomic_write_json(
        folder / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    files += [INDEX_FILE, "config.json", "generation_config.json"]
    files += write_tokenizer(PRESETS[preset]["tokenizer"], folder)
    return sorted(files)


def generate(model, source, staging):
    """``assemble_checkpoint`` filler for a ``source: {demo: PRESET, seed, shape}`` entry."""
    seed = source.get("seed", 0)
    LOG.info("model %s: generating demo preset %s (seed %d)", model, source["demo"], seed)
    write_demo_checkpoint(source["demo"], staging, seed, source.get("shape"))
    return {"demo": source["demo"], "seed": seed, "shape": source.get("shape", {})}, {"generated"}
