"""A ``gguf`` model source without torch or numpy: where its file is, what its header says, the config it makes.

The Snakefile reads this (the file is an input of the download rule, and jobs
are sized from the header before the import has run); the import stage
(``workflow_scripts.stages.download_gguf``) reads the same header and builds the same
``config.json``. A GGUF (llama.cpp's format) is a header of typed key/value
metadata and tensor descriptions followed by the tensor data; only the header
is read here, through a memory map, arrays skipped (a vocabulary of 131072
tokens reads in well under a second).
"""

import functools
import importlib.util
import json
import mmap
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

from workflow_scripts.checkpoint.layout import MISTRAL_CONFIG, tensor_shapes
from workflow_scripts.core.errors import InputError

# llama.cpp calls Mistral's models (7B, Nemo, Ministral 8B) "llama": the same tensors and keys
ARCHITECTURES = ("llama", "mistral")
INSTALL_HINT = "pip install --no-deps -r requirements-models.txt"
MAGIC = b"GGUF"
# metadata value types of the GGUF format: struct formats of the scalars; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
# ggml types whose values are floats as they stand (the others are quantized blocks)
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}
# llama.cpp's names of a layer's tensors (blk.N.<name>.weight) -> Hugging Face's (model.layers.N.<name>.weight)
LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MODEL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_MISSING = object()
CHECKOUT = Path(__file__).resolve().parents[2]
# package_folders run by another interpreter, from this checkout
PACKAGE_PROBE = (
    "import json, sys; sys.path.insert(0, sys.argv[1]); "
    "from workflow_scripts.checkpoint.gguf import package_folders; print(json.dumps(package_folders(sys.argv[2])))"
)


class TensorInfo(NamedTuple):
    shape: tuple  # PyTorch's order, outermost first (GGUF lists the innermost first)
    ggml_type: int


class Header(NamedTuple):
    metadata: dict  # {key: value}, arrays as GgufArray
    tensors: dict  # {name: TensorInfo}, in file order


class GgufArray(tuple):
    """An array value of the header, read as ``(length,)`` only: its items are skipped."""


def package_folders(package, python=None):
    """``(folders, reason)`` of installed package ``package``: ``folders`` is None where it is not installed
    (``reason`` may say why), [] where it is a plain module.

    The package is found without importing it (``importlib.util.find_spec``):
    a package that ships a model file may import things the workflow never
    installs. ``python`` names the interpreter whose environment is searched,
    this one by default: Snakemake may run in an environment of its own while
    the jobs, which read the file, run in the workflow's (WORKFLOW_PYTHON,
    docs/cluster.md).
    """
    if python is not None and python != sys.executable:
        return _package_folders_of(package, python)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError) as error:
        return None, f" ({error})"
    if spec is None:
        return None, ""
    return list(spec.submodule_search_locations or []), ""


