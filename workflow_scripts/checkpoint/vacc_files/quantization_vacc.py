"""Per-output-channel symmetric int8 weight quantization for VACC.

Shipped inside the patched checkpoint and imported by ``modeling_mistral_vacc``.
``weight`` holds int8 values ``[out, in]`` and ``weight_scale`` one float per
output channel ``[out]`` in the original weight dtype; the forward pass
dequantizes and multiplies, and ONNX export emits the vendor's custom op.
"""

import torch
from torch import nn

QMAX = {8: 127}


def per_channel_scale(w: torch.Tensor, dtype: torch.dtype, bits: int = 8):
    """``(scale, divisor)`` of a float32 weight: ``max|W| / qmax`` per output row rounded to ``dtype``,
    and the float32 ``[rows, 1]`` divisor that rounding uses (1 where a row is all zeros, so no NaN)."""
    if bits not in QMAX:
        raise ValueError(f"weight_bit_width={bits} is not supported; VACC per-channel weights are int8 (8)")
    # max |W| per row as max(max, -min): two plain reductions beat abs().amax() and aminmax here
    scale = (torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_()) / QMAX[bits]).to(dtype)
    return scale, scale.float().masked_fill(scale == 0, 1.0).unsqueeze(1)


def quantize_per_channel(weight: torch.Tensor, bits: int = 8):
    """Return ``(int8 weight, scale)`` with ``scale = max|W| / qmax`` per output row.

    The scale is rounded to the weight's dtype first and the rounding uses that
    stored scale, so dequantizing the file reproduces exactly what was rounded.
    """
    w = weight.detach().to(torch.float32, copy=True)
    scale, divisor = per_channel_scale(w, weight.dtype, bits)
    qmax = QMAX[bits]
    return w.div_(divisor).round_().clamp_(-qmax, qmax).to(torch.int8), scale


def dequantize(weight, weight_scale, dtype):
    """The ``[out, in]`` weight in ``dtype``: each int8 row times its channel's scale."""
    return weight.to(dtype) * weight_scale.to(dtype).unsqueeze(1)


# PyTorch's int8 weight-only CPU kernel reads the weight with aligned vector loads: an int8 weight mapped from a
# safetensors file at an offset that is a multiple of 8 only crashes it (a segmentation fault, measured), so such a
# weight is copied once into memory the allocator aligns (:func:`aligned`).
ALIGNMENT = 64


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.data_ptr() % ALIGNMENT == 0 else tensor.clone()


def linear_int8(hidden, weight, weight_scale):
    """``hidden @ dequantize(weight, weight_scale)^T``. In bfloat16 on the CPU through PyTorch's int8 weight-only
    kernel, which multiplies the int8 rows directly and scales each output (several times faster than
    dequantizing first, and without rounding each dequantized weight to bfloat16); elsewhere dequantized."""
    if hidden.device.type == "cpu" and hidden.dtype == torch.bfloat16:
        flat = hidden.reshape(-1, hidden.shape[-1])
        product = torch.ops.aten._weight_int8pack_mm(flat, weight, weight_scale.to(hidden.dtype))
        return product.reshape(*hidden.shape[:-1], weight.shape[0])
    return nn.functional.linear(hidden, dequantize(weight, weight_scale, hidden.dtype))


class _QuantizedLinearPerChannelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, weight_scale):
        return linear_int8(hidden, weight, weight_scale)

    @staticmethod
    def symbolic(graph, hidden, weight, weight_scale):
        return graph.op("Vastai::QuantizedLinearPerChannel", hidden, weight, weight_scale)


class QuantizedLinearPerChannel(nn.Module):
    """A bias-free linear layer with int8 weights and one float scale per output channel."""

    def __init__(self, in_features: int, out_features: int, scale_dtype=torch.float32, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.weight_scale = nn.Parameter(
            torch.ones(out_features, dtype=scale_dtype, device=device), requires_grad=False
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8) -> "QuantizedLinearPerChannel":
        if linear.bias is not None:
            raise ValueError("per-channel int8 layers carry no bias; Mistral projections have none")
        layer = cls(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)
        q, scale = quantize_per_channel(linear.weight, bits)
        layer.weight.data = q
        layer.weight_scale.data = scale
        return layer

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.device.type == "cpu":
            self.weight.data = aligned(self.weight.data)
        return _QuantizedLinearPerChannelFunction.apply(hidden, self.weight, self.weight_scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits=8, per_channel=True"
