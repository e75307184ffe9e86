"""Stage 4, quantize: int8 checkpoints under ``results/{model}/quantized/{scheme}/``, streamed.

Scheme ``rtn-int8``: every q/k/v/o/gate/up/down projection is rounded per
output channel (symmetric, ``scale = max|W| / 127`` over the input dimension,
round to nearest) by the same function the patched model's ``quantize(8)``
uses, so the file is bit-identical to quantizing in memory. Embeddings, norms
and ``lm_head`` are copied byte for byte.

Memory stays bounded by a few chunks, whatever the model size: the source
shards are memory-mapped, each projection is processed in chunks of rows whose
pages are released once done, and each output shard is written as it is
produced (its header is known in advance: every output dtype and shape follows
from the input's). The result is a complete checkpoint that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads as
the int8 model; the manifest carries the fingerprint of its inputs and, per
matrix, the relative Frobenius error and the largest error in units of the
row's scale.

Usage: python -m workflow_scripts.quantize --model ID --scheme rtn-int8 --patched DIR --manifest PATH
           --settings JSON
"""
import argparse
import ctypes
import json
import math
import shutil
import time
from pathlib import Path

import torch

from .checkpoint import INDEX_FILE, read_weight_map
from .checkpoint_files.quantization_vacc import quantize_per_channel
from .common import (
    LOG,
    MANIFEST_NAME,
    InputError,
    atomic_write_json,
    link_file,
    read_json,
    run_cli,
    sha256_file,
    staged_directory,
    write_folder_manifest,
)
from .mistral_layout import tensor_shapes
from .safetensors_stream import BackgroundWriter, SafetensorsFile, SafetensorsWriter
from .sources import sources_digest
from .vacc_code import VACC_FILES

QUANTIZATION_KEY = "vacc_quantization"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 per step: large enough to vectorise, small enough to stay in cache
COPY_BYTES = 64 << 20
MAX_ERROR_IN_SCALE_UNITS = 0.5


def projection_of(name, modules):
    """The projection a tensor name is the weight of, when it is one of ``modules``."""
    parts = name.split(".")
    if len(parts) == 6 and parts[0] == "model" and parts[1] == "layers" and parts[5] == "weight" \
            and parts[4] in modules:
        return parts[4]
    return None


def weight_map(folder):
    """``{tensor: shard file}`` from the index, or from the single ``model.safetensors``."""
    index = folder / INDEX_FILE
    if index.exists():
        return read_weight_map(index)
    single = folder / "model.safetensors"
    if not single.exists():
        raise InputError(f"{folder}: has neither model.safetensors.index.json nor model.safetensors")
    with SafetensorsFile(single) as handle:
        return dict.fromkeys(handle.entries, single.name)


def check_tensors(folder, mapping, shards, config, modules):
    """Every tensor the config implies is present with its shape; projections are floating point."""
    expected = tensor_shapes(config)
    index = folder / "model.safetensors.index.json"
    for name, shape in expected.items():
        if name not in mapping:
            raise InputError(f"{index}: has no tensor {name} (a missing layer, or not Mistral's module names)")
        shard = shards[mapping[name]]
        if name not in shard.entries:
            raise InputError(f"{shard.path}: lacks tensor {name}, which the index places there")
        if shard.shape(name) != tuple(shape):
            raise InputError(f"{shard.path}: tensor {name} has shape {list(shard.shape(name))}, expected "
                             f"{list(shape)} from config.json")
        if projection_of(name, modules) and not shard.dtype(name).is_floating_point:
            raise InputError(f"{shard.path}: tensor {name} has dtype {shard.dtype(name)}, expected a float "
                             "weight (is this checkpoint already quantized?)")


