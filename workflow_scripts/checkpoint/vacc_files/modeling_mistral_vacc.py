"""Mistral rewritten as a static graph for the VACC compiler (vamc).

Shipped inside the patched checkpoint. Differences from upstream Mistral, each
made so the traced graph has no data-dependent shapes:

* attention is always full causal (plus padding); ``sliding_window`` is never read;
* rotary cos/sin tables are precomputed once as ``[max_positions, head_dim]`` and
  rows are gathered with ``position_ids``;
* with ``config.insert_slice`` and ``config.iter_num == 0`` (prefill), the hidden
  states are cut to the last position before ``lm_head``;
* eager attention only; the KV cache is a tuple of per-layer ``(key, value)``
  tensors ``[batch, kv_heads, seq, head_dim]``, stored before the GQA repeat and
  grown by concatenation;
* ``MistralForCausalLM.quantize(8)`` swaps the seven projections of every decoder
  layer for per-channel int8 layers; a checkpoint whose config carries
  ``vacc_quantization`` (written by the workflow's quantize stage) is built with
  those int8 layers and loads its int8 weights directly.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

from .configuration_mistral_vacc import MistralConfig
from .quantization_vacc import QuantizedLinearPerChannel

QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class MistralRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def rotary_tables(head_dim, max_positions, base):
    """cos and sin tables ``[max_positions, head_dim]`` in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    positions = torch.arange(max_positions, dtype=torch.int64, device="cpu").float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class MistralStaticRotary(nn.Module):
    """Precomputed rotary tables, gathered by position instead of sliced."""

    def __init__(self, config):
        super().__init__()
        self.head_dim = config.head_dim
        self.max_positions = config.max_position_embeddings
        self.base = config.rope_theta
        cos, sin = rotary_tables(self.head_dim, self.max_positions, self.base)
        self.register_buffer("cos_table", cos, persistent=False)
        self.register_buffer("sin_table", sin, persistent=False)

    def reset_tables(self):
        """Recompute the tables after the buffers were allocated empty (meta-device loading)."""
        cos, sin = rotary_tables(self.head_dim, self.max_positions, self.base)
        with torch.no_grad():
            self.cos_table.copy_(cos)
            self.sin_table.copy_(sin)

    def forward(self, position_ids, dtype):
        cos = self.cos_table[position_ids].unsqueeze(1).to(dtype)
        sin = self.sin_table[position_ids].unsqueeze(1).to(dtype)
        return cos, sin


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(hidden_states, n_rep):
    if n_rep == 1:
        return hidden_states
    batch, kv_heads, seq_len, head_dim = hidden_states.shape
    expanded = hidden_states[:, :, None, :, :].expand(batch, kv_heads, n_rep, seq_len, head_dim)
    return expanded.reshape(batch, kv_heads * n_rep, seq_len, head_dim)


class MistralMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MistralAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, cos, sin, attention_bias, past_key_value=None):
        batch, q_len, _ = hidden_states.shape
        query = self.q_proj(hidden_states).view(batch, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(batch, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        query = query * cos + rotate_half(query) * sin
        key = key * cos + rotate_half(key) * sin
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        present = (key, value)
        n_rep = self.num_heads // self.num_kv_heads
        scores = torch.matmul(query, repeat_kv(key, n_rep).transpose(2, 3)) * self.scaling
        probs = F.softmax(scores + attention_bias, dim=-1, dtype=torch.float32).to(query.dtype)
        attended = torch.matmul(probs, repeat_kv(value, n_rep)).transpose(1, 2).reshape(batch, q_len, -1)
        return self.o_proj(attended), present


class MistralDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = MistralAttention(config)
        self.mlp = MistralMLP(config)
        self.input_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, attention_bias, past_key_value=None):
        attn_out, present = self.self_attn(
            self.input_layernorm(hidden_states), cos, sin, attention_bias, past_key_value
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, present


def causal_attention_bias(attention_mask, q_len, past_len, dtype):
    """Additive ``[batch, 1, q_len, past_len + q_len]`` bias: full causal plus padding, no window."""
    kv_len = past_len + q_len
    query_pos = torch.arange(q_len, device=attention_mask.device).unsqueeze(1) + past_len
    key_pos = torch.arange(kv_len, device=attention_mask.device).unsqueeze(0)
    allowed = (key_pos <= query_pos).unsqueeze(0) & attention_mask[:, None, :kv_len].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


def swap_projections(layers, modules, make):
    """Replace the named projections of every decoder layer by ``make(linear)``."""
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in modules:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, make(linear))


def empty_int8(linear):
    return QuantizedLinearPerChannel(linear.in_features, linear.out_features, linear.weight.dtype, linear.weight.device)


class MistralPreTrainedModel(PreTrainedModel):
    config_class = MistralConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["MistralDecoderLayer"]

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, MistralRMSNorm):
            module.weight.data.fill_(1.0)
        elif isinstance(module, MistralStaticRotary):
            module.reset_tables()


class MistralModel(MistralPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([MistralDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = MistralRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = MistralStaticRotary(config)
        quantization = getattr(config, "vacc_quantization", None)
        if quantization:
            swap_projections(self.layers, quantization["modules"], empty_int8)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if past_key_values is not None and not isinstance(past_key_values, (tuple, list)):
            raise TypeError(
                "this VACC model keeps its KV cache as a tuple of per-layer (key, value) tensors; "
                f"got {type(past_key_values).__name__}"
            )
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        batch, q_len, _ = inputs_embeds.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_len + q_len, dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        cos, sin = self.rotary(position_ids, inputs_embeds.dtype)
        attention_bias = causal_attention_bias(attention_mask, q_len, past_len, inputs_embeds.dtype)

        hidden_states = inputs_embeds
        presents = []
        for index, layer in enumerate(self.layers):
            layer_past = past_key_values[index] if past_key_values else None
            hidden_states, present = layer(hidden_states, cos, sin, attention_bias, layer_past)
            presents.append(present)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=tuple(presents) if use_cache else None,
        )


class MistralForCausalLM(MistralPreTrainedModel, GenerationMixin):
    # With config.tie_word_embeddings (e.g. Llama-style small models), lm_head is embed_tokens and the
    # checkpoint holds no lm_head.weight. A mapping serves transformers 5 and, iterated for its keys, 4.45.
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MistralModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def quantize(self, weight_bit_width=8, modules=QUANTIZED_PROJECTIONS):
        """Swap q/k/v/o/gate/up/down of every decoder layer for per-channel int8 layers."""
        swap_projections(
            self.model.layers, modules, lambda linear: QuantizedLinearPerChannel.from_linear(linear, weight_bit_width)
        )
        return self

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if self.config.insert_slice and self.config.iter_num == 0:
            hidden_states = hidden_states[:, -1:, :]
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)


class MistralForSequenceClassification(MistralPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = MistralModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        logits = self.score(outputs.last_hidden_state)
        if attention_mask is None:
            last = torch.full((logits.shape[0],), logits.shape[1] - 1, device=logits.device)
        else:
            # Right padding: the last attended position of each row.
            last = attention_mask[:, -logits.shape[1] :].long().sum(-1) - 1
        pooled = logits[torch.arange(logits.shape[0], device=logits.device), last]
        return SequenceClassifierOutputWithPast(logits=pooled, past_key_values=outputs.past_key_values)
