"""The graphs a patched model runs as: one decoder layer, compiled once and run for every layer, and the head.

* layer: ``hidden [rows, tokens, hidden_size]``, each token's ``positions
  [rows, tokens]``, the rotary tables, the layer's key and value cache
  ``[rows, kv_heads, length, head_dim]`` and the layer's weights -> the new
  hidden states. It writes each token's key and value into the cache slot of
  its position (in place) and attends to the slots up to that position, so a
  row holds one sequence whose slot is its position: rows start, grow and
  end independently, a prompt is fed in chunks of any size, and a decode
  step feeds one token per row.
* head: the final norm and the output projection, ``hidden [tokens,
  hidden_size]`` -> float32 logits.

Rows, tokens and the cache length are dynamic, so one compiled graph serves
prefill chunks and decode steps at any batch and context; the caller passes
the cache up to the longest position in use, so attention costs the context
in use, not the largest one. The weights are inputs, not constants: the same
compiled layer runs with each layer's weights (the embedding is a row lookup
the runtime does itself). The layer's norms, activation and weights are the
patched model's own (int8 ones dequantized inside the graph as its own
forward does); written here are the attention, against the static cache
instead of a growing one, and the projections' matrix products
(:func:`project`).
"""

import copy
import sys

import torch

from workflow_scripts.checkpoint.layout import head_dim
from workflow_scripts.core.errors import InputError


def attend(layer, rotate_half, hidden, positions, cos, sin, keys, values):
    """One decoder layer over ``hidden`` at ``positions``, with its cache ``keys, values`` (updated in place)."""
    attention = layer.self_attn
    rows, tokens, _ = hidden.shape
    heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    query, key, value = projections(attention, QKV, layer.input_layernorm(hidden))
    query = query.reshape(rows, tokens, heads, head_dim).transpose(1, 2)
    key = key.reshape(rows, tokens, kv_heads, head_dim).transpose(1, 2)
    value = value.reshape(rows, tokens, kv_heads, head_dim)
    cos, sin = cos[positions].unsqueeze(1).to(hidden.dtype), sin[positions].unsqueeze(1).to(hidden.dtype)
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    row_index = torch.arange(rows, device=hidden.device).unsqueeze(1).expand(rows, tokens)
    keys[row_index, :, positions] = key.transpose(1, 2)
    values[row_index, :, positions] = value
    # grouped-query attention without repeating the cache: the query heads that share a key head, consecutive
    # ones, attend to that key head's cache together
    attend_cache = attend_one_token if tokens == 1 else attend_tokens
    attended = attend_cache(query, keys, values, positions, attention.scaling).reshape(rows, tokens, heads * head_dim)
    hidden = hidden + project(attention.o_proj, attended)
    mlp = layer.mlp
    gate, up = projections(mlp, GATE_UP, layer.post_attention_layernorm(hidden))
    return hidden + project(mlp.down_proj, mlp.act_fn(gate) * up)


# Projections of the same input, which the compiled graphs run as one matrix product of their weights stacked by
# rows (fused_layer): SmolLM2's int8 q/k/v and gate/up in two kernel calls instead of five, a decode step's 30
# layers 0.25 ms faster of 4 (measured); each output is the same dot product either way.
QKV = ("qkv_proj", ("q_proj", "k_proj", "v_proj"))
GATE_UP = ("gate_up_proj", ("gate_proj", "up_proj"))
FUSED = {"self_attn": QKV, "mlp": GATE_UP}


def projections(parent, fusion, inputs):
    """The outputs of ``parent``'s projections named in ``fusion`` (a :data:`FUSED` entry), from their stacked
    module where ``parent`` has it (:func:`fused_layer`)."""
    fused_name, names = fusion
    if not hasattr(parent, fused_name):
        return [project(getattr(parent, name), inputs) for name in names]
    sizes = [getattr(parent, name).out_features for name in names]
    return project(getattr(parent, fused_name), inputs).split(sizes, dim=-1)


