"""The two static graphs of a patched model, as modules ``torch.export`` can take whole.

* prefill: ``input_ids, attention_mask`` ``[batch, seq_in]`` (prompts
  left-padded) -> last-position logits ``[batch, vocab]`` and the KV cache
  ``[layers, batch, kv_heads, seq_total, head_dim]`` (keys, values), the
  prompt in slots ``0..seq_in-1``;
* decode: one token per row, its position, the cache slot to write, the mask
  of filled slots and the cache -> logits and the updated cache.

Both run the patched model's own forward (its precomputed rotary tables,
full causal mask, per-layer key/value tensors): decode hands it the whole
static cache as the past plus the mask of filled slots, and writes the new
key and value into their slot with ``torch.where``, so every shape is fixed.
For int8 checkpoints the weights and scales become constants of the graph and
the dequantization one of its operations.
"""

import torch

from workflow_scripts.checkpoint.layout import head_dim


def cache_shape(config, batch, seq_total):
    return config.num_hidden_layers, batch, config.num_key_value_heads, seq_total, head_dim(config.to_dict())


class Prefill(torch.nn.Module):
    def __init__(self, model, seq_total):
        super().__init__()
        self.model = model
        self.seq_total = seq_total

    def forward(self, input_ids, attention_mask):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        keys, values = zip(*out.past_key_values, strict=True)
        free = self.seq_total - input_ids.shape[1]
        return (
            out.logits[:, -1].float(),
            torch.nn.functional.pad(torch.stack(keys), (0, 0, 0, free)),
            torch.nn.functional.pad(torch.stack(values), (0, 0, 0, free)),
        )


class Decode(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, token, position, slot, cache_mask, keys, values):
        past = tuple(zip(keys.unbind(0), values.unbind(0), strict=True))
        # the new token's key and value are appended after the static cache: mark that column as filled
        mask = torch.cat([cache_mask, torch.ones_like(cache_mask[:, :1])], dim=1)
        out = self.model(
            input_ids=token, attention_mask=mask, position_ids=position, past_key_values=past, use_cache=True
        )
        here = (torch.arange(keys.shape[3], device=keys.device) == slot).view(1, 1, -1, 1)
        new_keys, new_values = zip(
            *((key[:, :, -1:], value[:, :, -1:]) for key, value in out.past_key_values), strict=True
        )
        return (
            out.logits[:, -1].float(),
            torch.where(here.unsqueeze(0), torch.stack(new_keys), keys),
            torch.where(here.unsqueeze(0), torch.stack(new_values), values),
        )


def example_inputs(config, batch, seq_in, seq_total, dtype, device="cpu"):
    """Inputs of the right shapes, dtypes and device for ``torch.export`` (the values do not matter)."""
    ids = {"dtype": torch.long, "device": device}
    prefill = (torch.ones(batch, seq_in, **ids), torch.ones(batch, seq_in, **ids))
    shape = cache_shape(config, batch, seq_total)
    decode = (
        torch.ones(batch, 1, **ids),
        torch.full((batch, 1), seq_in, **ids),
        torch.tensor(seq_in, device=device),
        torch.ones(batch, seq_total, **ids),
        torch.zeros(shape, dtype=dtype, device=device),
        torch.zeros(shape, dtype=dtype, device=device),
    )
    return prefill, decode
