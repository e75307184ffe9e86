"""The patched checkpoint: files, configs, loading, the VACC model's behaviour, and its verification."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, MistralForCausalLM

from workflow_scripts.checkpoint.patch import patch_checkpoint
from workflow_scripts.checkpoint.vacc_code import AUTO_MAP, VACC_FILES, VACC_FILES_DIR
from workflow_scripts.checkpoint.vacc_files.quantization_vacc import quantize_per_channel
from workflow_scripts.core.errors import InputError

from conftest import PATCH_SETTINGS as SETTINGS
from conftest import run_stage

VERIFY = {
    "prompts": ["The capital of France is", "One two three four five six seven eight nine ten eleven twelve"],
    "greedy_tokens": 16,
    "max_abs_logit_diff": 1e-4,
    "device": "auto",
}
IDS = torch.tensor([[1, 415, 5565, 302, 4843, 349, 5465, 28723, 661, 349, 264, 1628, 2990]])


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_patched_folder_links_weights_and_merges_configs(downloaded, patched, preset):
    source, folder = downloaded[preset], patched[preset]
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["link"] == ["hardlink"]
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"):
        assert os.path.samefile(source / name, folder / name)
    for name in VACC_FILES:
        assert (folder / name).read_text() == (VACC_FILES_DIR / name).read_text()
    original = json.loads((source / "config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config == {**original, "auto_map": AUTO_MAP}
    vacc = json.loads((folder / "config_vacc.json").read_text())
    assert vacc == {**config, "_attn_implementation": "eager", "insert_slice": True, "iter_num": 0}
    assert set(manifest["files"]) == {p.name for p in folder.iterdir()} - {"MANIFEST.json"}


def load(folder, config_name="config.json"):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        folder, trust_remote_code=True, **({} if config_name == "config.json" else {"insert_slice": True})
    )
    return AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=torch.float32, trust_remote_code=True
    ).eval()


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_patched_model_matches_upstream_without_window(downloaded, patched, preset):
    model = load(patched[preset])
    assert type(model).__module__.endswith("modeling_mistral_vacc")
    upstream = MistralForCausalLM.from_pretrained(
        downloaded[preset], dtype=torch.float32, attn_implementation="eager", sliding_window=None
    ).eval()
    with torch.no_grad():
        ours, theirs = model(IDS).logits, upstream(IDS).logits
    assert ours.shape == theirs.shape == (1, IDS.shape[1], model.config.vocab_size)
    assert (ours - theirs).abs().max() < 1e-4


def test_explicit_head_dim_is_honoured(patched):
    model = load(patched["ministral"])
    attention = model.model.layers[0].self_attn
    assert model.config.head_dim == 32 != model.config.hidden_size // model.config.num_attention_heads
    assert attention.q_proj.out_features == 4 * 32 and attention.k_proj.out_features == 32
    assert model.model.rotary.cos_table.shape == (model.config.max_position_embeddings, 32)


def test_kv_cache_layout_and_incremental_decoding(patched):
    model = load(patched["mistral"])
    with torch.no_grad():
        full = model(IDS).logits
        prefix = model(IDS[:, :9], use_cache=True)
        step = model(IDS[:, 9:], past_key_values=prefix.past_key_values, use_cache=True)
    key, value = prefix.past_key_values[0]
    config = model.config
    assert key.shape == value.shape == (1, config.num_key_value_heads, 9, config.head_dim)
    assert len(prefix.past_key_values) == config.num_hidden_layers
    assert step.past_key_values[0][0].shape[2] == IDS.shape[1]
    assert (step.logits - full[:, 9:]).abs().max() < 1e-5


def test_left_padding_matches_the_unpadded_prompt(patched):
    model = load(patched["mistral"])
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), IDS], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(IDS)], dim=1)
    with torch.no_grad():
        plain = model(IDS).logits[:, -1]
        shifted = model(padded, attention_mask=mask).logits[:, -1]
    assert (plain - shifted).abs().max() < 1e-5


def test_insert_slice_keeps_only_the_last_prefill_position(patched):
    model = load(patched["mistral"], config_name="config_vacc.json")
    with torch.no_grad():
        sliced = model(IDS).logits
        full = load(patched["mistral"])(IDS).logits
    assert sliced.shape == (1, 1, model.config.vocab_size)
    assert torch.allclose(sliced[:, 0], full[:, -1], atol=1e-6)


def test_quantize_swaps_projections_for_per_channel_int8(patched):
    model = load(patched["mistral"])
    original = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        before = model(IDS).logits
    model.quantize(8)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == original.shape
    assert layer.weight_scale.shape == (original.shape[0],) and layer.weight_scale.dtype == original.dtype
    expected_scale = original.abs().amax(dim=1) / 127
    assert torch.allclose(layer.weight_scale, expected_scale)
    assert torch.equal(layer.weight, torch.round(original / expected_scale[:, None]).to(torch.int8))
    assert layer.weight.abs().max() == 127
    for name in ("embed_tokens",):
        assert getattr(model.model, name).weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.float32
    with torch.no_grad():
        after = model(IDS).logits
    assert 0 < (after - before).abs().max() < 0.05
    with pytest.raises(ValueError, match="weight_bit_width=4"):
        load(patched["mistral"]).quantize(4)


def test_quantize_per_channel_handles_zero_rows_and_rounding():
    weight = torch.tensor([[0.0, 0.0, 0.0], [1.0, -0.5, 0.25], [-2.54, 1.27, 0.01]])
    q, scale = quantize_per_channel(weight)
    assert scale.tolist() == pytest.approx([0.0, 1 / 127, 2.54 / 127])
    assert q.tolist() == [[0, 0, 0], [127, -64, 32], [-127, 64, 0]]


def test_verify_passes_and_records_figures(downloaded, patched, tmp_path):
    output = tmp_path / "verify.json"
    run_stage(
        "verify",
        "--model",
        "mistral",
        "--patched",
        patched["mistral"] / "MANIFEST.json",
        "--upstream",
        downloaded["mistral"] / "MANIFEST.json",
        "--output",
        output,
        "--settings",
        json.dumps(VERIFY),
    )
    report = json.loads(output.read_text())
    assert report["passed"] and report["greedy_tokens_identical"]
    assert report["max_abs_logit_diff"] <= 1e-4
    assert all(len(p["patched_tokens"]) == 16 for p in report["prompts"])
    # The tiny model's window (8) is shorter than the prompts: upstream with the
    # window differs from the patched model, which is why the patch exists.
    assert report["upstream_sliding_window"] == 8
    assert max(p["prefill_max_abs_diff"] for p in report["windowed_upstream_vs_patched"]) > 1e-3


def test_verify_fails_on_a_wrong_patch(downloaded, patched, tmp_path, copy_checkpoint):
    broken = copy_checkpoint(patched["ministral"])
    config = json.loads((broken / "config.json").read_text())
    config["rope_theta"] = 10000.0
    (broken / "config.json").write_text(json.dumps(config))
    output = tmp_path / "verify.json"
    result = run_stage(
        "verify",
        "--model",
        "ministral",
        "--patched",
        broken / "MANIFEST.json",
        "--upstream",
        downloaded["ministral"] / "MANIFEST.json",
        "--output",
        output,
        "--settings",
        json.dumps(VERIFY),
        check=False,
    )
    assert result.returncode == 1
    assert "error: model ministral: the patched checkpoint" in result.stderr
    assert "does not match upstream" in result.stderr
    assert not output.exists()


def test_interrupted_patch_leaves_nothing(downloaded, tmp_path, monkeypatch):
    import shutil as shutil_module

    calls = []

    def copy_then_fail(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_copy(*args, **kwargs)

    real_copy = shutil_module.copyfile
    monkeypatch.setattr("workflow_scripts.checkpoint.patch.shutil.copyfile", copy_then_fail)
    target = tmp_path / "patched"
    with pytest.raises(KeyboardInterrupt):
        patch_checkpoint("mistral", downloaded["mistral"], target, SETTINGS)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_bad_head_counts_are_named(tiny_checkpoints, copy_checkpoint, tmp_path):
    checkpoint = copy_checkpoint(tiny_checkpoints["mistral"])
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_key_value_heads"] = 3
    (checkpoint / "config.json").write_text(json.dumps(config))
    source = tmp_path / "resources" / "mistral"
    run_stage(
        "download",
        "--model",
        "mistral",
        "--source",
        json.dumps({"local": str(checkpoint)}),
        "--manifest",
        source / "MANIFEST.json",
    )
    with pytest.raises(
        InputError, match="num_attention_heads \\(4\\) is not a multiple of num_key_value_heads \\(3\\)"
    ):
        patch_checkpoint("mistral", source, tmp_path / "patched", SETTINGS)
    assert not (tmp_path / "patched").exists()


def test_changed_download_is_refused(downloaded, copy_checkpoint, tmp_path):
    source = copy_checkpoint(downloaded["mistral"])
    (source / "tokenizer.json").write_text("{}")
    with pytest.raises(InputError, match="tokenizer.json is missing or differs from"):
        patch_checkpoint("mistral", source, tmp_path / "patched", SETTINGS)
