"""Round-to-nearest int8: each projection rounded per output channel by the patched model's own quantizer."""

import torch

from workflow_scripts.checkpoint.vacc_files.quantization_vacc import quantize_per_channel
from workflow_scripts.core.errors import InputError
from workflow_scripts.quantization.int8_checkpoint import MatrixError, quantization_record, write_quantized_checkpoint

CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 per step: large enough to vectorise, small enough to stay in cache


MAX_ERROR_IN_SCALE_UNITS = 0.5


def quantize_matrix(shard, name, writer, bits):
    """Stream one projection: int8 rows, then its scales; return its error figures."""
    weight = shard.tensor(name)
    rows = max(1, CHUNK_ELEMENTS // weight.shape[1])
    scales, error = [], MatrixError()
    for first in range(0, weight.shape[0], rows):
        chunk = weight[first : first + rows]
        q, scale = quantize_per_channel(chunk, bits)
        writer.write(q)  # q is a new tensor: the source pages can go as soon as the error is measured
        scales.append(scale)
        error.add(chunk, q, scale)
        shard.release(name, first * weight.shape[1], (first + len(chunk)) * weight.shape[1])
    writer.write(torch.cat(scales))
    figures = error.figures()
    if not figures["max_error_in_scale_units"] <= MAX_ERROR_IN_SCALE_UNITS:
        raise RuntimeError(
            f"{shard.path}: {name} rounds with an error of {figures['max_error_in_scale_units']} "
            "scale units, more than 0.5: the quantizer is broken"
        )
    return figures


def quantize_checkpoint(model, scheme, patched, folder, settings, code_module):
    """The ``rtn-int8`` checkpoint of a patched one; ``code_module``, the stage that runs this, fingerprints the
    code."""
    if scheme != "rtn-int8":
        raise InputError(f"model {model}: unknown quantization scheme {scheme!r}")
    record = quantization_record(scheme, settings)

    def rounded(shard, name, writer):
        return quantize_matrix(shard, name, writer, settings.bits)

    write_quantized_checkpoint(model, record, patched, folder, rounded, code_module)
