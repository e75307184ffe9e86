"""Greedy text generation with a model's compiled AOTInductor packages.

``results/{model}/aoti/{variant}/`` holds ``prefill.pt2``, ``decode.pt2``, the
model's tokenizer and ``graphs.json`` (batch, lengths, stop tokens): all this
runner needs, with no checkpoint and no Python model code. The evaluate stage
scores compiled variants through it; ``python -m workflow_scripts.run_compiled``
runs one from the command line.
"""

from pathlib import Path

import torch

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import read_json
from workflow_scripts.data.tokenizers import read_tokenizer

GRAPHS_FILE = "graphs.json"


class StaticGenerator:
    """Decoding through fixed-shape prefill and decode callables (compiled packages or modules)."""

    def __init__(self, prefill, decode, batch, seq_in, seq_total):
        self.prefill, self.decode = prefill, decode
        self.batch, self.seq_in, self.seq_total = batch, seq_in, seq_total

    def start(self, ids):
        """Prefill a prompt (the same in every row): ``(row 0's last logits, state for step)``."""
        if len(ids) > self.seq_in:
            raise InputError(f"the prompt has {len(ids)} tokens; the prefill graph takes at most {self.seq_in}")
        input_ids = torch.zeros(self.batch, self.seq_in, dtype=torch.long)
        input_ids[:, self.seq_in - len(ids) :] = torch.tensor(ids)
        attention_mask = (torch.arange(self.seq_in) >= self.seq_in - len(ids)).long().expand(self.batch, -1)
        logits, keys, values = self.prefill(input_ids, attention_mask.contiguous())
        cache_mask = torch.zeros(self.batch, self.seq_total, dtype=torch.long)
        cache_mask[:, : self.seq_in] = attention_mask
        return logits[0], {
            "keys": keys,
            "values": values,
            "mask": cache_mask,
            "position": len(ids),
            "slot": self.seq_in,
        }

    def step(self, state, token):
        """Feed one token; row 0's logits for the next one."""
        if state["slot"] >= self.seq_total:
            raise InputError(f"the decode graph's cache holds {self.seq_total} positions, and they are all used")
        logits, state["keys"], state["values"] = self.decode(
            torch.full((self.batch, 1), token, dtype=torch.long),
            torch.full((self.batch, 1), state["position"], dtype=torch.long),
            torch.tensor(state["slot"]),
            state["mask"],
            state["keys"],
            state["values"],
        )
        state["mask"][:, state["slot"]] = 1
        state["position"] += 1
        state["slot"] += 1
        return logits[0]

    def generate(self, ids, steps, stop=()):
        """``(tokens, logits)``: greedy; the prompt's last logits, then one row per fed token."""
        logits, state = self.start(ids)
        all_logits, tokens = [logits], []
        for _ in range(min(steps, self.seq_total - self.seq_in)):
            token = int(all_logits[-1].argmax())
            tokens.append(token)
            if token in stop:
                break
            all_logits.append(self.step(state, token))
        return tokens, torch.stack(all_logits).float()


def load_compiled(folder):
    """``(StaticGenerator, tokenizer, graphs record)`` of a compiled package folder."""
    folder = Path(folder)
    graphs = read_json(folder / GRAPHS_FILE, what="compiled graphs record")
    prefill, decode = (torch._inductor.aoti_load_package(str(folder / f"{name}.pt2")) for name in ("prefill", "decode"))
    generator = StaticGenerator(prefill, decode, graphs["batch"], graphs["seq_in"], graphs["seq_total"])
    return generator, read_tokenizer(folder), graphs
