"""The int8 checkpoint both quantizers write, streamed shard by shard with bounded memory.

RTN and GPTQ differ only in how each projection's int8 rows and scales are
made (their ``matrix_writer``); this module checks the patched checkpoint's
tensors, copies everything else byte for byte, writes the shards, the index,
the configs with the ``vacc_quantization`` key, and the manifest.
"""

import ctypes
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from workflow_scripts.checkpoint.folder import INDEX_FILE, read_weight_map, write_weight_index
from workflow_scripts.checkpoint.layout import tensor_shapes
from workflow_scripts.checkpoint.safetensors_stream import NAMES, BackgroundWriter, SafetensorsFile, SafetensorsWriter
from workflow_scripts.checkpoint.vacc_code import VACC_FILES
from workflow_scripts.core.code_inputs import sources_digest
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import (
    atomic_write_json,
    check_free_space,
    link_file,
    read_json,
    sha256_file,
    staged_directory,
    writing,
)
from workflow_scripts.core.manifest import MANIFEST_NAME, write_folder_manifest
from workflow_scripts.core.progress import Progress
from workflow_scripts.core.settings import Settings

LOG = logging.getLogger(__name__)

QUANTIZATION_KEY = "vacc_quantization"
# Stock transformers knows "mistral": it would load the int8 integers into a float model and drop every
# weight_scale, silently. A model type it does not know makes its Auto classes and pipelines refuse and ask
# for trust_remote_code, which runs the VACC code that reads the scales. config_vacc.json, which only vamc's
# loader reads, keeps "mistral".
INT8_MODEL_TYPE = "mistral_vacc_int8"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COPY_BYTES = 64 << 20
SHARD_METADATA = {"format": "pt"}


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


@dataclass(frozen=True)
class QuantizeSettings(Settings):
    """``models.<id>.quantize.<scheme>``: what every int8 scheme reads."""

    bits: int
    modules: tuple[str, ...]


def quantization_record(scheme, settings):
    return {
        "scheme": scheme,
        "bits": settings.bits,
        "granularity": "per_channel",
        "symmetric": True,
        "modules": list(settings.modules),
    }


def open_checkpoint(patched, model, modules):
    """``(config, {tensor: shard name}, {shard name: SafetensorsFile})`` of a checked patched checkpoint."""
    config = read_json(patched / "config.json", what=f"model {model}: config")
    mapping = weight_map(patched)
    shards = {name: SafetensorsFile(patched / name) for name in sorted(set(mapping.values()))}
    check_tensors(patched, mapping, shards, config, modules)
    return config, mapping, shards


def write_quantized_checkpoint(
    model, record, patched, folder, matrix_writer, code_module, extra_fingerprint=None, extra_manifest=None
):
    """Stream a quantized copy of ``patched`` into ``folder``; ``matrix_writer`` supplies each projection."""
    patched, modules = Path(patched), tuple(record["modules"])
    config, mapping, shards = open_checkpoint(patched, model, modules)
    shard_names = sorted(shards)
    fingerprint = {
        "patched_manifest_sha256": sha256_file(patched / MANIFEST_NAME),
        "settings": record,
        "code": sources_digest(code_module),
        **(extra_fingerprint or {}),
    }
    total = sum(sum(shards[s].raw_size(n) for n in shards[s].entries) for s in shard_names)
    progress = Progress(f"model {model}: quantized", total, " GB", 1e9)
    figures = {}
    with staged_directory(folder) as staging:
        check_free_space(folder, quantized_bytes(patched, mapping, shards, modules))
        for shard_name in shard_names:
            names = [name for name, shard in mapping.items() if shard == shard_name]
            target = staging / shard_name
            with shards[shard_name] as shard:
                figures.update(quantize_shard(shard, names, target, modules, matrix_writer, progress.advance))
        new_map = {}
        for name, shard in mapping.items():
            new_map[name] = shard
            if projection_of(name, modules):
                new_map[f"{name}_scale"] = shard
        total_size = sum((staging / name).stat().st_size for name in shard_names)
        write_weight_index(staging, new_map, total_size)
        atomic_write_json(
            staging / "config.json",
            {**read_json(patched / "config.json"), "model_type": INT8_MODEL_TYPE, QUANTIZATION_KEY: record},
        )
        atomic_write_json(
            staging / "config_vacc.json", {**read_json(patched / "config_vacc.json"), QUANTIZATION_KEY: record}
        )
        for name in VACC_FILES:
            shutil.copyfile(patched / name, staging / name)
        patched_manifest = read_json(patched / MANIFEST_NAME)
        written = {"config.json", "config_vacc.json", INDEX_FILE, *VACC_FILES, *shard_names}
        for name in patched_manifest["files"]:
            if name not in written and "/" not in name and name != "verify.json":
                link_file(patched / name, staging / name)
        worst = max(figures.values(), key=lambda f: f["relative_frobenius_error"])
        write_folder_manifest(
            staging,
            {
                "model": model,
                "scheme": record["scheme"],
                "fingerprint": fingerprint,
                "quantization": record,
                "matrices": figures,
                "worst_relative_frobenius_error": worst["relative_frobenius_error"],
                **(extra_manifest or {}),
            },
        )
    LOG.info(
        "model %s: %s checkpoint in %s (%d matrices; worst relative error %.4g)",
        model,
        record["scheme"],
        folder,
        len(figures),
        worst["relative_frobenius_error"],
    )