@functools.cache
def _package_folders_of(package, python):
    result = subprocess.run([python, "-c", PACKAGE_PROBE, str(CHECKOUT), package], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{python} could not look for package {package}:\n{result.stderr[-2000:]}")
    return tuple(json.loads(result.stdout))


def gguf_path(model, source, python=None):
    """The GGUF file of ``source``: ``gguf`` itself, or the file ``gguf`` in the folder of package ``package``,
    installed in ``python``'s environment (:func:`package_folders`)."""
    name = source["gguf"]
    package = source.get("package")
    if package is None:
        return Path(name)
    if Path(name).name != name or name in (".", ".."):
        raise InputError(
            f"model {model}: source.gguf {name!r} must be a file name inside package {package}'s "
            "folder (with source.package), not a path"
        )
    folders, reason = package_folders(package, python)
    if folders is None:
        raise InputError(
            f"model {model}: source.package {package} is not installed in the Python environment of "
            f"{python or sys.executable}{reason}; install it, for the packages this repository lists: "
            f"`{INSTALL_HINT}` (no dependencies: the workflow only reads the package's model file)"
        )
    if not folders:
        raise InputError(
            f"model {model}: source.package {package} is a module, not a package folder holding a GGUF file"
        )
    return Path(folders[0]) / name


def describe(source):
    """How a message names the file: ``NAME (package P)`` or the path."""
    return f"{source['gguf']} (package {source['package']})" if "package" in source else source["gguf"]


def read_header(path):
    """The :class:`Header` of a GGUF file: its metadata and each tensor's shape and type (the import reads the
    tensors' data with the ``gguf`` package's reader: workflow_scripts/checkpoint/gguf_import.py)."""
    path = Path(path)
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < 24:
            raise InputError(f"{path}: not a GGUF file (shorter than a GGUF header)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != MAGIC:
                raise InputError(f"{path}: not a GGUF file (it starts with {bytes(data[:4])!r}, not {MAGIC!r})")
            try:
                return _Header(data).read(path)
            except (struct.error, UnicodeDecodeError) as error:
                raise InputError(f"{path}: truncated or corrupt GGUF header ({error})") from None


class _Header:
    """A cursor over the header's bytes."""

    def __init__(self, data):
        self.data, self.offset = data, 4
        (version,) = struct.unpack_from("<I", data, 4)
        # a file written on a big-endian machine: its version reads byte-swapped
        self.order = ">" if version & 0xFFFF == 0 else "<"

    def unpack(self, fmt):
        fmt = self.order + fmt
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return values

    def string(self):
        (length,) = self.unpack("Q")
        if self.offset + length > len(self.data):
            raise struct.error("a string runs past the end of the file")
        value = bytes(self.data[self.offset : self.offset + length]).decode("utf-8")
        self.offset += length
        return value

    def skip(self, kind):
        """Step over one value of ``kind`` without decoding it (array items, which can be 10^5 strings)."""
        if kind == STRING:
            (length,) = self.unpack("Q")
            self.offset += length
        elif kind == ARRAY:
            self.array()
        else:
            self.offset += struct.calcsize(SCALARS[kind])

    def array(self):
        item_kind, count = self.unpack("IQ")
        if item_kind in SCALARS:
            self.offset += count * struct.calcsize(SCALARS[item_kind])
        else:
            for _ in range(count):
                self.skip(item_kind)
        return GgufArray((count,))

    def value(self, kind):
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            return self.array()
        if kind not in SCALARS:
            raise struct.error(f"unknown metadata value type {kind} at byte {self.offset}")
        return self.unpack(SCALARS[kind])[0]

    def read(self, path):
        (version,) = self.unpack("I")
        if version < 2:
            raise InputError(f"{path}: GGUF version {version} is not read here (versions 2 and later are)")
        tensor_count, kv_count = self.unpack("QQ")
        metadata = {}
        for _ in range(kv_count):
            key = self.string()
            metadata[key] = self.value(self.unpack("I")[0])
        tensors = {}
        for _ in range(tensor_count):
            name = self.string()
            (dims,) = self.unpack("I")
            shape = self.unpack("Q" * dims)
            ggml_type, _offset = self.unpack("IQ")
            tensors[name] = TensorInfo(tuple(reversed(shape)), ggml_type)
        return Header(metadata, tensors)


def hf_name(name):
    """The Hugging Face Mistral name of llama.cpp tensor ``name``; None where Mistral has no such tensor."""
    stem, _, suffix = name.rpartition(".")
    if suffix != "weight":
        return None
    if stem in MODEL_TENSORS:
        return f"{MODEL_TENSORS[stem]}.weight"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match and match[2] in LAYER_TENSORS:
        return f"model.layers.{match[1]}.{LAYER_TENSORS[match[2]]}.weight"
    return None


def shortest_float32(value):
    """The shortest decimal that is the same float32 as ``value``: a GGUF stores 1e-05 as float32, which reads
    back as 9.999999747378752e-06; the hub's config.json said 1e-05."""
    single = struct.unpack("f", struct.pack("f", value))[0]
    if single != value:
        return value  # not a float32 (a float64 key)
    for digits in range(1, 10):
        candidate = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", candidate))[0] == single:
            return candidate
    return value


def mistral_config(where, metadata, tensors):
    """The ``config.json`` of the ``MistralForCausalLM`` a llama or mistral GGUF holds.

    ``where`` starts every message (``model X: source.gguf FILE``). Refused,
    naming the key or tensor: another architecture, rope scaling, experts,
    attention biases or any other tensor Mistral has no place for, partial
    rotary embeddings, and tensors whose shapes disagree with the metadata.
    """
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise InputError(f"{where} is a {architecture!r} GGUF; only llama and mistral architectures are imported")

    def key(name, default=_MISSING, positive=True):
        full = f"{architecture}.{name}"
        value = metadata.get(full, default)
        if value is _MISSING:
            raise InputError(f"{where} lacks the metadata key {full}")
        if positive and full in metadata and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise InputError(
                f"{where}: {full} is {value!r}, not a positive integer"
                + (" (it varies by layer)" if isinstance(value, GgufArray) else "")
            )
        return value

    scaling = metadata.get(f"{architecture}.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise InputError(
            f"{where} uses rope scaling ({scaling if scaling != 'none' else 'rope_freqs.weight'}); "
            "MistralForCausalLM has plain rotary embeddings only"
        )
    experts = metadata.get(f"{architecture}.expert_count", 0)
    if experts:
        raise InputError(
            f"{where} is a mixture of experts ({architecture}.expert_count = {experts}); only dense models are imported"
        )
    for name in tensors:
        if hf_name(name) is None:
            raise InputError(
                f"{where} has tensor {name}, which MistralForCausalLM has no place for (only llama.cpp's "
                "dense llama layout without biases is imported)"
            )
    if "token_embd.weight" not in tensors:
        raise InputError(f"{where} has no token_embd.weight tensor")
    vocab_size = tensors["token_embd.weight"].shape[0]
    hidden, heads = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise InputError(
            f"{where}: {architecture}.attention.value_length differs from attention.key_length "
            f"({head_dim}); Mistral's attention has one head_dim"
        )
    rotary = key("rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise InputError(
            f"{where}: {architecture}.rope.dimension_count = {rotary} rotates part of each head "
            f"(head_dim {head_dim}); Mistral rotates whole heads"
        )
    rope_theta = shortest_float32(float(key("rope.freq_base", 10000.0, positive=False)))
    tied = "output.weight" not in tensors
    config = {
        **MISTRAL_CONFIG,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": head_dim,
        # transformers 5 reads the base from rope_parameters; 4.x (and the VACC configuration) from rope_theta
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "rms_norm_eps": shortest_float32(float(key("attention.layer_norm_rms_epsilon", positive=False))),
        "max_position_embeddings": key("context_length"),
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "dtype": "bfloat16",  # transformers 5's name of torch_dtype
    }
    by_hf_name = {hf_name(name): name for name in tensors}
    expected = {name: shape for name, shape in tensor_shapes(config).items() if not (name == "lm_head.weight" and tied)}
    for name in by_hf_name.keys() - expected.keys():
        raise InputError(
            f"{where} has tensor {by_hf_name[name]}, beyond its {architecture}.block_count = "
            f"{config['num_hidden_layers']} layers"
        )
    for name, shape in expected.items():
        if name not in by_hf_name:
            raise InputError(f"{where} has no tensor for {name} (a missing layer?)")
        found = tensors[by_hf_name[name]].shape
        if tuple(found) != tuple(shape):
            raise InputError(
                f"{where}: tensor {by_hf_name[name]} has shape {list(found)}, expected {list(shape)} from its metadata"
            )
    return config


@functools.cache
def _planned(path, size, mtime):
    header = read_header(path)
    return size, mistral_config(path, header.metadata, header.tensors)


def existing_file(source, python=None):
    """The gguf source's file where it can be found (a package's in ``python``'s environment), else None (the
    import then says why)."""
    try:
        path = gguf_path("-", source, python)
    except InputError:
        return None
    return path if path.is_file() else None


def planned(source, python=None):
    """``(file bytes, config.json)`` of a gguf source read from its header, for sizing jobs before the import
    has run; None where the file cannot be found or read (the import then says why)."""
    path = existing_file(source, python)
    if path is None:
        return None
    try:
        stat = path.stat()
        return _planned(str(path), stat.st_size, stat.st_mtime_ns)
    except (InputError, OSError):
        return None
