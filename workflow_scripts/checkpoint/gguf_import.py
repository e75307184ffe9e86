"""A llama.cpp GGUF file imported as a bf16 Mistral checkpoint (stage 1, download, for a ``gguf`` source).

llama.cpp stores Mistral's models (and Llama-layout ones such as SmolLM2) as
its ``llama`` architecture; the tensors are the same as Hugging Face's
``MistralForCausalLM`` under other names, except that the rows of each
q and k projection are reordered for llama.cpp's interleaved rotary embedding
(``permute`` in its ``convert_hf_to_gguf.py``). The import reads the header
(``workflow_scripts.checkpoint.gguf``: architecture, shape, refusals), then, one
tensor at a time, takes it from the ``gguf`` package's ``GGUFReader`` (a numpy
view of the memory-mapped file), dequantizes it with that package, undoes that
reordering, rounds it to bf16 and streams it into safetensors shards of at most
5 GB (the hub's layout; one ``model.safetensors`` when it fits), so memory
stays at a few tensors whatever the model's size. ``transformers`` builds the
tokenizer from the file's metadata (``tokenizer.json``, and
``tokenizer_config.json`` with the chat template). A file whose weights were
quantized is imported with its rounding: the manifest's origin records its
tensor types and ``dequantized_from_quantized``. The bf16 weights are bit for
bit those of transformers' own GGUF loader (``from_pretrained(gguf_file=...)``,
tested), which is not used: it cannot read a ``mistral``-architecture file (nor
a llama one whose ``general.name`` is ``mistral``) and holds the whole model in
float32.
"""

import collections
import logging
import mmap
import os
import tempfile
import warnings
from pathlib import Path

from workflow_scripts.checkpoint.folder import write_weight_index
from workflow_scripts.checkpoint.gguf import FLOAT_TYPES, describe, gguf_path, hf_name, mistral_config, read_header
from workflow_scripts.checkpoint.layout import tensor_shapes
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json, read_json, sha256_file

LOG = logging.getLogger(__name__)

SHARD_BYTES = 5 * 10**9  # huggingface_hub's default max_shard_size, "5GB"
BF16_BYTES = 2
# transformers writes these into tokenizer_config.json about the loading, not the tokenizer
LOADING_KEYS = ("backend", "is_local", "local_files_only", "name_or_path", "gguf_file")
TOKENIZER_PROBE = "The capital of France is Paris.\n  Numbers: 12345, symbols: <>{}; unicode: café, 東京."