def fused_layer(layer):
    """``(fused, inputs)``: a copy of ``layer`` whose :data:`FUSED` projections are one module each, their weights
    (and int8 scales) stacked by rows, keeping stand-ins of the stacked projections for their sizes; and, for each
    of its weights in :class:`Layer` input order, the names of ``layer``'s own weights that it stacks (one name
    where it stacks none). The layer graph the compile stage exports."""
    fused, stacks = copy.deepcopy(layer), {}
    for parent_name, (fused_name, names) in FUSED.items():
        parent = getattr(fused, parent_name)
        linears = [getattr(parent, name) for name in names]
        stacked = copy.deepcopy(linears[0])
        for weight_name, _ in linears[0].named_parameters():
            joined = torch.cat([getattr(linear, weight_name) for linear in linears])
            setattr(stacked, weight_name, torch.nn.Parameter(joined, requires_grad=False))
            stacks[f"{parent_name}.{fused_name}.{weight_name}"] = [
                f"{parent_name}.{name}.{weight_name}" for name in names
            ]
        stacked.out_features = sum(linear.out_features for linear in linears)
        setattr(parent, fused_name, stacked)
        for name, linear in zip(names, linears, strict=True):
            setattr(parent, name, SizeOnly(linear.out_features))
    return fused, [stacks.get(name, [name]) for name, _ in fused.named_parameters()]


class SizeOnly(torch.nn.Module):
    """A projection folded into a stacked one: only its output size is left."""

    def __init__(self, out_features):
        super().__init__()
        self.out_features = out_features


def attend_tokens(query, keys, values, positions, scaling):
    """``query [rows, heads, tokens, head_dim]`` against the cache: ``[rows, tokens, heads, head_dim]``. The heads
    that share a key head form one matrix of ``(heads / kv_heads) * tokens`` rows against its cache."""
    rows, heads, tokens, head_dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    grouped = query.contiguous().view(rows, kv_heads, group * tokens, head_dim)
    scores = (torch.matmul(grouped, keys.transpose(2, 3)) * scaling).view(rows, kv_heads, group, tokens, length)
    slots = torch.arange(length, device=query.device).view(1, 1, length)
    visible = slots <= positions.unsqueeze(-1)  # [rows, tokens, length]: each token sees its own and earlier slots
    bias = torch.zeros(visible.shape, dtype=scores.dtype, device=query.device)
    bias = bias.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probabilities = torch.softmax(scores + bias[:, None, None], dim=-1, dtype=torch.float32).to(query.dtype)
    attended = torch.matmul(probabilities.view(rows, kv_heads, group * tokens, length), values)
    return attended.view(rows, heads, tokens, head_dim).transpose(1, 2)


