"""An int8 checkpoint in the compressed-tensors format, which stock transformers and vLLM load.

Ours and compressed-tensors' symmetric per-channel int8 both dequantize as
``q * scale``, so the integers and scales carry over exactly: each projection's
int8 ``weight`` is packed four to an int32 (``weight_packed``, the
``pack-quantized`` format that vLLM accepts for weight-only int8; transformers
unpacks it), its ``[out]`` scale becomes ``weight_scale`` shaped ``[out, 1]``,
and ``weight_shape`` records the matrix's shape. The packing and the
``quantization_config`` come from compressed-tensors itself. Everything else is
copied byte for byte; the config is the model's own stock Mistral config (no
``auto_map``, no VACC code), so no ``trust_remote_code`` is needed.
"""

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from workflow_scripts.checkpoint.folder import INDEX_FILE, write_weight_index
from workflow_scripts.checkpoint.safetensors_stream import BackgroundWriter, SafetensorsFile, SafetensorsWriter
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
from workflow_scripts.quantization.int8_checkpoint import (
    PROJECTIONS,
    QUANTIZATION_KEY,
    SHARD_METADATA,
    copy_tensor,
    safetensors_bytes,
    weight_map,
)

LOG = logging.getLogger(__name__)

FORMAT = "pack-quantized"
ROWS_ELEMENTS = 1 << 22  # int8 elements packed per step: bounded memory for any matrix size
SCALE_SUFFIX = "_scale"


@dataclass(frozen=True)
class Int8Matrix:
    """One quantized projection of the source: ``{prefix}.weight`` (int8) and ``{prefix}.weight_scale``."""

    prefix: str

    @property
    def weight(self):
        return f"{self.prefix}.weight"

    @property
    def scale(self):
        return f"{self.prefix}.weight{SCALE_SUFFIX}"


def quantization_config(record, config):
    """The ``quantization_config`` compressed-tensors writes for symmetric per-channel int8 weights, 16-bit
    activations; the projections the scheme left in float are named in ``ignore``, as is ``lm_head``."""
    import compressed_tensors
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    weights = QuantizationArgs(num_bits=record["bits"], type="int", symmetric=True, strategy="channel")
    unquantized = [
        f"model.layers.{layer}.{module_path(module)}"
        for layer in range(config["num_hidden_layers"])
        for module in PROJECTIONS
        if module not in record["modules"]
    ]
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, format=FORMAT)
    settings = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=["lm_head", *unquantized],
        format=FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
    )
    return {
        "version": compressed_tensors.__version__,
        "quant_method": "compressed-tensors",
        "sparsity_config": {},
        "transform_config": {},
        **settings.model_dump(exclude=["quant_method"]),
    }


def module_path(projection):
    return f"{'self_attn' if projection.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{projection}"


def stock_config(config, record):
    """The int8 folder's config as stock transformers reads it: Mistral's own keys and the quantization."""
    stock = {key: value for key, value in config.items() if key not in ("auto_map", QUANTIZATION_KEY)}
    return {**stock, "model_type": "mistral", "quantization_config": quantization_config(record, config)}


def int8_matrices(shard):
    """The quantized projections in one source shard (each int8 weight with its scale)."""
    matrices = []
    for name in shard.entries:
        if name.endswith(f".weight{SCALE_SUFFIX}"):
            matrix = Int8Matrix(name[: -len(f".weight{SCALE_SUFFIX}")])
            if matrix.weight not in shard.entries or shard.dtype(matrix.weight) != torch.int8:
                raise InputError(f"{shard.path}: {name} has no int8 {matrix.weight} beside it in the same shard")
            matrices.append(matrix)
    return {matrix.weight: matrix for matrix in matrices}


