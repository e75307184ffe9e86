"""The GPTQ int8 checkpoint (stage 4, ``results/{model}/quantized/gptq-int8/``), layer by layer, resumable.

For each decoder layer in order, the calibration samples run through the layer
(their inputs come from the already-quantized layers before it), the Hessian
``2 X X^T / n`` of each projection's input is accumulated (q/k/v share one,
gate/up share one), and every projection is rounded by GPTQ
(:mod:`workflow_scripts.quantization.gptq`). Only the current layer's weights, the
calibration activations and the layer's Hessians are resident. On a GPU the
layers run in the checkpoint's half precision, on the CPU in float32.

A further ``holdout`` samples per shard never enter a Hessian: they follow the
same path through the quantized layers, and each layer's output error on them
with RTN and with GPTQ weights goes into the manifest.

Each finished layer is written as ``.partial/layer-NNN.safetensors`` carrying
the fingerprint of everything that produced it (patched checkpoint,
calibration shards, settings, code). A rerun uses a partial only when its
fingerprint matches, replays the saved int8 layers to rebuild the activations,
and goes on from the first layer without one; the result is the same bytes as
an uninterrupted run. The checkpoint is then written like ``rtn-int8``'s.
"""

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workflow_scripts.checkpoint.vacc_files.configuration_mistral_vacc import MistralConfig
from workflow_scripts.checkpoint.vacc_files.modeling_mistral_vacc import (
    MistralDecoderLayer,
    MistralStaticRotary,
    causal_attention_bias,
)
from workflow_scripts.checkpoint.vacc_files.quantization_vacc import quantize_per_channel
from workflow_scripts.core.code_inputs import sources_digest
from workflow_scripts.core.devices import resolve_device, resolve_dtype
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_path, check_free_space, sha256_file, writing
from workflow_scripts.core.manifest import MANIFEST_NAME
from workflow_scripts.data.provenance import check_tokenizer
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, file_fingerprint
from workflow_scripts.quantization import GPTQ_BATCH as BATCH
from workflow_scripts.quantization.gptq import Hessian, gptq_quantize, output_error
from workflow_scripts.quantization.int8_checkpoint import (
    MatrixError,
    QuantizeSettings,
    open_checkpoint,
    projection_of,
    quantization_record,
    quantized_bytes,
    write_quantized_checkpoint,
)

LOG = logging.getLogger(__name__)