class MatrixError:
    """Accumulates the quantization error of one matrix over its chunks, in few passes over memory."""

    def __init__(self):
        self.error_sq = self.weight_sq = 0.0
        self.max_units = 0.0

    def add(self, weight, q, scale):
        w = weight.to(torch.float32)
        divisor = scale.float().masked_fill(scale == 0, 1.0).unsqueeze(1)
        units = (w / divisor).sub_(q.to(torch.float32))  # each element's rounding error in scale units
        row_error_sq = torch.linalg.vector_norm(units, dim=1).square_() * scale.float().square()
        self.error_sq += float(row_error_sq.double().sum())
        self.weight_sq += float(torch.linalg.vector_norm(w).double().square())
        low, high = torch.aminmax(units)
        self.max_units = max(self.max_units, float(high), -float(low))

    def figures(self):
        relative = math.sqrt(self.error_sq / self.weight_sq) if self.weight_sq else 0.0
        return {"relative_frobenius_error": relative, "max_error_in_scale_units": self.max_units}


def quantize_matrix(shard, name, writer, bits):
    """Stream one projection: int8 rows, then its scales; return its error figures."""
    weight = shard.tensor(name)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    scales, error = [], MatrixError()
    for first in range(0, weight.shape[0], rows):
        chunk = weight[first:first + rows]
        q, scale = quantize_per_channel(chunk, bits)
        writer.write(q)  # q is a new tensor: the source pages can go as soon as the error is measured
        scales.append(scale)
        error.add(chunk, q, scale)
        shard.release(name, first * weight.shape[1], (first + len(chunk)) * weight.shape[1])
    writer.write(torch.cat(scales))
    figures = error.figures()
    if not figures["max_error_in_scale_units"] <= MAX_ERROR_IN_SCALE_UNITS:
        raise RuntimeError(f"{shard.path}: {name} rounds with an error of {figures['max_error_in_scale_units']} "
                           "scale units, more than 0.5: the quantizer is broken")
    return figures


def copy_tensor(shard, name, writer):
    raw = shard.raw(name)
    for first in range(0, len(raw), COPY_BYTES):
        end = min(first + COPY_BYTES, len(raw))
        writer.write(raw[first:end], lambda first=first, end=end: shard.release_bytes(name, first, end))


def output_layout(shard, names, modules):
    layout = []
    for name in names:
        if projection_of(name, modules):
            layout.append((name, torch.int8, shard.shape(name)))
            layout.append((f"{name}_scale", shard.dtype(name), shard.shape(name)[:1]))
        else:
            layout.append((name, shard.dtype(name), shard.shape(name)))
    return layout


def quantize_shard(shard, names, target, modules, matrix_writer, progress):
    """Write one output shard; ``matrix_writer(shard, name, writer)`` writes each projection and returns
    its figures. Return ``{matrix: figures}``."""
    names = sorted(names, key=lambda name: shard.entries[name]["data_offsets"][0])
    writer = BackgroundWriter(SafetensorsWriter(target, output_layout(shard, names, modules),
                                                metadata={"format": "pt"}))
    figures = {}
    for index, name in enumerate(names):
        if index + 1 < len(names):
            shard.prefetch(names[index + 1])
        if projection_of(name, modules):
            figures[name] = matrix_writer(shard, name, writer)
        else:
            copy_tensor(shard, name, writer)
        progress(shard.raw(name).nbytes)
    writer.close()
    return figures


def quantization_record(scheme, settings):
    return {"scheme": scheme, "bits": settings["bits"], "granularity": "per_channel", "symmetric": True,
            "modules": list(settings["modules"])}


def progress_logger(total_bytes):
    start, done, last = time.monotonic(), [0], [0.0]

    def report(nbytes):
        done[0] += nbytes
        now = time.monotonic() - start
        if now - last[0] >= 10 or done[0] == total_bytes:
            last[0] = now
            rate = done[0] / max(now, 1e-9)
            LOG.info("%.1f of %.1f GB (%.0f%%), %.2f GB/s, about %.0f s left", done[0] / 1e9, total_bytes / 1e9,
                     100 * done[0] / total_bytes, rate / 1e9, (total_bytes - done[0]) / max(rate, 1))
    return report


