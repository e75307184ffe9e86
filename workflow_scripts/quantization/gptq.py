"""GPTQ (Frantar et al., 2022) for per-output-channel symmetric int8 weights: the core algorithm.

The Hessian of a projection's inputs and the column-by-column rounding with
Cholesky-based error compensation. The per-channel scale is the
round-to-nearest one (``max|W| / 127`` of the original row, in the weight's
dtype), so with a diagonal Hessian no error is propagated and GPTQ gives
exactly the ``rtn-int8`` weights.

Rows are independent given the Hessian, so the projections that share an
input (q/k/v, gate/up) are rounded as one stacked matrix: one Cholesky
factorisation and one column loop instead of two or three. Within a block of
columns the loop is strictly sequential; on a GPU it runs as one fused kernel
per block (:mod:`workflow_scripts.quantization.gptq_kernels`), elsewhere as the plain
PyTorch loop below, which is also the kernel's reference.
"""

import contextlib

import torch

from workflow_scripts.checkpoint.vacc_files.quantization_vacc import QMAX, per_channel_scale


class Hessian:
    """Running ``2/n * sum(x x^T)`` over the rows of the inputs a projection sees.

    float64 on the CPU. On a GPU float32: half-precision activations are
    multiplied on the tensor cores with float32 accumulation and output, which
    is exact for the products (a bf16 or fp16 product fits a float32).
    """

    def __init__(self, columns, device="cpu"):
        self.dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
        self.matrix = torch.zeros(columns, columns, dtype=self.dtype, device=device)
        self.rows = 0

    def add(self, inputs, first_token_weight=1.0):
        """Accumulate ``inputs`` ``[batch, tokens, columns]``; the first token of each row counts
        ``first_token_weight`` times (its rows are scaled by the square root)."""
        if first_token_weight != 1.0:
            inputs = inputs.clone()
            inputs[:, 0] *= first_token_weight**0.5
        x = inputs.reshape(-1, inputs.shape[-1])
        total = self.rows + x.shape[0]
        keep, alpha = self.rows / total, 2.0 / total
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            self.matrix = torch.addmm(self.matrix, x.T, x, beta=keep, alpha=alpha, out_dtype=self.dtype)
        else:
            x = x.to(self.dtype)
            self.matrix.mul_(keep).addmm_(x.T, x, alpha=alpha)
        self.rows = total


@contextlib.contextmanager
def figure_precision(device):
    """TF32 products on CUDA for the duration (restored after): for error figures, where a relative
    precision of about 1e-3 is plenty and float32 products cost three times as long."""
    if device.type != "cuda":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def inverse_factor(hessian, damp, order):
    """Upper Cholesky factor of the dampened inverse Hessian, columns in ``order``; float32."""
    h = hessian[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def round_block_reference(block, inverse, divisor, qmax):
    """``(rounded, scaled errors)`` of one block of columns, in place on ``block``: the sequential loop."""
    rounded = torch.empty_like(block)
    errors = torch.empty_like(block)
    divisor = divisor[:, 0]
    for column in range(block.shape[1]):
        values = block[:, column]
        rounded[:, column] = torch.round(values / divisor).clamp_(-qmax, qmax)
        error = (values - rounded[:, column] * divisor) / inverse[column, column]
        block[:, column:] -= error.unsqueeze(1) * inverse[column, column:].unsqueeze(0)
        errors[:, column] = error
    return rounded, errors


def round_block(block, inverse, divisor, qmax):
    if block.is_cuda:
        from workflow_scripts.quantization.gptq_kernels import round_block_fused

        return round_block_fused(block, inverse, divisor, qmax)
    return round_block_reference(block, inverse, divisor, qmax)


def gptq_quantize(weight, hessian, bits=8, block_size=128, damp=0.01, act_order=False):
    """``(int8 weight, scale)`` of ``weight`` ``[out, in]`` rounded by GPTQ under ``hessian`` ``[in, in]``.

    ``weight`` may be several projections' rows stacked; each row's result is
    the same as if it were rounded alone.
    """
    qmax = QMAX[bits]
    w = weight.detach().to(torch.float32, copy=True)
    scale, divisor = per_channel_scale(w, weight.dtype, bits)
    h = hessian.detach().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # inputs that are always zero: their weights never matter
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1], device=w.device)
    w = w[:, order]
    inverse = inverse_factor(h, damp, order)
    q = torch.empty_like(w)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        q[:, start:end], errors = round_block(w[:, start:end], inverse[start:end, start:end], divisor, qmax)
        w[:, end:].addmm_(errors, inverse[start:end, end:], alpha=-1.0)
    q = q[:, torch.argsort(order)]
    return q.to(torch.int8), scale


def output_error(weight, q, scale, hessian):
    """``tr((W - Q) H (W - Q)^T)``: the squared output error the Hessian predicts."""
    delta = weight.to(hessian.dtype) - q.to(hessian.dtype) * scale.to(hessian.dtype).unsqueeze(1)
    with figure_precision(delta.device):
        return float(((delta @ hessian) * delta).sum())
