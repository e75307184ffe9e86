"""Demo checkpoints: deterministic, hub-shaped, with the real Mistral tokenizers."""

import json

import pytest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from safetensors import safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from workflow_scripts.checkpoint.demo_checkpoint import write_demo_checkpoint
from workflow_scripts.checkpoint.demo_presets import PRESETS, demo_config
from workflow_scripts.checkpoint.layout import tensor_shapes
from workflow_scripts.data.tokenizer_files import MISTRAL_COMMON_DATA, TOKENIZERS

from conftest import TINY_SHAPES

TEXTS = [
    "Hello world, bonjour le monde!",
    "  leading spaces\nand\ttabs",
    "数学考试 ceval 123456789",
    "def f(x):\n\treturn x ** 2 # émoji 🚀",
]
# Inside runs of two or more spaces, BPE as the tokenizers library runs it
# merges the SentencePiece vocabulary in another order than SentencePiece
# does; the hub's own Mistral-7B tokenizer.json behaves the same way.
SPACE_RUNS = "a  b"


def test_generation_is_byte_identical_for_the_same_seed(tmp_path):
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, seed in ((first, 3), (second, 3), (other, 4)):
        folder.mkdir()
        write_demo_checkpoint("mistral", folder, seed=seed, overrides=TINY_SHAPES["mistral"])
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert (first / "model-00001-of-00002.safetensors").read_bytes() != (
        other / "model-00001-of-00002.safetensors"
    ).read_bytes()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_checkpoint_has_hub_layout_and_real_shapes(tiny_checkpoints, preset):
    folder = tiny_checkpoints[preset]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"]
    assert config["torch_dtype"] == "bfloat16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    expected = tensor_shapes(config)
    assert set(index["weight_map"]) == set(expected)
    for name, shard in index["weight_map"].items():
        with safe_open(folder / shard, "pt") as handle:
            tensor = handle.get_tensor(name)
        assert tuple(tensor.shape) == expected[name]
        assert str(tensor.dtype) == "torch.bfloat16"


def test_presets_keep_the_real_models_ratios():
    mistral, ministral = demo_config("mistral"), demo_config("ministral")
    for config in (mistral, ministral):
        assert config["num_attention_heads"] == 4 * config["num_key_value_heads"]
    assert mistral["rope_theta"] == 1e6 and ministral["rope_theta"] == 1e8
    assert "head_dim" not in mistral
    assert ministral["head_dim"] != ministral["hidden_size"] // ministral["num_attention_heads"]
    assert mistral["vocab_size"] == 32000 and ministral["vocab_size"] == 131072
    assert mistral["sliding_window"] < 40  # shorter than the verification prompts


@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_saved_tokenizer_encodes_like_mistral_common(tmp_path, kind):
    """The HF tokenizer written for the demo gives the ids of the real Mistral tokenizer."""
    from workflow_scripts.data.tokenizer_files import write_tokenizer

    write_tokenizer(kind, tmp_path)
    reference = MistralTokenizer.from_file(str(MISTRAL_COMMON_DATA / TOKENIZERS[kind]["source"]))
    raw = reference.instruct_tokenizer.tokenizer
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        expected = raw.encode(text, bos=True, eos=False)
        assert hf(text)["input_ids"] == expected, text
        assert list(auto(text)["input_ids"]) == expected, text
    assert len(hf) == raw.n_words
    if kind == "tekken-240911":
        assert hf(SPACE_RUNS)["input_ids"] == raw.encode(SPACE_RUNS, bos=True, eos=False)
