"""What a server serves: a compiled package folder, or an eager checkpoint where no package exists.

A compiled folder (``results/{model}/aoti/{variant}``, with ``graphs.json``)
brings its own batch and lengths. An eager checkpoint (``results/{model}/patched``
or ``results/{model}/quantized/{scheme}``) runs the same two graphs as modules
(:mod:`workflow_scripts.runtime.graphs`), at the shape the server is
given, so both are served by one engine and batched the same way.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from workflow_scripts.checkpoint.folder import stop_token_ids
from workflow_scripts.core.devices import load_computing_in, resolve_device, resolve_dtype, stored_bytes
from workflow_scripts.core.errors import InputError
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, read_tokenizer
from workflow_scripts.runtime.graphs import Decode, Prefill
from workflow_scripts.runtime.package import GRAPHS_FILE, StaticGenerator, load_compiled


@dataclass(frozen=True)
class EagerShape:
    """The batch and lengths an eager checkpoint is served at (a compiled folder has its own)."""

    batch: int = 4
    seq_in: int = 64
    seq_total: int = 128
    device: str = "auto"


@dataclass
class ServedVariant:
    name: str
    folder: Path
    backend: str  # "compiled" or "eager"
    generator: StaticGenerator
    stop_token_ids: list[int]
    tokenizer: object  # a tokenizers.Tokenizer


def eager_name(folder):
    """``{model}-{variant}`` for the workflow's checkpoint folders, else the folder's name."""
    folder = Path(folder).resolve()
    if folder.name == "patched":
        return f"{folder.parent.name}-float"
    if folder.parent.name == "quantized":
        return f"{folder.parent.parent.name}-{folder.name}"
    return folder.name


def load_variant(folder, eager_shape=EagerShape(), name=None):
    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise InputError(f"{folder}: no {TOKENIZER_FILE}; serve a compiled package folder or a checkpoint folder")
    if (folder / GRAPHS_FILE).is_file():
        generator, tokenizer, graphs = load_compiled(folder)
        name = name or f"{graphs['model']}-{graphs['variant']}"
        return ServedVariant(name, folder, "compiled", generator, list(graphs["stop_token_ids"]), tokenizer)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: neither {GRAPHS_FILE} (a compiled package) nor config.json (a checkpoint)")
    generator = eager_generator(folder, eager_shape)
    return ServedVariant(
        name or eager_name(folder), folder, "eager", generator, sorted(stop_token_ids(folder)), read_tokenizer(folder)
    )


def eager_generator(folder, shape):
    from workflow_scripts.checkpoint.vacc_code import load_vacc_model

    if shape.seq_in >= shape.seq_total:
        raise InputError(f"seq_in ({shape.seq_in}) must be less than seq_total ({shape.seq_total})")
    device = resolve_device(shape.device, "--device")
    dtype = resolve_dtype("auto", device)
    model = load_computing_in(
        lambda dtype, device: load_vacc_model(folder, dtype, device, max_position_embeddings=shape.seq_total),
        dtype,
        device,
        stored_bytes(folder),
    )
    return StaticGenerator(
        Prefill(model, shape.seq_total), Decode(model), shape.batch, shape.seq_in, shape.seq_total, device
    )


def describe(variant):
    graphs = variant.generator
    device = torch.device(graphs.device).type
    return (
        f"{variant.name}: {variant.backend} ({variant.folder}), batch {graphs.batch}, prompts up to {graphs.seq_in}"
        f" tokens, cache {graphs.seq_total} positions, {device}"
    )
