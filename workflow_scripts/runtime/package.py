"""Running a model through its compiled layer and head graphs, and the packages that hold them.

``results/{model}/aoti/{variant}/`` holds ``layer.pt2``, ``decode.pt2`` and
``head.pt2`` (compiled code, without weights: :mod:`workflow_scripts.runtime.graphs`),
``weights.safetensors`` (every layer's weights, the embedding, norm, output
projection and rotary tables, stored once), the model's tokenizer and
``graphs.json`` (device, dtype, rows, context, cache shape, stop tokens): all
:class:`ModelRunner` needs, with no checkpoint and no Python model code. The
compile stage checks the packages through it, the evaluate stage scores them
and the server serves them; ``python -m workflow_scripts.run_compiled`` runs
one from the command line.

A constant that the graphs read in float32 but whose values are bfloat16
numbers (the weights of a bfloat16 checkpoint) is stored in bfloat16 and
widened when loaded, so a float32 package takes the checkpoint's bytes, not
twice them; the file's metadata names the dtype each such constant is loaded
in and the names that share another's tensor (tied embeddings).
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from workflow_scripts.checkpoint.safetensors_stream import SafetensorsWriter
from workflow_scripts.checkpoint.vacc_files.quantization_vacc import aligned
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_path, read_json
from workflow_scripts.data.tokenizers import read_tokenizer
from workflow_scripts.runtime.graphs import Head, Layer, cache_shape, head_weight_names, layer_weights, weight_names

GRAPHS_FILE = "graphs.json"
WEIGHTS_FILE = "weights.safetensors"
GRAPH_FILES = ("layer.pt2", "decode.pt2", "head.pt2")
WIDENED_KEY = "widened_to"
ALIASES_KEY = "aliases"
EMBEDDING, NORM = "model.embed_tokens.weight", "model.norm.weight"
ROTARY = ("rotary.cos", "rotary.sin")
# prompt tokens fed per layer call: long enough that a chunk's matrix products run at full speed, short enough
# that the decode steps of the other rows wait for one chunk at most (docs/serving.md)
PREFILL_CHUNK = 256
# Decode steps of a float32 package feed at least two rows, a free row at its slot 0 beside a lone request: its
# projections multiply the weight by one column per row (runtime.graphs.project), and BLAS takes a single column
# through a slower path (SmolLM2's int8 package, interleaved runs: 20.9 ms a step for one row, 18.5 ms for two).
# bfloat16 projections run one row as fast as two, so a lone request's step feeds its row alone.
MIN_DECODE_ROWS = {torch.float32: 2}


@dataclass
class Cache:
    """Every layer's keys and values, ``[layers, rows, kv_heads, context, head_dim]``: row ``r``'s token at position
    ``p`` in slot ``p`` of row ``r``. One tensor of all layers, so that a step cuts every layer's rows and slots in
    use with one indexing (with 30 per layer, the runtime's own Python took 0.32 ms of SmolLM2's 6 ms step; now
    0.08 ms, cProfile)."""

    keys: torch.Tensor
    values: torch.Tensor


class ModelRunner:
    """A model as a layer graph run once per layer and a head graph (compiled packages or the eager modules of
    :mod:`workflow_scripts.runtime.graphs`), with its weights and a cache of ``rows`` rows of ``context`` slots.
    ``decode_layer`` is the layer graph for one token per row (a decode step), ``layer`` for any number.

    ``weights`` maps the names of :data:`EMBEDDING`, :data:`ROTARY` and the head's weights to tensors;
    ``layer_weights`` lists each layer's weights in the layer graph's input order, ``head_weights`` the head
    graph's (:func:`~workflow_scripts.runtime.graphs.head_weight_names`).
    """

    def __init__(
        self, layer, decode_layer, head, weights, layer_weights, head_weights, rows, context, cache_shape, device="cpu"
    ):
        self.layer, self.decode_layer, self.head = layer, decode_layer, head
        self.embedding, self.head_weights = weights[EMBEDDING], head_weights
        self.cos, self.sin = (weights[name] for name in ROTARY)
        self.layer_weights = layer_weights
        self.rows, self.context = rows, context
        self.min_decode_rows = min(MIN_DECODE_ROWS.get(self.embedding.dtype, 1), rows)
        self.kv_heads, self.head_dim = cache_shape
        self.device = torch.device(device)
        self.weights = weights  # the tensors compiled packages read: they live as long as the runner

    def new_cache(self, rows=None):
        """A cache of ``rows`` rows (all the runner's by default), zeros: the slots beyond a row's position are
        masked out, and a masked zero adds nothing where uninitialised memory could hold NaNs."""
        shape = (len(self.layer_weights), rows or self.rows, self.kv_heads, self.context, self.head_dim)
        return Cache(*(torch.zeros(shape, dtype=self.embedding.dtype, device=self.device) for _ in range(2)))

    def forward(self, cache, first_row, ids, positions, all_logits=False):
        """Feed ``ids [rows, tokens]`` at ``positions`` (same shape) into cache rows ``first_row..``; float32 logits of
        each row's last token ``[rows, vocab]``, or of every token ``[rows * tokens, vocab]``."""
        rows = slice(first_row, first_row + ids.shape[0])
        length = int(positions.max()) + 1
        if length > self.context:
            raise InputError(f"position {length - 1} is beyond the {self.context} positions of this cache")
        hidden = self.embedding[ids]
        layer = self.decode_layer if ids.shape[1] == 1 else self.layer
        in_use = (cache.keys[:, rows, :, :length].unbind(), cache.values[:, rows, :, :length].unbind())
        for weights, keys, values in zip(self.layer_weights, *in_use, strict=True):
            hidden = layer(hidden, positions, self.cos, self.sin, keys, values, *weights)
        hidden = hidden.reshape(-1, hidden.shape[-1]) if all_logits else hidden[:, -1]
        return self.head(hidden.contiguous(), *self.head_weights)

    def prefill(self, cache, row, ids, start=0, chunk=PREFILL_CHUNK, all_logits=False):
        """Feed the tokens ``ids`` into ``row`` from position ``start`` on, ``chunk`` at a time; logits of the last
        token (``[vocab]``), or of each (``[len(ids), vocab]``)."""
        if start + len(ids) > self.context:
            raise InputError(f"{start + len(ids)} tokens do not fit the {self.context} positions of this cache")
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device)
        logits = []
        for offset in range(0, len(ids), chunk):
            piece = ids[offset : offset + chunk].unsqueeze(0)
            positions = torch.arange(start + offset, start + offset + piece.shape[1], device=self.device)
            logits.append(self.forward(cache, row, piece, positions.unsqueeze(0), all_logits))
        return torch.cat(logits) if all_logits else logits[-1][0]

    def decode(self, cache, tokens, positions):
        """One token per row for rows ``0..len(tokens)-1``, each at its own position; their logits."""
        as_column = {"dtype": torch.long, "device": self.device}
        return self.forward(
            cache,
            0,
            torch.as_tensor(tokens, **as_column).view(-1, 1),
            torch.as_tensor(positions, **as_column).view(-1, 1),
        )

    def generate(self, ids, steps, stop=(), forced=None):
        """``(tokens, logits)``: greedy from one prompt in row 0; the prompt's last logits, then one row per fed
        token. With ``forced`` (``steps`` tokens), those tokens are fed instead of the greedy ones (teacher
        forcing), so two models' logits compare on the same sequence. A float32 package's steps also feed row 1,
        at its slot 0 (:data:`MIN_DECODE_ROWS`)."""
        cache = self.new_cache(rows=self.min_decode_rows)
        padding = [0] * (self.min_decode_rows - 1)
        all_logits = [self.prefill(cache, 0, ids)]
        tokens = []
        for step, position in enumerate(range(len(ids), len(ids) + steps)):
            token = int(all_logits[-1].argmax()) if forced is None else forced[step]
            tokens.append(token)
            if token in stop or position == self.context:
                break
            all_logits.append(self.decode(cache, [token, *padding], [position, *padding])[0])
        return tokens, torch.stack(all_logits).float()


