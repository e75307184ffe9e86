"""AOTInductor packages of a model variant, verified against eager (stage 5, ``results/{model}/aoti/{variant}/``).

The portable backend: every machine can build and run it. ``variant`` is
``float`` (the patched checkpoint) or an int8 scheme (its quantized
checkpoint, whose fingerprint must name this model's patched checkpoint).
One decoder layer's graph, the same for one token per row (a decode step), and
the head's (:mod:`workflow_scripts.runtime.graphs`) are exported with dynamic
rows, tokens and cache length and compiled with
``torch._inductor.aoti_compile_and_package``, for the CPU (float32 by
default, or bfloat16) or for CUDA (bfloat16), their weights being inputs: the compiled
layer runs every layer, so the compile takes the same time whatever the
model's depth, and every weight goes once into ``weights.safetensors``
(:mod:`workflow_scripts.runtime.package`). The folder also gets the tokenizer
and ``graphs.json``, so :mod:`workflow_scripts.run_compiled` and the server
need nothing else.

Before the folder is published, the packages are fed each verify prompt and
the eager model's greedy continuation of it, and compared with the eager model
(its own forward and KV cache): every step's logits within
``max_abs_logit_diff``. ``verify`` in the manifest records the figures; the stage fails and
leaves no folder otherwise.
"""

import contextlib
import fcntl
import gc
import hashlib
import logging
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from workflow_scripts.checkpoint.folder import copy_tokenizer_files, stop_token_ids
from workflow_scripts.checkpoint.safetensors_stream import DTYPES, SafetensorsFile
from workflow_scripts.checkpoint.vacc_code import load_vacc_model
from workflow_scripts.core.code_inputs import sources_digest
from workflow_scripts.core.devices import require_memory, resolve_device, resolve_dtype, stored_bytes
from workflow_scripts.core.errors import CheckFailed, InputError
from workflow_scripts.core.files import atomic_write_json, read_json, sha256_file, staged_directory
from workflow_scripts.core.manifest import MANIFEST_NAME, write_folder_manifest
from workflow_scripts.core.settings import Settings
from workflow_scripts.core.variants import parse
from workflow_scripts.data.tokenizers import encode_prompts
from workflow_scripts.runtime.decode import greedy_decode
from workflow_scripts.runtime.graphs import Head, Layer, cache_shape, fused_layer, head_weight_names, int8_kernel
from workflow_scripts.runtime.package import (
    GRAPHS_FILE,
    ROTARY,
    WEIGHTS_FILE,
    load_compiled,
    model_weights,
    write_constants,
)

LOG = logging.getLogger(__name__)

RUNTIME_BYTES = 10**9  # the interpreter, torch, the compiler
# Peak memory of a CPU compile per byte of the model in its compute dtype: the model, export's and the compiler's
# temporaries (measured on Mistral-7B-shaped layers, README "Real size")
CPU_PEAK_PER_WEIGHT_BYTE = 2.0


@dataclass(frozen=True)
class AotiSettings(Settings):
    """``models.<id>.aoti`` less ``variants`` (the rule's): device, static shapes, precision and compare bound."""

    device: str
    batch: int
    dtype: str
    context: int
    max_abs_logit_diff: dict[str, float]
    int8_head: bool = True


def check_lineage(model, source, patched, checkpoint):
    """An int8 checkpoint must have been quantized from this model's current patched checkpoint."""
    if source.base == "float":
        return
    expected = sha256_file(patched / MANIFEST_NAME)
    made_from = read_json(checkpoint / MANIFEST_NAME, what=f"model {model}: {source.name} manifest")
    found = made_from.get("fingerprint", {}).get("patched_manifest_sha256")
    if found != expected:
        raise InputError(
            f"model {model}: {checkpoint} was quantized from a patched checkpoint with manifest "
            f"sha256 {found}, not this model's {expected}; rebuild its quantize job"
        )


