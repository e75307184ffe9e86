"""Stock transformers, without trust_remote_code, on the folders the workflow writes: the compressed-tensors
export loads and equals our int8 model, the patched checkpoint loads as plain Mistral, and the int8 checkpoints
refuse instead of loading their integers as float weights. (tests/test_real_model.py does the same on every
folder of a real run.)"""

import json

import pytest
import torch
from compressed_tensors.compressors import unpack_from_int32
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from workflow_scripts.checkpoint.vacc_code import load_vacc_model
from workflow_scripts.core.errors import InputError
from workflow_scripts.quantization.compressed_tensors_export import export_compressed_tensors
from workflow_scripts.quantization.int8_checkpoint import QuantizeSettings
from workflow_scripts.quantization.rtn import quantize_checkpoint

from conftest import QUANTIZE_STAGE

EXPORT_STAGE = "workflow_scripts.stages.export_compressed_tensors"
# within the tiny mistral preset's sliding window (8): beyond it stock Mistral slides and the VACC model, by the
# vendor's design, attends to everything (docs/compiled-artifacts.md)
IDS = torch.tensor([[1, 415, 5565, 302, 4843, 349, 5465, 28723]])
FLOAT_TOLERANCE = 1e-4  # relative to the largest logit: the same products, summed in another order


def stock(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def assert_same_logits(model, reference):
    with torch.no_grad():
        ours, theirs = reference(IDS).logits, model(IDS).logits
    assert (ours - theirs).abs().max() <= FLOAT_TOLERANCE * ours.abs().max()


def tensors(folder):
    found = {}
    for shard in sorted(folder.glob("model*.safetensors")):
        found.update(load_file(shard))
    return found


@pytest.fixture(scope="module")
def exported(quantized, tmp_path_factory):
    root = tmp_path_factory.mktemp("compressed-tensors")
    for preset, folder in quantized.items():
        export_compressed_tensors(preset, folder, root / preset, EXPORT_STAGE)
    return {preset: root / preset for preset in quantized}


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_the_export_loads_in_stock_transformers_and_equals_our_int8_model(quantized, exported, preset):
    model = stock(exported[preset])
    assert type(model).__module__.startswith("transformers.models.mistral")
    assert_same_logits(model, load_vacc_model(quantized[preset], torch.float32))


def test_the_export_holds_our_integers_and_scales_bit_for_bit(quantized, exported):
    ours, theirs = tensors(quantized["mistral"]), tensors(exported["mistral"])
    projections = [name[: -len(".weight_scale")] for name in ours if name.endswith(".weight_scale")]
    assert len(projections) == 2 * 7
    for prefix in projections:
        q = ours[f"{prefix}.weight"]
        shape = theirs[f"{prefix}.weight_shape"]
        assert shape.tolist() == list(q.shape)
        assert torch.equal(unpack_from_int32(theirs[f"{prefix}.weight_packed"], 8, torch.Size(shape.tolist())), q)
        assert torch.equal(theirs[f"{prefix}.weight_scale"], ours[f"{prefix}.weight_scale"].reshape(-1, 1))
    others = {name for name in ours if not name.startswith(tuple(projections))}
    assert others and all(torch.equal(theirs[name], ours[name]) for name in others)


def test_the_export_config_is_stock_mistral_with_a_compressed_tensors_quantization(patched, exported):
    config = json.loads((exported["mistral"] / "config.json").read_text())
    patched_config = json.loads((patched["mistral"] / "config.json").read_text())
    assert "auto_map" not in config and "vacc_quantization" not in config and config["model_type"] == "mistral"
    assert {k: v for k, v in config.items() if k != "quantization_config"} == {
        k: v for k, v in patched_config.items() if k != "auto_map"
    }
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "compressed-tensors" and quantization["format"] == "pack-quantized"
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["type"], weights["symmetric"], weights["strategy"]) == (
        8,
        "int",
        True,
        "channel",
    )
    assert quantization["config_groups"]["group_0"]["input_activations"] is None
    assert quantization["ignore"] == ["lm_head"]
    assert not list(exported["mistral"].glob("*.py")) and not (exported["mistral"] / "config_vacc.json").exists()


def test_projections_left_in_float_are_named_in_ignore(patched, tmp_path):
    settings = QuantizeSettings(bits=8, modules=("q_proj", "down_proj"))
    quantize_checkpoint("mistral", "rtn-int8", patched["mistral"], tmp_path / "int8", settings, QUANTIZE_STAGE)
    export_compressed_tensors("mistral", tmp_path / "int8", tmp_path / "ct", EXPORT_STAGE)
    ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "model.layers.1.self_attn.k_proj" in ignore and "model.layers.0.mlp.down_proj" not in ignore
    assert_same_logits(stock(tmp_path / "ct"), load_vacc_model(tmp_path / "int8", torch.float32))


def test_a_float_checkpoint_is_refused_and_nothing_is_left(patched, tmp_path):
    with pytest.raises(InputError, match=r"patched/config.json has no vacc_quantization"):
        export_compressed_tensors("mistral", patched["mistral"], tmp_path / "ct", EXPORT_STAGE)
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_the_patched_checkpoint_loads_as_plain_mistral_with_the_same_logits(patched, preset):
    model = stock(patched[preset])
    assert type(model).__module__.startswith("transformers.models.mistral")
    assert_same_logits(model, load_vacc_model(patched[preset], torch.float32))


def test_stock_loading_of_an_int8_checkpoint_refuses_and_says_what_to_do(quantized):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        stock(quantized["mistral"])
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(quantized["mistral"], trust_remote_code=False)
