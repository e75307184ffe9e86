"""Compiled artifacts: vamc build configs, `vamc compile` through a fake vamc, and the AOTInductor packages."""

import dataclasses
import json
import os
import sys

import pytest
import torch
import yaml

from workflow_scripts.compilation.aoti_build import compile_variant
from workflow_scripts.compilation.vamc import build_environment, check_lengths, check_overrides
from workflow_scripts.compilation.vamc_config import VamcSettings, render
from workflow_scripts.core.errors import InputError
from workflow_scripts.runtime.package import load_compiled

from conftest import AOTI, AOTI_STAGE, VERIFY, run_stage, stage_env

VAMC = {
    "tp": 4,
    "seq_in": 1024,
    "seq_total": 2048,
    "b2s": True,
    "workers": 4,
    "dataset": "c4",
    "overrides": {},
    "name": "Tiny-Mistral",
}
CALIBRATION = {"name": "c4", "nsamples": 128, "seqlen": 1024}


def write_vamc_config(patched, tmp_path, dtype, settings=VAMC):
    output = tmp_path / "vamc" / f"{dtype}.yaml"
    extra = (
        ["--dataset", str(tmp_path / "MANIFEST.json"), "--calibration", json.dumps(CALIBRATION)]
        if dtype == "int8"
        else []
    )
    run_stage(
        "vamc_config",
        "--model",
        "tiny",
        "--patched",
        patched / "MANIFEST.json",
        "--dtype",
        dtype,
        "--settings",
        json.dumps(settings),
        "--workspace",
        tmp_path / "vacc" / dtype,
        "--output",
        output,
        *extra,
    )
    return output


def test_build_configs_have_the_vendor_keys_and_int8_differs_only_where_documented(patched, tmp_path):
    fp16 = yaml.safe_load(write_vamc_config(patched["mistral"], tmp_path, "fp16").read_text())
    int8 = yaml.safe_load(write_vamc_config(patched["mistral"], tmp_path, "int8").read_text())
    assert fp16["name"] == "Tiny-Mistral-fp16-tp4-1024-2048" and int8["name"] == "Tiny-Mistral-int8-tp4-1024-2048"
    assert fp16["frontend"] == {
        "checkpoint": str(patched["mistral"].resolve()),
        "type": "huggingface",
        "shape": {"input_ids": [[1024], [2048]]},
        # the tiny model has 1 kv head: 4 dies need the q/k/v alignment
        "model_kwargs": {"tp": 4, "b2s": True, "model_arch": "vacc", "align_qkv": True},
    }
    assert fp16["backend"] == {
        "type": "tvm_vacc",
        "dtype": "fp16",
        "merge_params": True,
        "compile": {"data_type": 0, "gather_data_vccl_dsp_enable": True},
    }
    assert fp16["workspace"] == {"path": str((tmp_path / "vacc" / "fp16").resolve()), "workers": 4}
    assert int8["frontend"]["quantize"] == {"type": "w8a16_gptq"}
    assert int8["dataset"] == {
        "type": "huggingface",
        "name": "c4",
        "path": str(tmp_path.resolve()),
        "nsamples": 128,
        "seqlen": 1024,
    }
    differing = {key for key in int8 if int8[key] != fp16.get(key)}
    assert differing == {"name", "frontend", "backend", "dataset", "workspace"}
    assert {k for k in int8["frontend"] if int8["frontend"][k] != fp16["frontend"].get(k)} == {"quantize"}
    assert {k for k in int8["backend"] if int8["backend"][k] != fp16["backend"][k]} == {"dtype"}


def test_overrides_merge_and_only_documented_keys_pass(patched):
    config = json.loads((patched["mistral"] / "config.json").read_text())
    settings = {**VAMC, "tp": 2, "overrides": {"backend": {"compile": {"ffn_split_num": 2}}}}
    document = render("tiny", config, VamcSettings.of(settings), "fp16", patched["mistral"], "/w")
    assert document["backend"]["compile"] == {"data_type": 0, "gather_data_vccl_dsp_enable": True, "ffn_split_num": 2}
    assert document["frontend"]["model_kwargs"] == {"tp": 2, "b2s": True, "model_arch": "vacc", "align_qkv": True}
    with pytest.raises(InputError, match=r"models\.x\.vamc\.overrides\.backend\.compile\.ffn_splits is not a vamc"):
        check_overrides("models.x.vamc.overrides", {"backend": {"compile": {"ffn_splits": 2}}})


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seq_in": 1000}, r"models\.tiny\.vamc\.seq_in = 1000 is not a multiple of 16"),
        (
            {"seq_in": 4096, "seq_total": 4096 + 16},
            r"seq_total = 4112 exceeds the model's max_position_embeddings = 4096",
        ),
        ({"seq_in": 2048, "seq_total": 1024}, r"seq_in = 2048 exceeds seq_total = 1024"),
        ({"tp": 3}, r"models\.tiny\.vamc\.tp = 3 does not divide the model's 4 attention heads"),
    ],
)
def test_bad_lengths_and_tp_are_refused_naming_the_key(patched, change, message):
    config = {**json.loads((patched["mistral"] / "config.json").read_text()), "max_position_embeddings": 4096}
    with pytest.raises(InputError, match=message):
        render("tiny", config, VamcSettings.of({**VAMC, **change}), "fp16", patched["mistral"], "/w")
    if "tp" not in change and "4112" not in message:
        with pytest.raises(InputError, match=message):
            lengths = {**VAMC, **change}
            check_lengths("models.tiny.vamc", lengths["seq_in"], lengths["seq_total"])