def attend_one_token(query, keys, values, positions, scaling):
    """:func:`attend_tokens` for one token per row (a decode step), as products summed in float32 rather than
    matrix products: the compiler fuses them into loops over the cache, where a matrix product of a few rows is a
    library call that costs more to set up than to run (SmolLM2's 9 heads over 150 slots: 28 us against 77 us,
    measured), 30 times a step."""
    rows, heads, _, head_dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    grouped = query.reshape(rows, kv_heads, heads // kv_heads, 1, head_dim).float()
    scores = (grouped * keys.unsqueeze(2).float()).sum(-1) * scaling  # [rows, kv_heads, group, length]
    slots = torch.arange(length, device=query.device).view(1, 1, 1, length)
    scores = scores.masked_fill(slots > positions.view(rows, 1, 1, 1), torch.finfo(torch.float32).min)
    probabilities = torch.softmax(scores, dim=-1).unsqueeze(-1)
    attended = (probabilities * values.unsqueeze(2).float()).sum(-2)  # [rows, kv_heads, group, head_dim]
    return attended.to(query.dtype).view(rows, 1, heads, head_dim)


def project(linear, inputs):
    """``linear(inputs)``, in float32 computed as ``(weight @ inputs^T)^T``: the same sums, with the weight as the left
    operand of the matrix product, which the CPU's BLAS runs about twice as fast for a few rows, a decode step's one per
    request (measured: 4 rows through a 1536 x 576 weight in 88 us against 152 us, 49152 x 576 in 2.8 ms against
    12 ms), at 10 to 20% more for a chunk of 256 prompt tokens. An int8 projection computes as its own forward
    does: in bfloat16 on the CPU through PyTorch's int8 weight-only kernel (1536 x 576 for 1 and 4 rows in 15 and
    28 us, against 47 and 81 us dequantized in float32; that kernel's float32 form is not vectorized), elsewhere
    dequantized first."""
    if hasattr(linear, "dequantized") and int8_kernel(inputs.device, inputs.dtype):
        return sys.modules[type(linear).__module__].linear_int8(inputs, linear.weight, linear.weight_scale)
    weight = linear.dequantized(inputs.dtype) if hasattr(linear, "dequantized") else linear.weight
    if inputs.dtype == torch.bfloat16:
        # bfloat16 BLAS runs the usual order faster: SmolLM2's 49152 x 576 head for 2 and 4 rows in 2.3 and 2.6 ms,
        # against 3.5 and 3.7 ms with the weight on the left (measured)
        return torch.nn.functional.linear(inputs, weight)
    flat = inputs.reshape(-1, inputs.shape[-1])
    return torch.matmul(weight, flat.T).T.reshape(*inputs.shape[:-1], weight.shape[0])


def int8_kernel(device, dtype):
    """Whether int8 projections computing in ``dtype`` on ``device`` run on PyTorch's int8 weight-only kernel."""
    return torch.device(device).type == "cpu" and dtype == torch.bfloat16


class Layer(torch.nn.Module):
    """A decoder layer's forward with its weights as inputs: ``forward(hidden, positions, cos, sin, keys, values,
    *weights)``, the weights in :func:`layer_weights` order."""

    def __init__(self, layer):
        super().__init__()
        self.body = _Attend(layer)
        self.weight_names = tuple(f"layer.{name}" for name, _ in layer.named_parameters())

    def forward(self, hidden, positions, cos, sin, keys, values, *weights):
        weights = dict(zip(self.weight_names, weights, strict=True))
        return torch.func.functional_call(self.body, weights, (hidden, positions, cos, sin, keys, values))


class _Attend(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.rotate_half = sys.modules[type(layer).__module__].rotate_half

    def forward(self, hidden, positions, cos, sin, keys, values):
        return attend(self.layer, self.rotate_half, hidden, positions, cos, sin, keys, values)


class Head(torch.nn.Module):
    """The final norm and output projection with their weights as inputs: ``forward(hidden, *weights)``, the
    weights in :func:`head_weight_names` order (an int8 output projection has its scales too)."""

    def __init__(self, model):
        super().__init__()
        self.body = _Head(model.model.norm, model.lm_head)
        self.weight_names = tuple(name.removeprefix("model.") for name in head_weight_names(model))

    def forward(self, hidden, *weights):
        return torch.func.functional_call(self.body, dict(zip(self.weight_names, weights, strict=True)), (hidden,))


class _Head(torch.nn.Module):
    def __init__(self, norm, lm_head):
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden):
        return project(self.lm_head, self.norm(hidden)).float()


def head_weight_names(model):
    """The state-dict names of the head's weights: the final norm's, then the output projection's."""
    return ["model.norm.weight", *(f"lm_head.{name}" for name, _ in model.lm_head.named_parameters())]


def layer_weights(model):
    """Every layer's weights in :class:`Layer` input order, after checking that the layers are alike (one compiled
    graph runs them all)."""
    layers = model.model.layers
    first = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in layers[0].named_parameters()]
    for index, layer in enumerate(layers):
        found = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in layer.named_parameters()]
        if found != first:
            raise InputError(
                f"decoder layer {index} has other weights than layer 0 ({found} against {first}): one compiled"
                " layer graph runs every layer, so they must be alike"
            )
    return [[tensor for _, tensor in layer.named_parameters()] for layer in layers]


def weight_names(model):
    """The state-dict names of :func:`layer_weights`, per layer."""
    return [
        [f"model.layers.{index}.{name}" for name, _ in layer.named_parameters()]
        for index, layer in enumerate(model.model.layers)
    ]


def cache_shape(config, rows, context):
    """One layer's key (or value) cache: ``[rows, kv_heads, context, head_dim]``."""
    return rows, config.num_key_value_heads, context, head_dim(config.to_dict())