def compile_graphs(model, settings, folder):
    """Export and compile the layer and head graphs into ``folder``, the weights they read into its weights file;
    the time of each step goes to the log; the record of what ``graphs.json`` needs to run them.

    The graphs are compiled without freezing: freezing would fold and pre-pack
    the weights into constants of the graph (oneDNN layouts on the CPU,
    float32 copies of int8 weights), and here they are inputs, one graph for
    every layer.
    """
    config, device = model.config, model.device
    rows, context = settings.batch, settings.context
    weights, layer_weights, layer_names = model_weights(model)
    # example sizes above 1 (torch.export specialises sizes of 1), a cache cut to fewer slots than it holds
    example_rows, example_tokens, example_length = 2, 3, 8
    hidden_size, dtype = config.hidden_size, model.dtype
    cache = torch.zeros(cache_shape(config, example_rows, max(context, example_length)), dtype=dtype, device=device)

    fused, stacks = fused_layer(model.model.layers[0])

    def layer_inputs(tokens):
        positions = torch.arange(example_length - tokens, example_length, device=device)
        return (
            torch.zeros(example_rows, tokens, hidden_size, dtype=dtype, device=device),
            positions.expand(example_rows, -1).contiguous(),
            weights[ROTARY[0]],
            weights[ROTARY[1]],
            cache[:, :, :example_length],
            cache.clone()[:, :, :example_length],
            *(weight for _, weight in fused.named_parameters()),
        )

    # rows, tokens and cache length dynamic, without bounds that the exporter would have to prove; the decode
    # step's layer graph has one token per row
    batch = tokens = length = torch.export.Dim.DYNAMIC

    def layer_shapes(tokens):
        return (
            {0: batch, 1: tokens},
            {0: batch, 1: tokens},
            None,
            None,
            {0: batch, 2: length},
            {0: batch, 2: length},
            (None,) * len(stacks),
        )

    head_names = head_weight_names(model)
    head_inputs = (
        torch.zeros(example_rows, hidden_size, dtype=dtype, device=device),
        *(weights[name] for name in head_names),
    )
    head_shapes = ({0: torch.export.Dim.DYNAMIC}, (None,) * len(head_names))
    layer = Layer(fused)
    for name, module, inputs, shapes in (
        ("layer", layer, layer_inputs(example_tokens), layer_shapes(tokens)),
        ("decode", layer, layer_inputs(1), layer_shapes(None)),
        ("head", Head(model), head_inputs, head_shapes),
    ):
        start = time.monotonic()
        exported = torch.export.export(module.eval(), inputs, dynamic_shapes=shapes)
        exported_at = time.monotonic()
        # size_asserts off: their messages can print Python function reprs (memory addresses) into the generated
        # code, so the package would change from process to process
        torch._inductor.aoti_compile_and_package(
            exported,
            package_path=str(folder / f"{name}.pt2"),
            inductor_configs={"freezing": False, "size_asserts": False},
        )
        pin_serialization_id(folder / f"{name}.pt2")
        LOG.info(
            "%s: exported in %.1f s, compiled in %.1f s", name, exported_at - start, time.monotonic() - exported_at
        )
    for names, tensors in zip(layer_names, layer_weights, strict=True):
        weights.update(zip(names, tensors, strict=True))
    write_constants(folder / WEIGHTS_FILE, weights)
    return {
        "rows": rows,
        "context": context,
        "kv_heads": config.num_key_value_heads,
        "head_dim": cache_shape(config, 1, 1)[3],
        # each layer's graph inputs, as the names of the stored weights each stacks
        "layer_weights": [
            [[f"model.layers.{index}.{name}" for name in stack] for stack in stacks]
            for index in range(len(layer_names))
        ],
        "head_weights": head_names,
    }


def eager_generations(model, prompts_ids, steps):
    """The eager model's greedy logits and tokens on every prompt, the reference of :func:`verify_compiled`."""
    return [greedy_decode(model, torch.tensor([ids]), steps) for ids in prompts_ids]


