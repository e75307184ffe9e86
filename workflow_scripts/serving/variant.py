"""What a server serves: a compiled package folder, or an eager checkpoint where no package exists.

A compiled folder (``results/{model}/aoti/{variant}``, with ``graphs.json``)
brings its own rows and context. An eager checkpoint (``results/{model}/patched``
or ``results/{model}/quantized/{scheme}``) runs the same layer and head graphs
as modules (:mod:`workflow_scripts.runtime.graphs`), with the rows and context
the server is given, so both are served by one engine and batched the same way.
"""

from dataclasses import dataclass
from pathlib import Path

from workflow_scripts.checkpoint.folder import stop_token_ids
from workflow_scripts.core.devices import load_computing_in, resolve_device, resolve_dtype, stored_bytes
from workflow_scripts.core.errors import InputError
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, read_tokenizer
from workflow_scripts.runtime.package import GRAPHS_FILE, ModelRunner, eager_runner, load_compiled


@dataclass(frozen=True)
class EagerShape:
    """The rows and context an eager checkpoint is served with (a compiled folder has its own)."""

    batch: int = 4
    context: int = 2048
    device: str = "auto"


@dataclass
class ServedVariant:
    name: str
    folder: Path
    backend: str  # "compiled" or "eager"
    runner: ModelRunner
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
        runner, tokenizer, graphs = load_compiled(folder)
        name = name or f"{graphs['model']}-{graphs['variant']}"
        return ServedVariant(name, folder, "compiled", runner, list(graphs["stop_token_ids"]), tokenizer)
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: neither {GRAPHS_FILE} (a compiled package) nor config.json (a checkpoint)")
    runner = eager_model_runner(folder, eager_shape)
    return ServedVariant(
        name or eager_name(folder), folder, "eager", runner, sorted(stop_token_ids(folder)), read_tokenizer(folder)
    )


def eager_model_runner(folder, shape):
    from workflow_scripts.checkpoint.vacc_code import load_vacc_model

    if shape.batch < 1 or shape.context < 2:
        raise InputError(f"--batch ({shape.batch}) must be at least 1 and --context ({shape.context}) at least 2")
    device = resolve_device(shape.device, "--device")
    dtype = resolve_dtype("auto", device)
    model = load_computing_in(
        lambda dtype, device: load_vacc_model(folder, dtype, device, max_position_embeddings=shape.context),
        dtype,
        device,
        stored_bytes(folder),
    )
    return eager_runner(model, shape.batch, shape.context)


def describe(variant):
    runner = variant.runner
    return (
        f"{variant.name}: {variant.backend} ({variant.folder}), {runner.rows} rows of a {runner.context}-token"
        f" context, {runner.device.type}"
    )