def quantize_checkpoint(model, scheme, patched, folder, settings):
    """The ``rtn-int8`` checkpoint of a patched one."""
    if scheme != "rtn-int8":
        raise InputError(f"model {model}: unknown quantization scheme {scheme!r}")
    record = quantization_record(scheme, settings)

    def rounded(shard, name, writer):
        return quantize_matrix(shard, name, writer, settings["bits"])

    write_quantized_checkpoint(model, record, patched, folder, rounded, "workflow_scripts.quantize")


def open_checkpoint(patched, model, modules):
    """``(config, {tensor: shard name}, {shard name: SafetensorsFile})`` of a checked patched checkpoint."""
    config = read_json(patched / "config.json", what=f"model {model}: config")
    mapping = weight_map(patched)
    shards = {name: SafetensorsFile(patched / name) for name in sorted(set(mapping.values()))}
    check_tensors(patched, mapping, shards, config, modules)
    return config, mapping, shards


def write_quantized_checkpoint(model, record, patched, folder, matrix_writer, code_module,
                               extra_fingerprint=None, extra_manifest=None):
    """Stream a quantized copy of ``patched`` into ``folder``; ``matrix_writer`` supplies each projection."""
    patched, modules = Path(patched), tuple(record["modules"])
    config, mapping, shards = open_checkpoint(patched, model, modules)
    shard_names = sorted(shards)
    fingerprint = {"patched_manifest_sha256": sha256_file(patched / MANIFEST_NAME), "settings": record,
                   "code": sources_digest(code_module), **(extra_fingerprint or {})}
    total = sum(sum(shards[s].raw_size(n) for n in shards[s].entries) for s in shard_names)
    report = progress_logger(total)
    figures = {}
    with staged_directory(folder) as staging:
        for shard_name in shard_names:
            names = [name for name, shard in mapping.items() if shard == shard_name]
            with shards[shard_name] as shard:
                figures.update(quantize_shard(shard, names, staging / shard_name, modules, matrix_writer, report))
        new_map = {}
        for name, shard in mapping.items():
            new_map[name] = shard
            if projection_of(name, modules):
                new_map[f"{name}_scale"] = shard
        total_size = sum((staging / name).stat().st_size for name in shard_names)
        atomic_write_json(staging / "model.safetensors.index.json",
                          {"metadata": {"total_size": total_size}, "weight_map": new_map})
        for name in ("config.json", "config_vacc.json"):
            atomic_write_json(staging / name, {**read_json(patched / name), QUANTIZATION_KEY: record})
        for name in VACC_FILES:
            shutil.copyfile(patched / name, staging / name)
        patched_manifest = read_json(patched / MANIFEST_NAME)
        written = {"config.json", "config_vacc.json", "model.safetensors.index.json", *VACC_FILES, *shard_names}
        for name in patched_manifest["files"]:
            if name not in written and "/" not in name and name != "verify.json":
                link_file(patched / name, staging / name)
        worst = max(figures.values(), key=lambda f: f["relative_frobenius_error"])
        write_folder_manifest(staging, {"model": model, "scheme": record["scheme"], "fingerprint": fingerprint,
                                        "quantization": record, "matrices": figures,
                                        "worst_relative_frobenius_error": worst["relative_frobenius_error"],
                                        **(extra_manifest or {})})
    LOG.info("model %s: %s checkpoint in %s (%d matrices; worst relative error %.4g)", model, record["scheme"],
             folder, len(figures), worst["relative_frobenius_error"])


def keep_freed_chunks():
    """Ask glibc to keep freed chunk-sized blocks instead of unmapping them.

    By default it returns every freed block of more than 128 kB to the kernel,
    so each chunk's temporaries page-fault afresh; keeping them doubled the
    quantizer's throughput here. A no-op where the C library is not glibc.
    """
    m_trim_threshold, m_mmap_threshold = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(m_mmap_threshold, 256 << 20)
    libc.mallopt(m_trim_threshold, 512 << 20)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--patched", required=True, type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--settings", required=True, type=json.loads)
    args = parser.parse_args(argv)
    keep_freed_chunks()
    quantize_checkpoint(args.model, args.scheme, args.patched, args.manifest.parent, args.settings)


if __name__ == "__main__":
    run_cli(main)
