"""Greedy decoding through a model's KV cache: the reference every compiled or patched model is compared with."""

import torch


@torch.no_grad()
def greedy_decode(model, input_ids, steps):
    """Prefill, then ``steps`` greedy steps through the KV cache; return per-step logits and tokens."""
    out = model(input_ids=input_ids, use_cache=True)
    logits = [out.logits[0, -1]]
    tokens = []
    for _ in range(steps):
        next_token = logits[-1].argmax().view(1, 1)
        tokens.append(int(next_token))
        out = model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.stack(logits).float(), tokens