# Projections that read the same input share one Hessian.
HESSIAN_GROUPS = {
    "self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}
ALL_PROJECTIONS = [module for group in HESSIAN_GROUPS.values() for module in group]
ATTENTION_INPUT = "self_attn.q_proj"
GPTQ_RECORD = ("block_size", "damp", "act_order", "first_token_weight", "nsamples", "holdout")


@dataclass(frozen=True)
class GptqSettings(QuantizeSettings):
    """``models.<id>.quantize.gptq-int8`` (docs/gptq.md). ``datasets`` is the rule's: its shards come as files."""

    nsamples: int
    holdout: int
    block_size: int
    damp: float
    act_order: bool
    first_token_weight: float
    device: str
    datasets: tuple[str, ...]


def load_calibration(paths, settings, fingerprint):
    """``((ids, masks) for the Hessians, (ids, masks) held out)``: per shard the first ``nsamples``,
    then the next ``holdout``; refused unless the shards were made with this tokenizer."""
    nsamples, holdout = settings.nsamples, settings.holdout
    used, held = [], []
    for path in paths:
        check_tokenizer(path, fingerprint)
        tensors = load_file(str(path))
        ids, masks = tensors["input_ids"].long(), tensors["attention_mask"].long()
        if ids.shape[0] < nsamples + holdout:
            raise InputError(
                f"{path}: has {ids.shape[0]} samples, fewer than quantize.gptq-int8.nsamples + "
                f"holdout = {nsamples} + {holdout}"
            )
        used.append((ids[:nsamples], masks[:nsamples]))
        held.append((ids[nsamples : nsamples + holdout], masks[nsamples : nsamples + holdout]))
    return [tuple(torch.cat(part) for part in zip(*parts, strict=True)) for parts in (used, held)]


class Samples:
    """The hidden states of a set of token sequences entering the current layer, on the compute device."""

    def __init__(self, embeddings, ids, masks, rotary, device, dtype):
        self.hidden = embeddings[ids].to(device, dtype)
        self.masks = masks.to(device)
        positions = (masks.cumsum(-1) - 1).clamp(min=0).to(device)
        self.cos, self.sin = rotary.to(device)(positions, dtype)

    def through(self, layer):
        """The layer's outputs for every sample, in batches of ``BATCH``."""
        outputs = torch.empty_like(self.hidden)
        with torch.no_grad():
            for first in range(0, self.hidden.shape[0], BATCH):
                rows = slice(first, first + BATCH)
                bias = causal_attention_bias(self.masks[rows], self.hidden.shape[1], 0, self.hidden.dtype)
                outputs[rows], _ = layer(self.hidden[rows], self.cos[rows], self.sin[rows], bias)
        return outputs

    def advance(self, layer):
        self.hidden = self.through(layer)

    def relative_change(self, outputs, reference):
        """``||outputs - reference|| / ||reference - inputs||`` over the real tokens: an error measured
        against what the layer adds to its input, not against the residual stream it carries along."""
        real = self.masks.bool()
        error = (outputs[real].double() - reference[real].double()).norm()
        return float(error / (reference[real].double() - self.hidden[real].double()).norm())


def embedded_samples(config, shards, mapping, id_sets, device, dtype):
    """A :class:`Samples` per ``(ids, masks)`` set, from the checkpoint's embedding table."""
    embeddings = shards[mapping["model.embed_tokens.weight"]].tensor("model.embed_tokens.weight")
    rotary = MistralStaticRotary(config)
    return [Samples(embeddings, ids, masks, rotary, device, dtype) for ids, masks in id_sets]


def layer_from_checkpoint(config, shards, mapping, index, device, dtype):
    """Decoder layer ``index`` on ``device``, built without initialising weights it then overwrites. Its
    pages are released once copied and the next layer's are asked for, so disk reads overlap this layer's work."""
    with torch.device("meta"):
        layer = MistralDecoderLayer(config)
    state = {}
    for name in layer.state_dict():
        full, following = f"model.layers.{index}.{name}", f"model.layers.{index + 1}.{name}"
        shard = shards[mapping[full]]
        state[name] = shard.tensor(full).to(device=device, dtype=dtype, copy=True)
        shard.release(full, 0, state[name].numel())
        if following in mapping:
            shards[mapping[following]].prefetch(following)
    layer.load_state_dict(state, assign=True)
    return layer.eval()


def set_dequantized(layer, entries, index):
    """Give ``layer`` the weights its int8 entries stand for (the weights later layers see)."""
    with torch.no_grad():
        for module in ALL_PROJECTIONS:
            key = f"model.layers.{index}.{module}.weight"
            if key in entries:
                linear = layer.get_submodule(module)
                device = linear.weight.device
                # to the device first: int8 crosses the bus, not a float32 copy four times its size
                weight = entries[key].to(device).float() * entries[f"{key}_scale"].to(device).float().unsqueeze(1)
                linear.weight.copy_(weight)


def collect_hessians(layer, samples, first_token_weight):
    """The Hessian of each input shared by a group of projections, over the calibration samples.

    Every query attends to the first position (the attention sink), so an error in its key and value
    reaches every token after it: in the q/k/v Hessian its activations count ``first_token_weight``
    times.
    """
    hessians, hooks = {}, []
    for owner in HESSIAN_GROUPS:
        linear = layer.get_submodule(owner)
        hessians[owner] = Hessian(linear.in_features, linear.weight.device)
        weight = first_token_weight if owner == ATTENTION_INPUT else 1.0
        hooks.append(
            linear.register_forward_hook(
                lambda module, inputs, output, owner=owner, weight=weight: hessians[owner].add(inputs[0], weight)
            )
        )
    try:
        samples.through(layer)
    finally:
        for hook in hooks:
            hook.remove()
    return {owner: hessian.matrix for owner, hessian in hessians.items()}


def quantize_group(layer, index, members, hessian, settings, dtype):
    """GPTQ and RTN entries of the projections sharing ``hessian``, rounded as one stacked matrix."""
    weights = [layer.get_submodule(module).weight.detach().to(dtype) for module in members]
    stacked = torch.cat(weights)
    try:
        gptq = gptq_quantize(stacked, hessian, settings.bits, settings.block_size, settings.damp, settings.act_order)
    except torch.linalg.LinAlgError:
        raise InputError(
            f"layer {index} {'/'.join(members)}: the Hessian stays singular after dampening "
            f"(damp={settings.damp}); raise damp or use more calibration samples"
        ) from None
    rtn = quantize_per_channel(stacked, settings.bits)
    rows = [weight.shape[0] for weight in weights]
    gptq_entries, rtn_entries, figures = {}, {}, {}
    trace = float(hessian.diagonal().sum())
    for module, weight, q, scale, rtn_q, rtn_scale in zip(
        members, weights, *(t.split(rows) for t in (*gptq, *rtn)), strict=True
    ):
        key = f"model.layers.{index}.{module}.weight"
        gptq_entries[key], gptq_entries[f"{key}_scale"] = q, scale
        rtn_entries[key], rtn_entries[f"{key}_scale"] = rtn_q, rtn_scale
        figures[key] = {
            "hessian_trace": trace,
            "output_error_rtn": output_error(weight, rtn_q, rtn_scale, hessian),
            "output_error_gptq": output_error(weight, q, scale, hessian),
        }
    return gptq_entries, rtn_entries, figures


def quantize_layer(layer, index, calibration, holdout, settings, dtype):
    """GPTQ for each projection of ``layer``; ``(entries, figures)``, figures in-sample (under the
    calibration Hessians) and on the held-out samples (the layer's output error with RTN and GPTQ weights)."""
    hessians = collect_hessians(layer, calibration, settings.first_token_weight)
    reference = holdout.through(layer)
    entries, rtn_entries, matrices = {}, {}, {}
    for owner, members in HESSIAN_GROUPS.items():
        chosen = [module for module in members if module.split(".")[1] in settings.modules]
        if chosen:
            group = quantize_group(layer, index, chosen, hessians[owner], settings, dtype)
            for gathered, part in zip((entries, rtn_entries, matrices), group, strict=True):
                gathered.update(part)
    heldout = {}
    for scheme, scheme_entries in (("rtn", rtn_entries), ("gptq", entries)):
        set_dequantized(layer, scheme_entries, index)
        heldout[scheme] = holdout.relative_change(holdout.through(layer), reference)
    return entries, {"matrices": matrices, "heldout_output_error": heldout}


def process_layer(layer, index, calibration, holdout, settings, dtype, partial, layer_print):
    """Quantize one layer into its partial file (or take a valid one), then move both sample sets past it;
    the layer's figures."""
    found = valid_partial(partial, layer_print, index)
    if found is None:
        layer_entries, layer_figures = quantize_layer(layer, index, calibration, holdout, settings, dtype)
        record = {"fingerprint": layer_print, "figures": layer_figures}
        partial.parent.mkdir(parents=True, exist_ok=True)
        data_bytes = sum(tensor.nbytes for tensor in layer_entries.values())  # and a header
        with writing(partial, data_bytes, at_least=True), atomic_path(partial) as tmp:
            save_file(
                {name: tensor.cpu() for name, tensor in layer_entries.items()},
                str(tmp),
                metadata={"record": json.dumps(record, sort_keys=True)},
            )
        found = layer_entries, record
    entries, record = found
    set_dequantized(layer, entries, index)
    for samples in (calibration, holdout):
        samples.advance(layer)
    return record["figures"]


def valid_partial(partial, fingerprint, index):
    """``(entries, record)`` of a layer's partial file when its fingerprint matches, else None."""
    if not partial.exists():
        return None
    with safe_open(str(partial), "pt") as handle:
        record = json.loads(handle.metadata()["record"])
    if record["fingerprint"] != fingerprint:
        LOG.info("layer %d: %s has another fingerprint; recomputing", index, partial)
        return None
    LOG.info("layer %d: taken from %s", index, partial)
    return load_file(str(partial)), record


def gptq_layers(model, patched, calibration, settings, partial_dir, fingerprint):
    """Quantize every layer into its partial file (or take a valid one); return ``(per-layer figures, device)``."""
    config_dict, mapping, shards = open_checkpoint(patched, model, settings.modules)
    config = MistralConfig(**config_dict)
    device = resolve_device(settings.device, f"models.{model}.quantize.gptq-int8.device")
    used, held = load_calibration(calibration, settings, file_fingerprint(patched / TOKENIZER_FILE))
    figures = {}
    with contextlib.ExitStack() as stack:
        for shard in shards.values():
            stack.enter_context(shard)
        first_weight = "model.layers.0.mlp.down_proj.weight"
        checkpoint_dtype = shards[mapping[first_weight]].dtype(first_weight)
        dtype = resolve_dtype("auto", device, checkpoint_dtype)
        samples = embedded_samples(config, shards, mapping, (used, held), device, dtype)
        start = time.monotonic()
        for index in range(config.num_hidden_layers):
            layer_print = hashlib.sha256(
                json.dumps({**fingerprint, "device": device, "layer": index}, sort_keys=True).encode()
            ).hexdigest()
            layer = layer_from_checkpoint(config, shards, mapping, index, device, dtype)
            figures[index] = process_layer(
                layer, index, *samples, settings, checkpoint_dtype, partial_path(partial_dir, index), layer_print
            )
            if not torch.isfinite(samples[0].hidden).all():
                raise InputError(
                    f"layer {index}: its outputs on the calibration samples are not finite "
                    f"(check the weights of model.layers.{index} in {patched})"
                )
            elapsed = time.monotonic() - start
            LOG.info(
                "layer %d/%d done (%.1f s, about %.0f s left)",
                index + 1,
                config.num_hidden_layers,
                elapsed,
                elapsed / (index + 1) * (config.num_hidden_layers - index - 1),
            )
    return figures, device


def partial_path(partial_dir, index):
    return partial_dir / f"layer-{index:03d}.safetensors"


def gptq_bytes(model, patched, modules, partial_dir):
    """The bytes a GPTQ run still writes, before it starts: the partial files of the layers that have none yet
    (their int8 weights and scales; a little more with their headers) and the checkpoint, which is written
    while they are there."""
    _, mapping, shards = open_checkpoint(patched, model, modules)
    partials = 0
    for name, shard_name in mapping.items():
        if projection_of(name, modules) and not partial_path(partial_dir, int(name.split(".")[2])).exists():
            shape, dtype = shards[shard_name].shape(name), shards[shard_name].dtype(name)
            partials += math.prod(shape) + shape[0] * dtype.itemsize
    return partials + quantized_bytes(patched, mapping, shards, modules)


def quantize_gptq(model, patched, calibration, folder, settings, code_module):
    """The ``gptq-int8`` checkpoint of a patched one, layer by layer through partials that a rerun resumes from;
    ``code_module``, the stage that runs this, fingerprints the code (and so which partials are still valid)."""
    patched, folder = Path(patched), Path(folder)
    calibration = [Path(path) for path in calibration]
    record = {
        **quantization_record("gptq-int8", settings),
        "gptq": {key: getattr(settings, key) for key in GPTQ_RECORD},
        "calibration": [path.stem for path in calibration],
    }
    fingerprint = {
        "patched_manifest_sha256": sha256_file(patched / MANIFEST_NAME),
        "settings": record,
        "calibration_sha256": {path.name: sha256_file(path) for path in calibration},
        "code": sources_digest(code_module),
    }
    partial_dir = folder.parent / f".{folder.name}.partial"
    try:
        check_free_space(folder, gptq_bytes(model, patched, settings.modules, partial_dir))
        figures, device = gptq_layers(model, patched, calibration, settings, partial_dir, fingerprint)
    except BaseException:
        # as the checkpoint's staged folder does: a failed rebuild leaves no previous result looking current
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            partial_dir.rmdir()  # only where no layer was finished: a finished layer stays for the rerun
        raise

    def from_partials(shard, name, writer):
        with safe_open(str(partial_path(partial_dir, int(name.split(".")[2]))), "pt") as layer:
            q, scale = layer.get_tensor(name), layer.get_tensor(f"{name}_scale")
        writer.write(q)
        writer.write(scale)
        error = MatrixError()
        error.add(shard.tensor(name), q, scale)
        return error.figures()

    write_quantized_checkpoint(
        model,
        record,
        patched,
        folder,
        from_partials,
        code_module,
        extra_fingerprint={"calibration_sha256": fingerprint["calibration_sha256"]},
        extra_manifest={"layers": figures, "device": device},
    )
    shutil.rmtree(partial_dir, ignore_errors=True)