def model_weights(model):
    """``(weights, layer_weights, layer_names)`` of an eager patched model: the tensors :class:`ModelRunner` takes,
    and the state-dict names of each layer's (as a package's weights file stores them)."""
    weights = {
        EMBEDDING: model.model.embed_tokens.weight,
        ROTARY[0]: model.model.rotary.cos_table,
        ROTARY[1]: model.model.rotary.sin_table,
        NORM: model.model.norm.weight,
        **{f"lm_head.{name}": tensor for name, tensor in model.lm_head.named_parameters()},
    }
    return weights, layer_weights(model), weight_names(model)


def eager_runner(model, rows, context):
    """A :class:`ModelRunner` of an eager patched model (loaded with at least ``context`` rotary positions): the same
    layer and head modules the compile stage exports, not compiled."""
    weights, per_layer, _ = model_weights(model)
    _, kv_heads, _, head_dim = cache_shape(model.config, rows, context)
    layer = Layer(model.model.layers[0])
    head = [weights[name] for name in head_weight_names(model)]
    shape = (kv_heads, head_dim)
    return ModelRunner(layer, layer, Head(model), weights, per_layer, head, rows, context, shape, model.device)


def write_constants(path, constants):
    """Write the graphs' weights ``{name: tensor}`` one at a time: a float32 one whose values are all bfloat16
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
    layout = [(name, dtype, tuple(constants[name].shape)) for name, dtype in stored.items()]
    metadata = {
        WIDENED_KEY: json.dumps(widened, sort_keys=True),
        ALIASES_KEY: json.dumps(aliases, sort_keys=True),
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
    """The constants of :func:`write_constants` on ``device``, each in the dtype its graphs read, each shared tensor
    once."""
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
        constants = {name: handle.get_tensor(name).to(device) for name in handle.keys()}  # noqa: SIM118
    for name, dtype in json.loads(metadata[WIDENED_KEY]).items():
        constants[name] = constants[name].to(getattr(torch, dtype))
    for name, source in json.loads(metadata[ALIASES_KEY]).items():
        constants[name] = constants[source]
    return constants


def graph_input(weights, names):
    """The graph input that stacks the weights ``names`` by rows (runtime.graphs.fused_layer), taken out of
    ``weights`` so that they are held once; a single name's tensor as it is, an int8 one in memory the CPU's int8
    kernel can read (quantization_vacc.aligned: the file maps it at 8-byte offsets), in ``weights`` too."""
    if len(names) > 1:
        return torch.cat([weights.pop(name) for name in names])
    (name,) = names
    if weights[name].dtype == torch.int8:
        weights[name] = aligned(weights[name])
    return weights[name]


class CompiledGraph:
    """A loaded package called with its input tensors in order. The package's own ``__call__`` parses its input
    and output specs (JSON) and flattens its arguments on every call: about 45 us a call, 1.4 ms of a 12 ms
    bfloat16 decode step of SmolLM2's 31 calls (measured); the specs are read once here, and the graphs' inputs
    are a flat list of tensors already."""

    def __init__(self, package):
        self.run = package.loader.boxed_run
        self.outputs = torch.utils._pytree.treespec_loads(package.loader.get_call_spec()[1])

    def __call__(self, *tensors):
        return torch.utils._pytree.tree_unflatten(self.run(list(tensors)), self.outputs)


def load_compiled(folder):
    """``(ModelRunner, tokenizer, graphs record)`` of a compiled package folder."""
    folder = Path(folder)
    graphs = read_json(folder / GRAPHS_FILE, what="compiled graphs record")
    device = graphs.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{folder}: compiled for CUDA, but torch sees no CUDA device here")
    weights = read_constants(folder / WEIGHTS_FILE, device)
    head_names = graphs["head_weights"]
    stacked = [name for inputs in graphs["layer_weights"] for stack in inputs for name in stack]
    missing = sorted({EMBEDDING, *ROTARY, *head_names, *stacked} - set(weights))
    if missing:
        raise InputError(f"{folder}: {WEIGHTS_FILE} lacks {', '.join(missing[:5])}")
    layer_weights = [[graph_input(weights, stack) for stack in inputs] for inputs in graphs["layer_weights"]]
    layer, decode_layer, head = (
        CompiledGraph(torch._inductor.aoti_load_package(str(folder / name))) for name in GRAPH_FILES
    )
    runner = ModelRunner(
        layer,
        decode_layer,
        head,
        weights,
        layer_weights,
        [graph_input(weights, [name]) for name in head_names],
        graphs["rows"],
        graphs["context"],
        (graphs["kv_heads"], graphs["head_dim"]),
        device,
    )
    return runner, read_tokenizer(folder), graphs
