"""The gptq-int8 stage: a loadable int8 checkpoint, better than RTN under its Hessians, resumable after a kill."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from workflow_scripts.checkpoint.demo_checkpoint import write_demo_checkpoint
from workflow_scripts.checkpoint.patch import patch_checkpoint
from workflow_scripts.core.code_inputs import sources_digest
from workflow_scripts.core.files import sha256_file
from workflow_scripts.data import demo_datasets as dataset_demo
from workflow_scripts.data.assemble import assemble_dataset
from workflow_scripts.data.calibration import CalibrationSettings, build_shard
from workflow_scripts.data.provenance import write_token_tensors
from workflow_scripts.quantization.gptq_checkpoint import GptqSettings, quantize_gptq

from conftest import PATCH_SETTINGS, QUANTIZE_SETTINGS, TINY_SHAPES, run_stage, stage_env

STAGE = "workflow_scripts.stages.quantize_gptq"
SETTINGS = {
    **QUANTIZE_SETTINGS.record(),
    "datasets": ["c4"],
    "nsamples": 48,
    "holdout": 8,
    "block_size": 32,
    "damp": 0.01,
    "act_order": False,
    "first_token_weight": 1.0,
    "device": "cpu",
}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """A tiny Mistral with six layers (so that a run can be killed between layers) and its c4 shard."""
    root = tmp_path_factory.mktemp("gptq")
    source = root / "source"
    source.mkdir()
    write_demo_checkpoint("mistral", source, seed=11, overrides={**TINY_SHAPES["mistral"], "num_hidden_layers": 6})
    run_stage(
        "download",
        "--model",
        "deep",
        "--source",
        json.dumps({"local": str(source)}),
        "--manifest",
        root / "resources" / "MANIFEST.json",
    )
    patch_checkpoint("deep", root / "resources", root / "patched", PATCH_SETTINGS)
    assemble_dataset("c4", {"demo": True}, root / "c4", dataset_demo.generate)
    fingerprint = sha256_file(root / "patched" / "tokenizer.json")[:16]
    tensors, record = build_shard(
        "c4", root / "c4", root / "patched", fingerprint, CalibrationSettings(nsamples=56, seqlen=256, seed=0)
    )
    write_token_tensors(tensors, record, root / "c4.safetensors", root / "c4.json")
    return root


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.fixture(scope="module", params=DEVICES)
def device_settings(request):
    """The stage's settings on each device this machine has: every test below runs on each."""
    return {**SETTINGS, "device": request.param}


def command(root, output, settings=SETTINGS):
    return [
        sys.executable,
        "-m",
        STAGE,
        "--model",
        "deep",
        "--patched",
        str(root / "patched" / "MANIFEST.json"),
        "--calibration",
        str(root / "c4.safetensors"),
        "--manifest",
        str(output / "MANIFEST.json"),
        "--settings",
        json.dumps(settings),
    ]