def safetensors_bytes(layout, metadata=SHARD_METADATA):
    """The size of the file :class:`SafetensorsWriter` writes for ``layout``: its header (as the writer encodes
    it) and the data, known before any tensor is computed."""
    header, offset = {}, 0
    for name, dtype, shape in layout:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header = {"__metadata__": metadata, **header}
    encoded = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + encoded + -encoded % 8 + offset


def quantized_bytes(patched, mapping, shards, modules):
    """The bytes the quantized checkpoint of ``patched`` takes, known before it is written: its shards exactly,
    from the source tensors' shapes and dtypes; the copied VACC code; the configs and the index as the source's
    (they gain a few lines). The tokenizer files are links, which take no data."""
    total = 0
    for shard_name, shard in shards.items():
        names = [name for name, owner in mapping.items() if owner == shard_name]
        total += safetensors_bytes(shard_layout(shard, names, modules)[1])
    copied = ("config.json", "config_vacc.json", INDEX_FILE, *VACC_FILES)
    return total + sum((patched / name).stat().st_size for name in copied if (patched / name).exists())


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


def projection_of(name, modules):
    """The projection a tensor name is the weight of, when it is one of ``modules``."""
    parts = name.split(".")
    if (
        len(parts) == 6
        and parts[0] == "model"
        and parts[1] == "layers"
        and parts[5] == "weight"
        and parts[4] in modules
    ):
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
    index = folder / INDEX_FILE
    for name, shape in expected.items():
        if name not in mapping:
            raise InputError(f"{index}: has no tensor {name} (a missing layer, or not Mistral's module names)")
        shard = shards[mapping[name]]
        if name not in shard.entries:
            raise InputError(f"{shard.path}: lacks tensor {name}, which the index places there")
        if shard.shape(name) != tuple(shape):
            raise InputError(
                f"{shard.path}: tensor {name} has shape {list(shard.shape(name))}, expected "
                f"{list(shape)} from config.json"
            )
        if projection_of(name, modules) and not shard.dtype(name).is_floating_point:
            raise InputError(
                f"{shard.path}: tensor {name} has dtype {shard.dtype(name)}, expected a float "
                "weight (is this checkpoint already quantized?)"
            )


def copy_tensor(shard, name, writer):
    raw = shard.raw(name)
    for first in range(0, len(raw), COPY_BYTES):
        end = min(first + COPY_BYTES, len(raw))
        writer.write(raw[first:end], lambda first=first, end=end: shard.release_bytes(name, first, end))


def shard_layout(shard, names, modules):
    """``(names in the source's order, the output shard's layout)``: each projection as int8 with its scale."""
    names = sorted(names, key=lambda name: shard.entries[name]["data_offsets"][0])
    layout = []
    for name in names:
        if projection_of(name, modules):
            layout.append((name, torch.int8, shard.shape(name)))
            layout.append((f"{name}_scale", shard.dtype(name), shard.shape(name)[:1]))
        else:
            layout.append((name, shard.dtype(name), shard.shape(name)))
    return names, layout


def quantize_shard(shard, names, target, modules, matrix_writer, progress):
    """Write one output shard; ``matrix_writer(shard, name, writer)`` writes each projection and returns
    its figures. Return ``{matrix: figures}``."""
    names, layout = shard_layout(shard, names, modules)
    figures = {}
    with writing(target, safetensors_bytes(layout)):
        writer = BackgroundWriter(SafetensorsWriter(target, layout, metadata=SHARD_METADATA))
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
