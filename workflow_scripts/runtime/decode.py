"""Greedy decoding through a model's KV cache: the reference every compiled or patched model is compared with."""

from dataclasses import dataclass

import torch

from workflow_scripts.core.settings import Settings


@dataclass(frozen=True)
class VerifyPrompts(Settings):
    """The prompts a model is compared on, and how many tokens to decode greedily from each (the part of
    ``models.<id>.verify`` that the compiled packages are checked with too)."""

    prompts: tuple[str, ...]
    greedy_tokens: int


@torch.no_grad()
def greedy_decode(model, input_ids, steps):
    """Prefill, then ``steps`` greedy steps through the KV cache; return per-step logits (float32, on the CPU)
    and tokens."""
    out = model(input_ids=input_ids.to(model.device), use_cache=True)
    logits = [out.logits[0, -1]]
    tokens = []
    for _ in range(steps):
        next_token = logits[-1].argmax().view(1, 1)
        tokens.append(int(next_token))
        out = model(input_ids=next_token, past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits[0, -1])
    return torch.stack(logits).float().cpu(), tokens