def output_layout(shard, names, matrices):
    """The output shard's layout for the source's tensors ``names`` (in the source's order)."""
    layout = []
    for name in names:
        matrix = matrices.get(name)
        if matrix is None:
            if not name.endswith(f".weight{SCALE_SUFFIX}"):
                layout.append((name, shard.dtype(name), shard.shape(name)))
            continue
        rows, columns = shard.shape(name)
        layout.append((f"{matrix.prefix}.weight_packed", torch.int32, (rows, -(-columns // 4))))
        layout.append((f"{matrix.prefix}.weight_scale", shard.dtype(matrix.scale), (rows, 1)))
        layout.append((f"{matrix.prefix}.weight_shape", torch.int64, (2,)))
    return layout


def write_packed(shard, matrix, writer, bits):
    from compressed_tensors.compressors import pack_to_int32

    q = shard.tensor(matrix.weight)
    rows = max(1, ROWS_ELEMENTS // q.shape[1])
    for first in range(0, q.shape[0], rows):
        chunk = q[first : first + rows]
        writer.write(pack_to_int32(chunk.clone(), bits))
        shard.release(matrix.weight, first * q.shape[1], (first + len(chunk)) * q.shape[1])
    writer.write(shard.tensor(matrix.scale).reshape(-1, 1).clone())
    writer.write(torch.tensor(q.shape, dtype=torch.int64))


def shard_layout(shard, names):
    """``(names in the source's order, the int8 matrices among them, the output shard's layout)``."""
    matrices = int8_matrices(shard)
    names = sorted(names, key=lambda name: shard.entries[name]["data_offsets"][0])
    return names, matrices, output_layout(shard, names, matrices)


def exported_bytes(int8, mapping, shards):
    """The bytes the export of ``int8`` takes, known before it is written: its shards exactly, from the source
    tensors' shapes and dtypes; the config and the index as the source's (the config gains its
    ``quantization_config``). The other files are links, which take no data."""
    total = 0
    for shard_name, shard in shards.items():
        total += safetensors_bytes(shard_layout(shard, [n for n, s in mapping.items() if s == shard_name])[2])
    return total + sum((int8 / name).stat().st_size for name in ("config.json", INDEX_FILE) if (int8 / name).exists())


def export_shard(shard, names, target, bits, progress):
    """Write one output shard in the source's tensor order; return ``{output tensor: shard file}``."""
    names, matrices, layout = shard_layout(shard, names)
    with writing(target, safetensors_bytes(layout)):
        writer = BackgroundWriter(SafetensorsWriter(target, layout, metadata=SHARD_METADATA))
        for name in names:
            if name in matrices:
                write_packed(shard, matrices[name], writer, bits)
            elif not name.endswith(f".weight{SCALE_SUFFIX}"):
                copy_tensor(shard, name, writer)
            progress(shard.raw(name).nbytes)
        writer.close()
    return {name: target.name for name, _, _ in layout}


def export_compressed_tensors(model, int8, folder, code_module):
    """Write ``folder``: the compressed-tensors checkpoint of the int8 checkpoint ``int8``; ``code_module``, the
    stage that runs this, fingerprints the code."""
    int8, folder = Path(int8), Path(folder)
    config = read_json(int8 / "config.json", what=f"model {model}: int8 config")
    record = config.get(QUANTIZATION_KEY)
    if not record:
        raise InputError(f"model {model}: {int8 / 'config.json'} has no {QUANTIZATION_KEY}: not an int8 checkpoint")
    mapping = weight_map(int8)
    shard_names = sorted(set(mapping.values()))
    shards = {name: SafetensorsFile(int8 / name) for name in shard_names}
    total = sum(sum(shard.raw_size(n) for n in shard.entries) for shard in shards.values())
    progress = Progress(f"model {model}: compressed-tensors", total, " GB", 1e9)
    with staged_directory(folder) as staging:
        check_free_space(folder, exported_bytes(int8, mapping, shards))
        new_map = {}
        for shard_name in shard_names:
            names = [name for name, shard in mapping.items() if shard == shard_name]
            with shards[shard_name] as shard:
                new_map.update(export_shard(shard, names, staging / shard_name, record["bits"], progress.advance))
        write_weight_index(staging, new_map, sum((staging / name).stat().st_size for name in shard_names))
        atomic_write_json(staging / "config.json", stock_config(config, record))
        written = {"config.json", "config_vacc.json", INDEX_FILE, MANIFEST_NAME, *VACC_FILES, *shard_names}
        for name in read_json(int8 / MANIFEST_NAME)["files"]:
            if name not in written and "/" not in name:
                link_file(int8 / name, staging / name)
        write_folder_manifest(
            staging,
            {
                "model": model,
                "scheme": record["scheme"],
                "format": f"compressed-tensors {FORMAT}",
                "fingerprint": {
                    "int8_manifest_sha256": sha256_file(int8 / MANIFEST_NAME),
                    "code": sources_digest(code_module),
                },
            },
        )
    LOG.info("model %s: %s as compressed-tensors (%s) in %s", model, record["scheme"], FORMAT, folder)
