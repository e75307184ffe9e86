"""Stage 4, quantize with GPTQ: ``results/{model}/quantized/gptq-int8/``, layer by layer, resumable.

For each decoder layer in order, the calibration samples run through the layer
(their inputs come from the already-quantized layers before it), the Hessian
``2 X X^T / n`` of each projection's input is accumulated (q/k/v share one,
gate/up share one), and every projection is rounded by GPTQ
(:mod:`workflow_scripts.gptq`). Only the current layer's weights, the
calibration activations and the layer's Hessians are resident.

Each finished layer is written as ``.partial/layer-NNN.safetensors`` carrying
the fingerprint of everything that produced it (patched checkpoint,
calibration shards, settings, code). A rerun uses a partial only when its
fingerprint matches, replays the saved int8 layers to rebuild the activations,
and goes on from the first layer without one; the result is the same bytes as
an uninterrupted run. The checkpoint is then written like ``rtn-int8``'s.

Usage: python -m workflow_scripts.quantize_gptq --model ID --patched DIR --calibration SHARD [SHARD ...]
           --manifest PATH --settings JSON
"""
import argparse
import contextlib
import hashlib
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .checkpoint_files.configuration_mistral_vacc import MistralConfig
from .checkpoint_files.modeling_mistral_vacc import (
    MistralDecoderLayer,
    MistralStaticRotary,
    causal_attention_bias,
)
from .checkpoint_files.quantization_vacc import quantize_per_channel
from .common import (
    LOG,
    MANIFEST_NAME,
    InputError,
    atomic_path,
    run_cli,
    sha256_file,
)
from .gptq import Hessian, gptq_quantize, output_error
from .quantize import (
    MatrixError,
    keep_freed_chunks,
    open_checkpoint,
    quantization_record,
    write_quantized_checkpoint,
)
from .sources import sources_digest

# Projections that read the same input share one Hessian.
HESSIAN_GROUPS = {"self_attn.q_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "self_attn.o_proj": ("self_attn.o_proj",),
                  "mlp.gate_proj": ("mlp.gate_proj", "mlp.up_proj"),
                  "mlp.down_proj": ("mlp.down_proj",)}
ALL_PROJECTIONS = [module for group in HESSIAN_GROUPS.values() for module in group]
BATCH = 8


def resolve_device(setting):
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise InputError("quantize.gptq-int8.device is cuda, but torch sees no CUDA device here")
    return setting


def load_calibration(paths, nsamples, fingerprint):
    """Token ids and masks of the first ``nsamples`` of each shard, refused unless made with this tokenizer."""
    from safetensors import safe_open

    ids, masks = [], []
    for path in paths:
        with safe_open(str(path), "pt") as handle:
            made_with = json.loads(handle.metadata()["provenance"])["tokenizer_fingerprint"]
        if made_with != fingerprint:
            raise InputError(f"{path}: made with tokenizer {made_with}, but the model's tokenizer is {fingerprint}")
        tensors = load_file(str(path))
        if tensors["input_ids"].shape[0] < nsamples:
            raise InputError(f"{path}: has {tensors['input_ids'].shape[0]} samples, fewer than "
                             f"quantize.gptq-int8.nsamples={nsamples}")
        ids.append(tensors["input_ids"][:nsamples].long())
        masks.append(tensors["attention_mask"][:nsamples].long())
    return torch.cat(ids), torch.cat(masks)


def layer_from_checkpoint(config, shards, mapping, index, device):
    layer = MistralDecoderLayer(config)
    state = {}
    for name in layer.state_dict():
        full = f"model.layers.{index}.{name}"
        state[name] = shards[mapping[full]].tensor(full).float()
    layer.load_state_dict(state)
    return layer.to(device).eval()


def set_dequantized(layer, entries, index, modules):
    """Give ``layer`` the weights its int8 entries stand for (the weights later layers see)."""
    with torch.no_grad():
        for module in modules:
            key = f"model.layers.{index}.{module}.weight"
            if key in entries:
                linear = layer.get_submodule(module)
                weight = entries[key].float() * entries[f"{key}_scale"].float().unsqueeze(1)
                linear.weight.copy_(weight.to(linear.weight.device))


def run_layer(layer, hidden, cos, sin, masks, device):
    """Forward every sample batch through ``layer`` in place."""
    with torch.no_grad():
        for first in range(0, hidden.shape[0], BATCH):
            rows = slice(first, first + BATCH)
            bias = causal_attention_bias(masks[rows].to(device), hidden.shape[1], 0, torch.float32)
            output, _ = layer(hidden[rows].to(device), cos[rows].to(device), sin[rows].to(device), bias)
            hidden[rows] = output.to(hidden.device)


