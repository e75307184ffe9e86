"""GPTQ (Frantar et al., 2022) for per-output-channel symmetric int8 weights: the core algorithm.

Groundwork for the ``gptq-int8`` scheme: the Hessian of a projection's inputs
and the column-by-column rounding with Cholesky-based error compensation. The
per-channel scale is the round-to-nearest one (``max|W| / 127`` of the original
row, in the weight's dtype), so with a diagonal Hessian no error is propagated
and GPTQ gives exactly the ``rtn-int8`` weights.
"""
import torch

from .checkpoint_files.quantization_vacc import QMAX, per_channel_scale


class Hessian:
    """Running ``2/n * sum(x x^T)`` over the rows of the inputs a projection sees."""

    def __init__(self, columns, device="cpu"):
        self.matrix = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, inputs):
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        total = self.rows + x.shape[0]
        self.matrix.mul_(self.rows / total)
        self.matrix.addmm_(x.T, x, alpha=2.0 / total)
        self.rows = total


def gptq_quantize(weight, hessian, bits=8, block_size=128, damp=0.01, act_order=False):
    """``(int8 weight, scale)`` of ``weight`` ``[out, in]`` rounded by GPTQ under ``hessian`` ``[in, in]``."""
    qmax = QMAX[bits]
    w = weight.detach().to(torch.float32, copy=True)
    scale, divisor = per_channel_scale(w, weight.dtype, bits)
    h = hessian.detach().to(torch.float64, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # inputs that are always zero: their weights never matter
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.shape[1])
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    q = torch.empty_like(w)
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        inv = inverse[start:end, start:end]
        for column in range(end - start):
            values = block[:, column]
            rounded = torch.round(values / divisor[:, 0]).clamp_(-qmax, qmax)
            q[:, start + column] = rounded
            error = (values - rounded * divisor[:, 0]) / inv[column, column]
            block[:, column:] -= error.unsqueeze(1) * inv[column, column:].unsqueeze(0)
            errors[:, column] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    q = q[:, torch.argsort(order)]
    return q.to(torch.int8), scale


def output_error(weight, q, scale, hessian):
    """``tr((W - Q) H (W - Q)^T)``: the squared output error the Hessian predicts for these weights."""
    delta = (weight.double() - q.double() * scale.double().unsqueeze(1))
    return float(torch.einsum("oi,ij,oj->", delta, hessian.double(), delta))