def package_version(package):
    """The installed version of the distribution that provides import package ``package`` (None if unknown)."""
    import importlib.metadata

    for name in importlib.metadata.packages_distributions().get(package, [package]):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def unpermute(weights, heads):
    """Undo llama.cpp's row order of a q or k projection: per head, rows ``[0, d/2, 1, d/2+1, ...]`` back to
    Hugging Face's rotate-half order (the inverse of ``permute`` in llama.cpp's ``convert_hf_to_gguf.py``)."""
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def shard_plan(shapes):
    """``[[name, ...], ...]``: the tensors in order, cut into shards of at most ``SHARD_BYTES`` of bf16."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = BF16_BYTES
        for dim in shape:
            nbytes *= dim
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


class GgufTensors:
    """The file's tensors by Hugging Face name, each dequantized to a float32 torch tensor on request.

    ``gguf.GGUFReader`` memory-maps the file and gives each tensor as a numpy view of the map; once a tensor is
    converted, its pages are dropped from this process (they stay in the page cache), so the resident set holds
    the tensor in flight, not the file.
    """

    def __init__(self, where, path):
        from gguf import GGUFEndian, GGUFReader

        self.where = where
        try:
            reader = GGUFReader(path)
        except ValueError as error:
            raise InputError(
                f"{where}: truncated or corrupt, the gguf package cannot read its tensors ({error})"
            ) from None
        if reader.endianess == GGUFEndian.BIG:
            raise InputError(f"{where} was written on a big-endian machine; only little-endian GGUF files are imported")
        self.map = reader.data.base  # the mmap under the reader's numpy memmap
        self.tensors = {hf_name(tensor.name): tensor for tensor in reader.tensors}

    def float32(self, name, heads=None):
        """Tensor ``name`` (a Hugging Face name) in float32; with ``heads``, a q/k projection's rows reordered."""
        import torch
        from gguf import dequantize

        tensor = self.tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise InputError(
                f"{self.where}: tensor {tensor.name} is {tensor.tensor_type.name}, which the gguf package cannot "
                "dequantize"
            ) from None
        if heads:
            values = unpermute(values, heads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an F32 tensor is a read-only view of the map
            result = torch.from_numpy(values).to(torch.float32, copy=True)
        del values
        first = -(-tensor.data_offset // mmap.PAGESIZE) * mmap.PAGESIZE
        stop = (tensor.data_offset + tensor.n_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if stop > first:
            self.map.madvise(mmap.MADV_DONTNEED, first, stop - first)
        return result


def write_weights(model, tensors, config, staging):
    """bf16 safetensors of every tensor the config implies, streamed; return the file names."""
    import torch

    from workflow_scripts.checkpoint.safetensors_stream import SafetensorsWriter

    shapes = tensor_shapes(config)
    if config["tie_word_embeddings"]:  # the output projection is the embedding: no lm_head.weight
        shapes.pop("lm_head.weight", None)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    plan = shard_plan(shapes)
    names = (
        ["model.safetensors"]
        if len(plan) == 1
        else [f"model-{i:05d}-of-{len(plan):05d}.safetensors" for i in range(1, len(plan) + 1)]
    )
    weight_map = {}
    for shard, file_name in zip(plan, names, strict=True):
        writer = SafetensorsWriter(
            staging / file_name, [(name, torch.bfloat16, shapes[name]) for name in shard], metadata={"format": "pt"}
        )
        try:
            for name in shard:
                projection = name.split(".")[-2]
                weights = tensors.float32(name, heads.get(projection))
                writer.write(weights.to(torch.bfloat16))
                del weights
        finally:
            writer.close()
        weight_map.update(dict.fromkeys(shard, file_name))
        LOG.info("model %s: wrote %s (%d tensors)", model, file_name, len(shard))
    if len(plan) > 1:
        total = sum(BF16_BYTES * torch.Size(shape).numel() for shape in shapes.values())
        write_weight_index(staging, weight_map, total)


def write_tokenizer(model, path, config, staging):
    """``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template) built by transformers from the
    file's metadata; checked to encode like the tokenizer transformers built from the GGUF itself."""
    from transformers import AutoTokenizer

    # in a folder of its own: transformers would also read any tokenizer files lying beside the GGUF
    with tempfile.TemporaryDirectory(prefix="gguf-tokenizer-") as folder:
        os.symlink(path.resolve(), Path(folder) / path.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        except (ValueError, KeyError) as error:
            raise InputError(
                f"model {model}: transformers cannot build a tokenizer from {path}'s metadata ({error})"
            ) from None
    tokenizer.save_pretrained(str(staging), save_jinja_files=False)
    settings = read_json(staging / "tokenizer_config.json")
    for key in LOADING_KEYS:
        settings.pop(key, None)
    # the generic class loads tokenizer.json as written, under transformers 5 and the vendor's 4.45
    settings.update(
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=config["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    atomic_write_json(staging / "tokenizer_config.json", settings)
    saved = AutoTokenizer.from_pretrained(str(staging))
    if saved(TOKENIZER_PROBE).input_ids != tokenizer(TOKENIZER_PROBE).input_ids:
        raise RuntimeError(f"model {model}: the saved tokenizer encodes differently from the GGUF's")


def file_type_name(value):
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name
    except ValueError:
        return value


def import_gguf(model, source, staging):
    """``assemble_checkpoint`` filler for a ``source: {gguf: FILE, package, sha256}`` entry."""
    where = f"model {model}: source.gguf {describe(source)}"
    path = gguf_path(model, source)
    if not path.is_file():
        raise InputError(f"{where}: {path} is not a file")
    digest = sha256_file(path)
    if "sha256" in source and source["sha256"].lower() != digest:
        raise InputError(f"model {model}: source.sha256 is {source['sha256'].lower()}, but {path} has sha256 {digest}")
    try:
        header = read_header(path)
    except InputError as error:
        raise InputError(f"model {model}: source.gguf {error}") from None
    metadata = header.metadata
    config = mistral_config(where, metadata, header.tensors)
    types = collections.Counter(_type_name(info.ggml_type) for info in header.tensors.values())
    quantized = sorted(
        {
            _type_name(info.ggml_type)
            for info in header.tensors.values()
            if len(info.shape) > 1 and info.ggml_type not in FLOAT_TYPES
        }
    )
    LOG.info(
        "model %s: importing %s: %s, %d layers, hidden %d, tensors %s",
        model,
        path,
        metadata["general.architecture"],
        config["num_hidden_layers"],
        config["hidden_size"],
        dict(types.most_common()),
    )
    if quantized:
        LOG.warning(
            "model %s: the GGUF's weights are quantized (%s): they are dequantized to bf16 with their "
            "rounding error, and the workflow's int8 schemes round them again",
            model,
            ", ".join(quantized),
        )
    write_weights(model, GgufTensors(where, path), config, staging)
    atomic_write_json(staging / "config.json", config)
    atomic_write_json(
        staging / "generation_config.json",
        {key: config[key] for key in ("bos_token_id", "eos_token_id") if config[key] is not None},
    )
    write_tokenizer(model, path, config, staging)
    origin = {
        "gguf": source["gguf"] if "package" in source else str(path.resolve()),
        "sha256": digest,
        "architecture": metadata["general.architecture"],
        "tensor_types": dict(sorted(types.items())),
        "dequantized_from_quantized": bool(quantized),
    }
    if "package" in source:
        origin.update(package=source["package"], package_version=package_version(source["package"]))
    if "general.file_type" in metadata:
        origin["file_type"] = file_type_name(metadata["general.file_type"])
    return origin, {"converted"}


def _type_name(ggml_type):
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return str(ggml_type)