def test_models_of_32b_parameters_get_the_larger_stack():
    seven_b = {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
    }
    assert build_environment(seven_b) == {}
    assert build_environment(
        {**seven_b, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 64, "num_attention_heads": 64}
    ) == {"VACC_STACK_SIZE": "256"}


def test_vamc_compile_runs_the_real_call_and_adds_the_tokenizer(patched, tmp_path, fake_vamc):
    env, calls = fake_vamc
    config = write_vamc_config(patched["mistral"], tmp_path, "int8")
    manifest = tmp_path / "vacc" / "int8" / "MANIFEST.json"
    result = run_stage(
        "vacc_compile",
        "--model",
        "tiny",
        "--config",
        config,
        "--patched",
        patched["mistral"] / "MANIFEST.json",
        "--manifest",
        manifest,
        env=env,
        check=False,
    )
    log = result.stdout + result.stderr  # the rule sends both to its log
    assert result.returncode == 0, log
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        {"argv": ["compile", str(config)], "stack": None}
    ]
    assert "fake vamc: compiling Tiny-Mistral-int8-tp4-1024-2048" in log and "vamc compile" in log
    recorded = json.loads(manifest.read_text())
    artifact = tmp_path / "vacc" / "int8" / "Tiny-Mistral-int8-tp4-1024-2048"
    assert recorded["artifact"] == str(artifact.resolve()) and recorded["dtype"] == "int8"
    assert "prefill_1024_rank3/mod.so" in recorded["files"] and "tokenizer/tokenizer.json" in recorded["files"]
    assert (artifact / "tokenizer" / "tokenizer.model").exists()


def test_a_failed_or_missing_vamc_leaves_nothing(patched, tmp_path, fake_vamc):
    env, _ = fake_vamc
    config = write_vamc_config(patched["mistral"], tmp_path, "fp16")
    manifest = tmp_path / "vacc" / "fp16" / "MANIFEST.json"
    args = (
        "vacc_compile",
        "--model",
        "tiny",
        "--config",
        config,
        "--patched",
        patched["mistral"] / "MANIFEST.json",
        "--manifest",
        manifest,
    )
    failed = run_stage(*args, env={**env, "FAKE_VAMC_FAIL": "1"}, check=False)
    assert failed.returncode == 1 and "exited with status 3" in failed.stderr
    assert not manifest.exists() and not (tmp_path / "vacc" / "fp16" / "Tiny-Mistral-fp16-tp4-1024-2048").exists()
    missing = run_stage(*args, env=stage_env(PATH=os.path.dirname(sys.executable)), check=False)
    assert missing.returncode == 1 and "vamc, VastAI's model compiler, is not on PATH" in missing.stderr
    assert "VAMC_WHEEL_DIR" in missing.stderr and not manifest.exists()


@pytest.mark.slow  # compiles AOTInductor packages
def test_compiled_packages_match_eager_and_run_alone(compiled):
    for variant in ("float", "rtn-int8"):
        folder = compiled / "aoti" / variant
        manifest = json.loads((folder / "MANIFEST.json").read_text())
        assert {"layer.pt2", "head.pt2", "tokenizer.json", "graphs.json"} <= set(manifest["files"])
        figures = manifest["verify"]
        assert figures["greedy_steps"] == 16 and figures["bound"] == 1e-4
        assert all(not p["greedy_choices_differ"] and p["max_abs_logit_diff"] <= 1e-4 for p in figures["prompts"])
    runner, tokenizer, graphs = load_compiled(compiled / "aoti" / "rtn-int8")
    assert (graphs["rows"], graphs["context"], len(graphs["layer_weights"])) == (2, 2048, 2)
    tokens, logits = runner.generate(tokenizer.encode("The capital of France is").ids, 16)
    assert len(tokens) == 16 and logits.shape == (17, 131072) and torch.isfinite(logits).all()


