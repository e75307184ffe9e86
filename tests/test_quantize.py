"""The streamed rtn-int8 checkpoint: bit-identical to in-memory quantize(8), loadable, bounded, and strict."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from workflow_scripts.core.errors import InputError
from workflow_scripts.quantization.int8_checkpoint import INT8_MODEL_TYPE, PROJECTIONS
from workflow_scripts.quantization.rtn import quantize_checkpoint

from conftest import QUANTIZE_SETTINGS as SETTINGS
from conftest import QUANTIZE_STAGE

IDS = torch.tensor([[1, 415, 5565, 302, 4843, 349, 5465, 28723, 661, 349, 264, 1628, 2990, 28723, 13, 13]])


def load(folder, dtype=torch.bfloat16):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()


def shard_tensors(folder):
    tensors = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_streamed_file_is_bit_identical_to_in_memory_quantize(patched, quantized, preset):
    reference = load(patched[preset]).quantize(8).state_dict()
    written = shard_tensors(quantized[preset])
    assert set(written) == set(reference)
    for name, tensor in reference.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    loaded = load(quantized[preset]).state_dict()
    assert all(torch.equal(loaded[name], reference[name]) for name in reference)


def test_checkpoint_layout_config_and_manifest(patched, quantized):
    folder = quantized["mistral"]
    config = json.loads((folder / "config.json").read_text())
    assert config["vacc_quantization"] == {
        "scheme": "rtn-int8",
        "bits": 8,
        "granularity": "per_channel",
        "symmetric": True,
        "modules": list(PROJECTIONS),
    }
    assert config.pop("model_type") == INT8_MODEL_TYPE
    assert {k: v for k, v in config.items() if k != "vacc_quantization"} == {
        k: v for k, v in json.loads((patched["mistral"] / "config.json").read_text()).items() if k != "model_type"
    }
    vacc_config = json.loads((folder / "config_vacc.json").read_text())
    assert vacc_config["vacc_quantization"] == config["vacc_quantization"] and vacc_config["model_type"] == "mistral"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(shard_tensors(folder))
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert set(manifest["fingerprint"]) == {"patched_manifest_sha256", "settings", "code"}
    assert len(manifest["matrices"]) == 2 * len(PROJECTIONS)
    for figures in manifest["matrices"].values():
        assert figures["max_error_in_scale_units"] <= 0.5
        assert 0 < figures["relative_frobenius_error"] < 0.01
    tensors = shard_tensors(folder)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.int8
    assert (folder / "tokenizer.json").samefile(patched["mistral"] / "tokenizer.json")


def test_round_trip_error_is_at_most_half_a_scale_step(patched, quantized):
    original = shard_tensors(patched["mistral"])
    written = shard_tensors(quantized["mistral"])
    for layer in range(2):
        for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            key = f"model.layers.{layer}.{name}.weight"
            scale = written[f"{key}_scale"].float().unsqueeze(1)
            error = (original[key].float() - written[key].float() * scale).abs()
            assert (error <= 0.5 * scale + 1e-12).all(), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model_stays_close_to_the_float_model(patched, quantized, dtype):
    """Bound: relative L2 error of the last-position logits <= 2%, and the same top token.

    Per-channel int8 rounds each weight by at most half a step, max|W|/254 per
    row: about 0.5-0.7% relative Frobenius error on these Gaussian weights (the
    manifest records it). Fourteen such matrices in two layers give about 1.2%
    on the last-position logits of the demo models; 2% leaves room for that and
    still fails for any real bug (a wrong scale, a transposed or unscaled weight
    gives errors near 100%).
    """
    float_logits = load(patched["ministral"], dtype)(IDS).logits[0, -1].float()
    int8_model = load(quantized["ministral"], dtype)
    assert int8_model.model.layers[0].mlp.gate_proj.weight.dtype == torch.int8
    int8_logits = int8_model(IDS).logits[0, -1].float()
    relative = ((int8_logits - float_logits).norm() / float_logits.norm()).item()
    assert 0 < relative <= 0.02
    assert int8_logits.argmax() == float_logits.argmax()


# ---- bad input -------------------------------------------------------------------------------------------------


def rewrite(folder, edit):
    """Apply ``edit(tensors)`` to the shard that holds layer 0's q_proj."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    tensors = load_file(shard)
    edit(tensors)
    shard.unlink()  # the patched folder holds hardlinks: never write through them
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {name: index["weight_map"].get(name, shard.name) for name in {*index["weight_map"], *tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def quantize_error(folder, tmp_path):
    target = tmp_path / "out"
    with pytest.raises(InputError) as error:
        quantize_checkpoint("m", "rtn-int8", folder, target, SETTINGS, QUANTIZE_STAGE)
    assert not target.exists()
    return str(error.value)


def test_truncated_safetensors_is_named(patched, copy_checkpoint, tmp_path):
    folder = copy_checkpoint(patched["mistral"])
    shard = folder / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    shard.write_bytes(data[: len(data) // 2])
    message = quantize_error(folder, tmp_path)
    assert "model-00002-of-00002.safetensors" in message and "truncated" in message
    shard.unlink()
    shard.write_bytes(b"\xff" * 16)
    assert "truncated or corrupt" in quantize_error(folder, tmp_path)


def test_unexpected_shape_or_dtype_is_named(patched, copy_checkpoint, tmp_path):
    folder = copy_checkpoint(patched["mistral"], "shape")
    rewrite(
        folder,
        lambda t: t.update(
            {"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"][:-1]}
        ),
    )
    message = quantize_error(folder, tmp_path)
    assert "model.layers.0.self_attn.q_proj.weight has shape [63, 64], expected [64, 64]" in message
    folder = copy_checkpoint(patched["mistral"], "dtype")
    rewrite(
        folder,
        lambda t: t.update(
            {"model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"].to(torch.int8)}
        ),
    )
    assert "q_proj.weight has dtype torch.int8, expected a float weight" in quantize_error(folder, tmp_path)


def test_missing_layer_or_module_names_are_named(patched, copy_checkpoint, tmp_path):
    folder = copy_checkpoint(patched["mistral"], "layers")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    assert "has no tensor model.layers.2.input_layernorm.weight" in quantize_error(folder, tmp_path)

    folder = copy_checkpoint(patched["mistral"], "names")

    def rename(tensors):
        tensors["model.layers.0.self_attn.qkv_proj.weight"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")

    rewrite(folder, rename)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    message = quantize_error(folder, tmp_path)
    assert "has no tensor model.layers.0.self_attn.q_proj.weight" in message
    assert "not Mistral's module names" in message


def test_all_zero_rows_give_zero_scale_and_finite_outputs(patched, copy_checkpoint, tmp_path):
    folder = copy_checkpoint(patched["mistral"], "zeros")

    def zero_rows(tensors):
        weight = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
        weight[:5] = 0
        tensors["model.layers.0.self_attn.q_proj.weight"] = weight

    rewrite(folder, zero_rows)
    target = tmp_path / "q"
    quantize_checkpoint("m", "rtn-int8", folder, target, SETTINGS, QUANTIZE_STAGE)
    written = shard_tensors(target)
    scale = written["model.layers.0.self_attn.q_proj.weight_scale"]
    assert (scale[:5] == 0).all() and (written["model.layers.0.self_attn.q_proj.weight"][:5] == 0).all()
    assert torch.isfinite(scale).all()
    logits = load(target, torch.float32)(IDS).logits
    assert torch.isfinite(logits).all()
    shutil.rmtree(target)


def test_int8_projections_in_bfloat16_on_the_cpu_use_the_int8_kernel_at_any_alignment():
    """``linear_int8`` in bfloat16 on the CPU (PyTorch's int8 weight-only kernel) gives the float32 dequantized
    product to bfloat16's precision, and the module copies a weight mapped at an 8-byte offset (as from a
    safetensors file) to aligned memory, where the kernel would crash."""
    from workflow_scripts.checkpoint.vacc_files.quantization_vacc import (
        ALIGNMENT,
        QuantizedLinearPerChannel,
        dequantize,
        linear_int8,
    )

    torch.manual_seed(0)
    layer = QuantizedLinearPerChannel.from_linear(torch.nn.Linear(64, 48, bias=False).to(torch.bfloat16))
    hidden = torch.randn(2, 3, 64)
    expected = hidden @ dequantize(layer.weight, layer.weight_scale, torch.float32).T
    got = linear_int8(hidden.bfloat16(), layer.weight, layer.weight_scale).float()
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    storage = torch.empty(48 * 64 + ALIGNMENT, dtype=torch.int8)
    offset = next(i for i in range(ALIGNMENT) if (storage.data_ptr() + i) % ALIGNMENT == 8)
    layer.weight.data = storage[offset : offset + 48 * 64].view(48, 64).copy_(layer.weight.data)
    assert layer.weight.data_ptr() % ALIGNMENT == 8
    assert torch.equal(layer(hidden.bfloat16()), got.bfloat16())
    assert layer.weight.data_ptr() % ALIGNMENT == 0
