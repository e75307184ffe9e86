"""Small random-weight Mistral checkpoints, generated offline and deterministically.

They have the hub layout of the real models (config.json in the hub's style,
sharded bf16 safetensors with an index, generation config, the real
tokenizer), so every later stage runs the code paths it runs for a 7-8B model.
"""

import torch
from safetensors.torch import save_file

from workflow_scripts.checkpoint.demo_presets import PRESETS, demo_config
from workflow_scripts.checkpoint.folder import INDEX_FILE, write_weight_index
from workflow_scripts.checkpoint.layout import tensor_shapes
from workflow_scripts.core.cli import LOG
from workflow_scripts.core.files import atomic_write_json
from workflow_scripts.data.tokenizer_files import write_tokenizer

SHARDS = 2


def random_weights(config, seed):
    """Seeded bf16 weights: N(0, initializer_range) matrices, norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in tensor_shapes(config).items():
        values = torch.randn(shape, generator=generator)
        if len(shape) == 1:
            values = 1.0 + 0.1 * values
        else:
            values = config["initializer_range"] * values
        weights[name] = values.to(torch.bfloat16)
    return weights


def write_demo_checkpoint(preset, folder, seed, overrides=None):
    """Write a complete hub-layout checkpoint into ``folder``; return the file names."""
    config = demo_config(preset, overrides)
    weights = random_weights(config, seed)
    names = list(weights)
    per_shard = -(-len(names) // SHARDS)
    weight_map, files = {}, []
    for index in range(SHARDS):
        shard_name = f"model-{index + 1:05d}-of-{SHARDS:05d}.safetensors"
        shard = {name: weights[name] for name in names[index * per_shard : (index + 1) * per_shard]}
        save_file(shard, str(folder / shard_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, shard_name))
        files.append(shard_name)
    total_size = sum(t.numel() * t.element_size() for t in weights.values())
    write_weight_index(folder, weight_map, total_size)
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