def run(root, output, settings=SETTINGS):
    result = subprocess.run(command(root, output, settings), capture_output=True, text=True, env=stage_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(deep_model, device_settings):
    output = deep_model / device_settings["device"] / "uninterrupted" / "gptq-int8"
    run(deep_model, output, device_settings)
    return output


def test_checkpoint_loads_as_int8_and_beats_rtn_under_the_hessians(deep_model, device_settings, uninterrupted):
    manifest = json.loads((uninterrupted / "MANIFEST.json").read_text())
    assert manifest["quantization"]["scheme"] == "gptq-int8" and manifest["device"] == device_settings["device"]
    assert manifest["fingerprint"]["calibration_sha256"] == {
        "c4.safetensors": sha256_file(deep_model / "c4.safetensors")
    }
    assert manifest["fingerprint"]["code"] == sources_digest(STAGE)  # the stage's name, though run as __main__
    layers = manifest["layers"]
    assert sorted(layers) == [str(i) for i in range(6)]
    matrices = [f for layer in layers.values() for f in layer["matrices"].values()]
    assert len(matrices) == 6 * 7
    assert sum(f["output_error_gptq"] for f in matrices) < 0.8 * sum(f["output_error_rtn"] for f in matrices)
    assert all(f["hessian_trace"] > 0 for f in matrices)
    for layer in layers.values():
        heldout = layer["heldout_output_error"]
        assert 0 < heldout["gptq"] <= heldout["rtn"] < 0.1
    model = AutoModelForCausalLM.from_pretrained(uninterrupted, trust_remote_code=True, dtype=torch.float32)
    assert model.model.layers[5].mlp.up_proj.weight.dtype == torch.int8
    float_model = AutoModelForCausalLM.from_pretrained(
        deep_model / "patched", trust_remote_code=True, dtype=torch.float32
    )
    ids = torch.tensor([[1, 415, 5565, 302, 4843, 349, 5465, 28723, 661, 349]])
    with torch.no_grad():
        a, b = float_model(ids).logits[0, -1], model(ids).logits[0, -1]
    assert ((a - b).norm() / a.norm()) < 0.03
    assert not (uninterrupted.parent / ".gptq-int8.partial").exists()


def test_a_killed_run_resumes_and_gives_the_same_bytes(deep_model, device_settings, uninterrupted):
    output = deep_model / device_settings["device"] / "killed" / "gptq-int8"
    partial = output.parent / ".gptq-int8.partial"
    process = subprocess.Popen(command(deep_model, output, device_settings), env=stage_env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (partial / "layer-000.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output / "MANIFEST.json").exists()
    finished = sorted(p.name for p in partial.glob("layer-*.safetensors"))
    assert 1 <= len(finished) < 6
    log = run(deep_model, output, device_settings)
    assert f"layer {len(finished) - 1}: taken from" in log and f"layer {len(finished) + 1}/6 done" in log
    assert contents(output) == contents(uninterrupted)


def test_a_partial_with_another_fingerprint_is_never_used(deep_model, device_settings, uninterrupted):
    output = deep_model / device_settings["device"] / "stale" / "gptq-int8"
    other = {**device_settings, "damp": 0.05}
    process = subprocess.Popen(command(deep_model, output, other), env=stage_env(), stderr=subprocess.DEVNULL)
    partial = output.parent / ".gptq-int8.partial"
    deadline = time.monotonic() + 120
    while not (partial / "layer-000.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log = run(deep_model, output, device_settings)
    assert "layer 0: " in log and "has another fingerprint; recomputing" in log
    assert contents(output) == contents(uninterrupted)


def test_shards_from_another_tokenizer_are_refused(deep_model, tiny_checkpoints, tmp_path):
    other = tiny_checkpoints["ministral"]
    fingerprint = sha256_file(other / "tokenizer.json")[:16]
    tensors, record = build_shard(
        "c4", deep_model / "c4", other, fingerprint, CalibrationSettings(nsamples=56, seqlen=256, seed=0)
    )
    write_token_tensors(tensors, record, tmp_path / "c4.safetensors", tmp_path / "c4.json")
    cmd = command(deep_model, tmp_path / "out")
    cmd[cmd.index("--calibration") + 1] = str(tmp_path / "c4.safetensors")
    result = subprocess.run(cmd, capture_output=True, text=True, env=stage_env())
    assert result.returncode == 1
    assert f"made with tokenizer {fingerprint}, but the model's tokenizer is" in result.stderr
    assert not (tmp_path / "out").exists()


def test_too_few_samples_and_missing_cuda_are_clear_errors(deep_model, tmp_path):
    for settings, message in (
        ({**SETTINGS, "nsamples": 50}, "has 56 samples, fewer than quantize.gptq-int8.nsamples + holdout = 50 + 8"),
        ({**SETTINGS, "device": "cuda"}, "device is cuda, but torch sees no CUDA device"),
    ):
        if settings["device"] == "cuda" and torch.cuda.is_available():
            continue
        result = subprocess.run(
            command(deep_model, tmp_path / "out", settings), capture_output=True, text=True, env=stage_env()
        )
        assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_gptq_beats_rtn_on_held_out_samples_in_every_layer_of_the_demo_models(preset, tmp_path):
    """The demo presets as the default workflow builds them; 16 held-out c4 windows never enter a Hessian."""
    write_demo_checkpoint(preset, tmp_path, seed=0)
    run_stage(
        "download",
        "--model",
        preset,
        "--source",
        json.dumps({"local": str(tmp_path)}),
        "--manifest",
        tmp_path / "resources" / "MANIFEST.json",
    )
    patch_checkpoint(preset, tmp_path / "resources", tmp_path / "patched", PATCH_SETTINGS)
    assemble_dataset("c4", {"demo": True}, tmp_path / "c4", dataset_demo.generate)
    fingerprint = sha256_file(tmp_path / "patched" / "tokenizer.json")[:16]
    tensors, record = build_shard(
        "c4",
        tmp_path / "c4",
        tmp_path / "patched",
        fingerprint,
        CalibrationSettings(nsamples=48, seqlen=512, seed=0),
    )
    write_token_tensors(tensors, record, tmp_path / "c4.safetensors", tmp_path / "c4.json")
    quantize_gptq(
        preset,
        tmp_path / "patched",
        [tmp_path / "c4.safetensors"],
        tmp_path / "gptq-int8",
        GptqSettings.of({**SETTINGS, "nsamples": 32, "holdout": 16, "block_size": 128}),
        STAGE,
    )
    layers = json.loads((tmp_path / "gptq-int8" / "MANIFEST.json").read_text())["layers"]
    assert len(layers) == 2
    for index, layer in layers.items():
        heldout = layer["heldout_output_error"]
        assert 0 < heldout["gptq"] <= heldout["rtn"], (index, heldout)