def verify_compiled(eager, folder, prompts_ids, settings, steps):
    """The compiled packages fed each prompt and then the eager model's greedy tokens (teacher forcing), their logits
    after every token against the eager model's (:func:`eager_generations`): the figures, or :class:`CheckFailed`
    where any differs by more than the bound.

    Fed the same tokens, the two are compared at every step even where their own greedy choice would part: in
    bfloat16 the compiler's reordered sums move logits by a few units of the last place, enough to flip a near tie
    (two candidates closer than twice the difference), after which free-running sequences no longer compare. The
    steps whose greedy choice differs are recorded with the eager model's margin between the two tokens.
    """
    generator, _, graphs = load_compiled(folder)
    bound = settings.max_abs_logit_diff[graphs["dtype"]]
    prompts, failures = [], []
    for index, (ids, (eager_logits, eager_tokens)) in enumerate(zip(prompts_ids, eager, strict=True)):
        logits = generator.generate(ids, steps, forced=eager_tokens)[1].cpu()
        difference = float((logits - eager_logits).abs().max())
        picks = logits[:-1].argmax(dim=-1).tolist()
        near_ties = [
            {"step": step, "eager_margin": float(eager_logits[step, eager] - eager_logits[step, pick])}
            for step, (pick, eager) in enumerate(zip(picks, eager_tokens, strict=True))
            if pick != eager
        ]
        prompts.append({"tokens": len(ids), "max_abs_logit_diff": difference, "greedy_choices_differ": near_ties})
        if difference > bound:
            failures.append(f"prompt {index}: max |logit diff| {difference:.3g} (bound {bound})")
    if failures:
        raise CheckFailed(f"compiled vs eager: {'; '.join(failures)}")
    return {"prompts": prompts, "greedy_steps": steps, "bound": bound}


def pin_serialization_id(package):
    """Replace the random ``.data/serialization_id`` of a ``.pt2`` archive with one derived from its content.

    PyTorch's archive writer draws that id at random; it only labels the
    archive, so a digest of the other records (same length, digits like the
    original) makes the same inputs give the same bytes. The record is stored
    uncompressed, so it is overwritten in place and its CRC-32 updated in the
    local header and in the central directory.
    """
    with zipfile.ZipFile(package) as archive:
        entries = archive.infolist()
        central = archive.start_dir
    record = next(e for e in entries if e.filename.endswith(".data/serialization_id"))
    digest = hashlib.sha256(
        b"".join(e.filename.encode() + e.CRC.to_bytes(4, "little") for e in entries if e is not record)
    )
    pinned = str(int(digest.hexdigest(), 16)).encode()[: record.file_size].rjust(record.file_size, b"0")
    crc = struct.pack("<I", zlib.crc32(pinned))
    with open(package, "r+b") as handle:
        handle.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
        handle.seek(record.header_offset + 14)
        handle.write(crc)
        handle.seek(record.header_offset + 30 + name_length + extra_length)
        handle.write(pinned)
        handle.seek(central)
        for entry in entries:
            header = handle.read(46)
            name_length, extra_length, comment_length = struct.unpack("<HHH", header[28:34])
            if entry is record:
                handle.seek(-30, 1)
                handle.write(crc)
                break
            handle.seek(name_length + extra_length + comment_length, 1)


