"""The GPTQ inner block as one Triton kernel, for CUDA devices.

:func:`workflow_scripts.quantization.gptq.round_block_reference` walks a block's columns in
order, and each column costs about ten small PyTorch launches: on a GPU that
loop is launch-bound (about 4.5 s of a 7B layer's 4.8 s). Rows are
independent, so here each program keeps ``ROWS`` rows of the block in
registers and walks all the columns itself: one launch per block of columns.
Only this module imports Triton, and only CUDA runs import this module.
"""

import torch
import triton
import triton.language as tl

ROWS = 16
# widest block one program holds; wider blocks are split, which GPTQ's algebra allows
MAX_COLUMNS = 128
# 1.5 * 2**23: adding then subtracting it rounds a float32 of magnitude below 2**22
# to the nearest integer, ties to even as torch.round does; larger values are clamped anyway
ROUNDING_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _round_block_kernel(
    block_ptr,
    inverse_ptr,
    divisor_ptr,
    rounded_ptr,
    errors_ptr,
    rows,
    width,
    qmax,
    ROWS: tl.constexpr,
    COLUMNS: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    column = tl.arange(0, COLUMNS)
    row_ok = row < rows
    column_ok = column < width
    offsets = row[:, None] * width + column[None, :]
    mask = row_ok[:, None] & column_ok[None, :]
    tile = tl.load(block_ptr + offsets, mask=mask, other=0.0)
    divisor = tl.load(divisor_ptr + row, mask=row_ok, other=1.0)
    rounded = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
    errors = tl.zeros([ROWS, COLUMNS], dtype=tl.float32)
    for j in range(width):
        here = column[None, :] == j
        inverse_row = tl.load(inverse_ptr + j * width + column, mask=column_ok, other=0.0)
        pivot = tl.load(inverse_ptr + j * width + j)
        values = tl.sum(tl.where(here, tile, 0.0), axis=1)
        q = (tl.math.div_rn(values, divisor) + ROUNDING_MAGIC) - ROUNDING_MAGIC
        q = tl.minimum(tl.maximum(q, -qmax), qmax)
        error = tl.math.div_rn(values - q * divisor, pivot)
        # the factor is upper triangular: columns before j receive zeros
        tile = tile - error[:, None] * inverse_row[None, :]
        rounded = tl.where(here, q[:, None], rounded)
        errors = tl.where(here, error[:, None], errors)
    tl.store(rounded_ptr + offsets, rounded, mask=mask)
    tl.store(errors_ptr + offsets, errors, mask=mask)


def round_block_fused(block, inverse, divisor, qmax):
    """Same contract as ``round_block_reference``: ``(rounded, scaled errors)`` of a float32 block."""
    rows, width = block.shape
    if width > MAX_COLUMNS:
        return _split_block(block, inverse, divisor, qmax)
    block, inverse = block.contiguous(), inverse.contiguous()
    rounded = torch.empty_like(block)
    errors = torch.empty_like(block)
    divisor = divisor.reshape(-1).contiguous()
    _round_block_kernel[(triton.cdiv(rows, ROWS),)](
        block,
        inverse,
        divisor,
        rounded,
        errors,
        rows,
        width,
        float(qmax),
        ROWS=ROWS,
        COLUMNS=max(16, triton.next_power_of_2(width)),
        num_warps=4,
    )
    return rounded, errors


def _split_block(block, inverse, divisor, qmax):
    rounded, errors = torch.empty_like(block), torch.empty_like(block)
    width = block.shape[1]
    for start in range(0, width, MAX_COLUMNS):
        end = min(start + MAX_COLUMNS, width)
        rounded[:, start:end], errors[:, start:end] = round_block_fused(
            block[:, start:end], inverse[start:end, start:end], divisor, qmax
        )
        block[:, end:].addmm_(errors[:, start:end], inverse[start:end, end:], alpha=-1.0)
    return rounded, errors