def quantize_layer(layer, index, hidden, cos, sin, masks, settings, device, dtype):
    """Hessians from the calibration inputs, then GPTQ for each projection; ``(entries, figures)``."""
    modules = [m for m in ALL_PROJECTIONS if m.split(".")[1] in settings["modules"]]
    hessians, hooks = {}, []
    for owner in HESSIAN_GROUPS:
        linear = layer.get_submodule(owner)
        hessians[owner] = Hessian(linear.in_features, device)
        hooks.append(linear.register_forward_hook(
            lambda module, inputs, output, owner=owner: hessians[owner].add(inputs[0])))
    run_layer(layer, hidden.clone(), cos, sin, masks, device)
    for hook in hooks:
        hook.remove()
    entries, figures = {}, {}
    for owner, members in HESSIAN_GROUPS.items():
        h = hessians[owner].matrix
        for module in members:
            if module not in modules:
                continue
            key = f"model.layers.{index}.{module}.weight"
            # the checkpoint's own dtype, so that scales are stored as rtn-int8 stores them
            weight = layer.get_submodule(module).weight.detach().to(dtype)
            rtn_q, rtn_scale = quantize_per_channel(weight.cpu(), settings["bits"])
            try:
                q, scale = gptq_quantize(weight, h, settings["bits"], settings["block_size"], settings["damp"],
                                         settings["act_order"])
            except torch.linalg.LinAlgError:
                raise InputError(f"layer {index} {module}: the Hessian stays singular after dampening "
                                 f"(damp={settings['damp']}); raise damp or use more calibration samples") from None
            entries[key], entries[f"{key}_scale"] = q.cpu(), scale.cpu()
            figures[key] = {"hessian_trace": float(h.diagonal().sum()),
                            "output_error_rtn": output_error(weight.cpu(), rtn_q, rtn_scale, h.cpu()),
                            "output_error_gptq": output_error(weight, q, scale, h)}
    return entries, figures


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
    """Quantize every layer (or take its valid partial); return ``(entries, per-layer figures, device)``."""
    config_dict, mapping, shards = open_checkpoint(patched, model, tuple(settings["modules"]))
    config = MistralConfig(**config_dict)
    device = resolve_device(settings["device"])
    ids, masks = load_calibration(calibration, settings["nsamples"], sha256_file(patched / "tokenizer.json")[:16])
    entries, figures = {}, {}
    with contextlib.ExitStack() as stack:
        for shard in shards.values():
            stack.enter_context(shard)
        hidden = shards[mapping["model.embed_tokens.weight"]].tensor("model.embed_tokens.weight")[ids].float()
        cos, sin = MistralStaticRotary(config)((masks.cumsum(-1) - 1).clamp(min=0), torch.float32)
        start = time.monotonic()
        for index in range(config.num_hidden_layers):
            layer_print = hashlib.sha256(json.dumps({**fingerprint, "layer": index}, sort_keys=True).encode())
            partial = partial_dir / f"layer-{index:03d}.safetensors"
            layer = layer_from_checkpoint(config, shards, mapping, index, device)
            found = valid_partial(partial, layer_print.hexdigest(), index)
            if found is None:
                down = f"model.layers.{index}.mlp.down_proj.weight"
                layer_entries, layer_figures = quantize_layer(layer, index, hidden, cos, sin, masks, settings,
                                                              device, shards[mapping[down]].dtype(down))
                record = {"fingerprint": layer_print.hexdigest(), "figures": layer_figures}
                partial_dir.mkdir(parents=True, exist_ok=True)
                with atomic_path(partial) as tmp:
                    save_file(layer_entries, str(tmp), metadata={"record": json.dumps(record, sort_keys=True)})
                found = layer_entries, record
            saved, record = found
            entries.update(saved)
            figures[index] = record["figures"]
            set_dequantized(layer, saved, index, ALL_PROJECTIONS)
            run_layer(layer, hidden, cos, sin, masks, device)
            if not torch.isfinite(hidden).all():
                raise InputError(f"layer {index}: its outputs on the calibration samples are not finite "
                                 f"(check the weights of model.layers.{index} in {patched})")
            elapsed = time.monotonic() - start
            LOG.info("layer %d/%d done (%.1f s, about %.0f s left)", index + 1, config.num_hidden_layers, elapsed,
                     elapsed / (index + 1) * (config.num_hidden_layers - index - 1))
    return entries, figures, device


def quantize_gptq(model, patched, calibration, folder, settings):
    patched, folder = Path(patched), Path(folder)
    calibration = [Path(path) for path in calibration]
    record = {**quantization_record("gptq-int8", settings),
              "gptq": {key: settings[key] for key in ("block_size", "damp", "act_order", "nsamples")},
              "calibration": [path.stem for path in calibration]}
    fingerprint = {"patched_manifest_sha256": sha256_file(patched / MANIFEST_NAME), "settings": record,
                   "calibration_sha256": {path.name: sha256_file(path) for path in calibration},
                   "code": sources_digest("workflow_scripts.quantize_gptq")}
    partial_dir = folder.parent / f".{folder.name}.partial"
    entries, figures, device = gptq_layers(model, patched, calibration, settings, partial_dir, fingerprint)

    def from_partials(shard, name, writer):
        q, scale = entries[name], entries[f"{name}_scale"]
        writer.write(q)
        writer.write(scale)
        error = MatrixError()
        error.add(shard.tensor(name), q, scale)
        return error.figures()

    write_quantized_checkpoint(model, record, patched, folder, from_partials, "workflow_scripts.quantize_gptq",
                               extra_fingerprint={"calibration_sha256": fingerprint["calibration_sha256"]},
                               extra_manifest={"layers": figures, "device": device})
    shutil.rmtree(partial_dir, ignore_errors=True)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--patched", required=True, type=Path)
    parser.add_argument("--calibration", required=True, nargs="+", type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--settings", required=True, type=json.loads)
    args = parser.parse_args(argv)
    keep_freed_chunks()
    quantize_gptq(args.model, args.patched, args.calibration, args.manifest.parent, args.settings)


if __name__ == "__main__":
    run_cli(main)