@contextlib.contextmanager
def private_inductor_cache(model_id, variant):
    """Compile in a fresh inductor cache at a path that names only the model and variant.

    A shared cache appends every compile's command lines to the C++ sources
    that go into the package, and the cache's path shapes the generated code
    and the shared library; so one fixed, emptied cache per model and variant
    makes the package a function of its inputs, wherever the workflow folder
    is. A lock keeps two builds of the same name (two workflow folders on one
    machine) from sharing it at once.
    """
    from torch._inductor.cpu_vec_isa import pick_vec_isa
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    root = Path(tempfile.gettempdir()) / f"vacc-workflow-inductor-{os.getuid()}"
    root.mkdir(exist_ok=True)
    # Which vector instructions the machine runs is probed by building and loading seven small libraries (about
    # 15 s); the answer depends on the machine alone, and torch remembers it for the process. So it is probed
    # in a cache kept between compiles, and each compile's emptied cache starts with the answer.
    with temporary_cache_dir(str(root / "vector-isa-probe")):
        pick_vec_isa()
    cache = root / f"{model_id}-{variant}"
    with open(root / f"{model_id}-{variant}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        shutil.rmtree(cache, ignore_errors=True)
        try:
            with temporary_cache_dir(str(cache)):
                yield
        finally:
            shutil.rmtree(cache, ignore_errors=True)


def compile_variant(model_id, variant, patched, checkpoint, settings, verify_settings, output, code_module):
    """Compile the eager ``variant`` (float or a quantize scheme) into ``output``; ``code_module``, the stage that
    runs this, fingerprints the code."""
    source = parse(variant)
    if source.compiled:
        raise InputError(f"model {model_id}: {variant} is compiled already; aoti compiles float or a quantize scheme")
    patched, checkpoint, output = Path(patched), Path(checkpoint), Path(output)
    check_lineage(model_id, source, patched, checkpoint)
    steps = verify_settings.greedy_tokens
    limit = (
        settings.context - steps,
        f"models.{model_id}.verify.prompts",
        f"models.{model_id}.aoti.context - verify.greedy_tokens",
    )
    prompts_ids = encode_prompts(patched, verify_settings.prompts, limit)
    torch.set_grad_enabled(False)
    device = resolve_device(settings.device, f"models.{model_id}.aoti.device")
    dtype = resolve_dtype(settings.dtype, device)
    if device == "cpu":
        require_memory(
            RUNTIME_BYTES + CPU_PEAK_PER_WEIGHT_BYTE * compute_bytes(checkpoint, dtype),
            f"models.{model_id}.aoti: compiling {variant} for the CPU in {str(dtype).removeprefix('torch.')}",
            "compile for CUDA (aoti.device: cuda), or leave this variant out of aoti.variants (an int8 variant "
            "needs about a third of the float one's memory)",
        )
    # rotary tables for the positions a row holds, not the model's whole context: they go into the weights file
    model = load_vacc_model(checkpoint, dtype, device, max_position_embeddings=settings.context)
    if settings.int8_head and source.base != "float" and int8_kernel(device, dtype):
        quantize_output_projection(model)
    with staged_directory(output) as staging:
        with private_inductor_cache(model_id, variant):
            shapes = compile_graphs(model, settings, staging)
        copy_tokenizer_files(patched, staging)
        atomic_write_json(
            staging / GRAPHS_FILE,
            {
                "model": model_id,
                "variant": variant,
                **shapes,
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "stop_token_ids": sorted(stop_token_ids(checkpoint)),
            },
        )
        # the eager model is freed before the packages load their own copy of the weights: never two copies
        eager = eager_generations(model, prompts_ids, steps)
        del model
        gc.collect()
        figures = verify_compiled(eager, staging, prompts_ids, settings, steps)
        LOG.info(
            "model %s %s: compiled matches eager (max |logit diff| %.3g)",
            model_id,
            variant,
            max(p["max_abs_logit_diff"] for p in figures["prompts"]),
        )
        write_folder_manifest(
            staging,
            {
                "model": model_id,
                "variant": variant,
                "torch": torch.__version__,
                "fingerprint": {
                    "checkpoint_manifest_sha256": sha256_file(checkpoint / MANIFEST_NAME),
                    "settings": settings.record(),
                    "verify": verify_settings.record(),
                    "code": sources_digest(code_module),
                },
                "verify": figures,
                "bytes": folder_bytes(staging, checkpoint),
            },
        )


def quantize_output_projection(model):
    """Make ``model``'s output projection per-channel int8 (round to nearest), as the int8 checkpoints' decoder
    projections are: the packages read it through the same int8 kernel, at half the bytes of bfloat16 (SmolLM2's
    49152 x 576 head: 0.6 ms a decode step against 1.7 ms, measured), and the eager model the packages are checked
    against computes it alike. Tied embeddings keep their own float copy for the row lookup."""
    modeling = sys.modules[type(model).__module__]
    model.lm_head = modeling.QuantizedLinearPerChannel.from_linear(model.lm_head)


def compute_bytes(checkpoint, dtype):
    """Bytes of a checkpoint's tensors once its floating ones are in ``dtype`` (int8 weights stay int8)."""
    total = 0
    for path in checkpoint.glob("*.safetensors"):
        for entry in SafetensorsFile(path).entries.values():
            stored = DTYPES[entry["dtype"]]
            element = dtype.itemsize if stored.is_floating_point else stored.itemsize
            total += math.prod(entry["shape"]) * element
    return total


def folder_bytes(folder, checkpoint):
    """The sizes that show the weights are stored once: the weights file, the compiled code, the variant's own
    checkpoint weights."""
    return {
        "weights": (folder / WEIGHTS_FILE).stat().st_size,
        "graphs": sum(path.stat().st_size for path in folder.glob("*.pt2")),
        "checkpoint_weights": stored_bytes(checkpoint),
    }
