"""Greedy text generation with a model's compiled AOTInductor packages.

``results/{model}/aoti/{variant}/`` holds ``prefill.pt2`` and ``decode.pt2``
(the compiled code of each graph, without weights), ``weights.safetensors``
(the constants both graphs read, stored once), the model's tokenizer and
``graphs.json`` (device, batch, lengths, stop tokens): all this runner needs,
with no checkpoint and no Python model code. The compile stage checks the
packages through it, the evaluate stage scores them and the server serves
them; ``python -m workflow_scripts.run_compiled`` runs one from the command
line.

A constant that the graphs read in float32 but whose values are bfloat16
numbers (the weights of a bfloat16 checkpoint) is stored in bfloat16 and
widened when loaded, so a float32 package takes the checkpoint's bytes, not
twice them; the file's metadata names the dtype each such constant is loaded
in, the names that share another's tensor (tied embeddings), and the
constants a CUDA graph keeps on the CPU.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from workflow_scripts.checkpoint.safetensors_stream import SafetensorsWriter
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_path, read_json
from workflow_scripts.data.tokenizers import read_tokenizer

GRAPHS_FILE = "graphs.json"
WEIGHTS_FILE = "weights.safetensors"
WIDENED_KEY = "widened_to"
ALIASES_KEY = "aliases"
CPU_KEY = "on_cpu"


class StaticGenerator:
    """Decoding through fixed-shape prefill and decode callables (compiled packages or modules) on ``device``."""

    def __init__(self, prefill, decode, batch, seq_in, seq_total, device="cpu", constants=None):
        self.prefill, self.decode = prefill, decode
        self.batch, self.seq_in, self.seq_total = batch, seq_in, seq_total
        self.device = torch.device(device)
        self.constants = constants  # the tensors compiled packages point into: they live as long as the generator

    def start(self, ids):
        """Prefill a prompt (the same in every row): ``(row 0's last logits, state for step)``."""
        if len(ids) > self.seq_in:
            raise InputError(f"the prompt has {len(ids)} tokens; the prefill graph takes at most {self.seq_in}")
        input_ids = torch.zeros(self.batch, self.seq_in, dtype=torch.long, device=self.device)
        input_ids[:, self.seq_in - len(ids) :] = torch.as_tensor(ids, device=self.device)
        positions = torch.arange(self.seq_in, device=self.device)
        attention_mask = (positions >= self.seq_in - len(ids)).long().expand(self.batch, -1)
        logits, keys, values = self.prefill(input_ids, attention_mask.contiguous())
        cache_mask = torch.zeros(self.batch, self.seq_total, dtype=torch.long, device=self.device)
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
            torch.full((self.batch, 1), int(token), dtype=torch.long, device=self.device),
            torch.full((self.batch, 1), state["position"], dtype=torch.long, device=self.device),
            torch.tensor(state["slot"], device=self.device),
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


def write_constants(path, constants):
    """Write the graphs' constants ``{fqn: tensor}`` one at a time: a float32 one whose values are all bfloat16
    numbers as bfloat16, a tensor that several names share (tied embeddings) once."""
    first_name, aliases = {}, {}
    for name, tensor in sorted(constants.items()):
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if key in first_name:
            aliases[name] = first_name[key]
        else:
            first_name[key] = name
    stored = {name: storage_dtype(constants[name]) for name in first_name.values()}
    widened = {name: "float32" for name, dtype in stored.items() if dtype != constants[name].dtype}
    on_cpu = sorted(name for name in stored if constants[name].device.type == "cpu")
    layout = [(name, dtype, tuple(constants[name].shape)) for name, dtype in stored.items()]
    metadata = {
        WIDENED_KEY: json.dumps(widened, sort_keys=True),
        ALIASES_KEY: json.dumps(aliases, sort_keys=True),
        CPU_KEY: json.dumps(on_cpu),
    }
    with atomic_path(path) as tmp:
        writer = SafetensorsWriter(tmp, layout, metadata)
        for name, dtype, _ in layout:
            writer.write(constants[name].detach().to(dtype).cpu())
        writer.close()


def storage_dtype(tensor):
    exact_in_bfloat16 = tensor.dtype == torch.float32 and torch.equal(tensor.to(torch.bfloat16).float(), tensor)
    return torch.bfloat16 if exact_in_bfloat16 else tensor.dtype


def read_constants(path, device):
    """The constants of :func:`write_constants` on ``device`` (those the graphs keep on the CPU, such as scalars
    of a CUDA graph, on the CPU), each in the dtype its graphs read, each shared tensor once."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        on_cpu = set(json.loads(metadata[CPU_KEY]))
        constants = {
            name: handle.get_tensor(name) if name in on_cpu else handle.get_tensor(name).to(device)
            for name in handle.keys()  # noqa: SIM118 (a safetensors handle is not a mapping)
        }
    for name, dtype in json.loads(metadata[WIDENED_KEY]).items():
        constants[name] = constants[name].to(getattr(torch, dtype))
    for name, source in json.loads(metadata[ALIASES_KEY]).items():
        constants[name] = constants[source]
    return constants


def load_package(path, constants):
    """A compiled graph with its constants pointing at the shared ``constants`` (no copy)."""
    package = torch._inductor.aoti_load_package(str(path))
    missing = sorted(set(package.get_constant_fqns()) - set(constants))
    if missing:
        raise InputError(f"{path}: {WEIGHTS_FILE} lacks the constants {', '.join(missing[:5])}")
    package.load_constants(
        {name: constants[name] for name in package.get_constant_fqns()}, check_full_update=True, user_managed=True
    )
    return package


def load_compiled(folder):
    """``(StaticGenerator, tokenizer, graphs record)`` of a compiled package folder; the weights are loaded once
    and both graphs use them."""
    folder = Path(folder)
    graphs = read_json(folder / GRAPHS_FILE, what="compiled graphs record")
    device = graphs.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{folder}: compiled for CUDA, but torch sees no CUDA device here")
    constants = read_constants(folder / WEIGHTS_FILE, device)
    prefill, decode = (load_package(folder / f"{name}.pt2", constants) for name in ("prefill", "decode"))
    generator = StaticGenerator(
        prefill, decode, graphs["batch"], graphs["seq_in"], graphs["seq_total"], device, constants
    )
    return generator, read_tokenizer(folder), graphs