@pytest.mark.slow  # compiles AOTInductor packages
def test_one_layer_graph_runs_every_layer_from_one_copy_of_the_weights_in_the_checkpoints_dtype(compiled, patched):
    """No weights inside the compiled code; one weights file at the variant's own bytes (float32 graphs read the
    bfloat16 weights widened; int8 stays int8), plus the rotary tables of the context's 2048 positions."""
    from safetensors import safe_open

    from workflow_scripts.runtime.package import read_constants

    for variant, stored_as in (("float", "BF16"), ("rtn-int8", "I8")):
        folder = compiled / "aoti" / variant
        sizes = json.loads((folder / "MANIFEST.json").read_text())["bytes"]
        graphs = json.loads((folder / "graphs.json").read_text())
        rotary_bytes = 2 * 2048 * graphs["head_dim"] * 4
        assert sizes["checkpoint_weights"] < sizes["weights"] < sizes["checkpoint_weights"] + rotary_bytes + 64 * 1024
        assert sizes["graphs"] < 0.5 * sizes["weights"]
        with safe_open(str(folder / "weights.safetensors"), "pt") as handle:
            assert handle.get_slice("model.layers.1.mlp.down_proj.weight").get_dtype() == stored_as
        constants = read_constants(folder / "weights.safetensors", "cpu")
        assert constants["model.layers.0.input_layernorm.weight"].dtype == torch.float32
        assert constants["rotary.cos"].shape[0] == 2048
        first, second = graphs["layer_weights"][:2]
        assert second == [[name.replace("layers.0.", "layers.1.") for name in stack] for stack in first]
        # q, k and v are one graph input, stacked by rows at load (runtime.graphs.FUSED), gate and up another
        assert [f"model.layers.0.self_attn.{name}_proj.weight" for name in "qkv"] in first
        assert ["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"] in first


@pytest.mark.slow  # compiles AOTInductor packages
def test_the_runner_cli_generates_text(compiled):
    result = run_stage(
        "workflow_scripts.run_compiled",
        compiled / "aoti" / "float",
        "The capital of France is",
        "--max-new-tokens",
        "4",
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("The capital of France is") and json.loads(lines[-1])["prompt_tokens"] > 0


@pytest.mark.slow  # compiles AOTInductor packages
def test_a_quantized_checkpoint_of_another_patched_model_is_refused(patched, compiled, tmp_path):
    with pytest.raises(InputError, match="was quantized from a patched checkpoint with manifest sha256"):
        compile_variant(
            "mistral", "rtn-int8", patched["mistral"], compiled / "rtn-int8", AOTI, VERIFY, tmp_path / "out", AOTI_STAGE
        )
    assert not (tmp_path / "out").exists()


def test_a_prompt_that_leaves_no_room_for_its_greedy_tokens_is_refused(patched, tmp_path):
    with pytest.raises(
        InputError,
        match=r"models\.mistral\.verify\.prompts\[0\] has \d+ tokens, more than "
        r"models\.mistral\.aoti\.context - verify\.greedy_tokens = 4",
    ):
        compile_variant(
            "mistral",
            "float",
            patched["mistral"],
            patched["mistral"],
            dataclasses.replace(AOTI, context=20),
            VERIFY,
            tmp_path / "out",
            AOTI_STAGE,
        )


@pytest.mark.slow  # compiles AOTInductor packages
def test_packages_that_disagree_with_eager_fail_the_check(compiled, patched):
    """The float packages checked against the int8 model as 'eager': the rounding moves logits past 1e-4."""
    from workflow_scripts.checkpoint.vacc_code import load_vacc_model
    from workflow_scripts.compilation.aoti_build import eager_generations, verify_compiled
    from workflow_scripts.core.errors import CheckFailed
    from workflow_scripts.data.tokenizers import encode_prompts

    torch.set_grad_enabled(False)
    int8_model = load_vacc_model(compiled / "rtn-int8", torch.float32)
    prompts = encode_prompts(patched["ministral"], VERIFY.prompts)
    eager = eager_generations(int8_model, prompts, 4)
    with pytest.raises(CheckFailed, match=r"compiled vs eager: prompt 0: max \|logit diff\| .* \(bound 0\.0001\)"):
        verify_compiled(eager, compiled / "aoti" / "float", prompts, AOTI, 4)
    # Within a loose bound the same packages pass, fed the int8 model's tokens: the near-uniform logits of this
    # random-weight model put their greedy choices apart at steps where the int8 model's two candidates are closer
    # than twice the logits' difference
    loose = dataclasses.replace(AOTI, max_abs_logit_diff={"float32": 100.0})
    figures = verify_compiled(eager, compiled / "aoti" / "float", prompts, loose, 4)
    differing = [(tie, p["max_abs_logit_diff"]) for p in figures["prompts"] for tie in p["greedy_choices_differ"]]
    assert differing and all(0 <= tie["eager_margin"] <= 2 * bound for tie, bound in differing)


@pytest.mark.slow  # compiles AOTInductor packages
def test_compiling_again_elsewhere_writes_the_same_bytes(compiled, patched):
    """A private inductor cache, no size asserts and a pinned serialization id: the package is a function of its
    inputs, not of the process, the folder it is built in or earlier compiles."""
    first = compiled / "aoti" / "float"
    again = compiled / "elsewhere" / "float"
    run_stage(
        "aoti_compile",
        "--model",
        "ministral",
        "--variant",
        "float",
        "--patched",
        patched["ministral"] / "MANIFEST.json",
        "--checkpoint",
        patched["ministral"] / "MANIFEST.json",
        "--settings",
        json.dumps(AOTI.record()),
        "--verify",
        json.dumps(VERIFY.record()),
        "--manifest",
        again / "MANIFEST.json",
    )
    assert {path.name: path.read_bytes() for path in again.iterdir()} == {
        path.name: path.read_bytes() for path in first.iterdir()
    }
