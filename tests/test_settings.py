"""Typed stage settings: parsed once, every key named, in step with the schema."""

import dataclasses
import json

import pytest
import yaml

from workflow_scripts.checkpoint.patch import PatchSettings
from workflow_scripts.compilation.aoti_build import AotiSettings
from workflow_scripts.compilation.vamc_config import VamcSettings
from workflow_scripts.core.errors import InputError
from workflow_scripts.data.calibration import CalibrationSettings
from workflow_scripts.data.evaluation_sets import CevalSettings, WindowSettings
from workflow_scripts.evaluation.evaluate import EvaluateSettings
from workflow_scripts.evaluation.gates import GateSettings
from workflow_scripts.evaluation.verify import VerifySettings
from workflow_scripts.quantization.gptq_checkpoint import GptqSettings
from workflow_scripts.quantization.int8_checkpoint import QuantizeSettings
from workflow_scripts.serving.sweep import BenchSettings

from conftest import REPO, run_stage

SCHEMA = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())
MODEL = SCHEMA["$defs"]["model"]["properties"]
# Each stage's settings and the schema section the rule hands it. The keys a settings class leaves out are the
# rule's own (which variants, which dataset's files, which source): they decide jobs and inputs, not the work.
SECTIONS = [
    (PatchSettings, MODEL["patch"], set()),
    (VerifySettings, MODEL["verify"], set()),
    (QuantizeSettings, MODEL["quantize"]["properties"]["rtn-int8"], set()),
    (GptqSettings, MODEL["quantize"]["properties"]["gptq-int8"], set()),
    (VamcSettings, MODEL["vamc"], set()),
    (AotiSettings, MODEL["aoti"], {"variants"}),
    (EvaluateSettings, MODEL["evaluate"], {"dataset"}),
    (GateSettings, MODEL["gates"], set()),
    (BenchSettings, MODEL["bench"], {"variants", "vastgenx_batch_size"}),
    (CalibrationSettings, SCHEMA["$defs"]["dataset"], {"source", "format", "evaluation"}),
    (WindowSettings, SCHEMA["$defs"]["windows"], set()),
    (CevalSettings, SCHEMA["properties"]["evaluation"]["properties"]["ceval"], set()),
]


@pytest.mark.parametrize("settings, section, rules_own", SECTIONS, ids=[s[0].__name__ for s in SECTIONS])
def test_each_stages_settings_name_the_keys_of_its_schema_section(settings, section, rules_own):
    fields = {field.name for field in dataclasses.fields(settings)}
    assert fields | rules_own == set(section["properties"])
    assert not fields & rules_own


def test_settings_are_parsed_into_their_types():
    settings = GateSettings.parse(
        '{"max_perplexity_increase": 0.01, "min_top1_agreement": null, "max_kl_divergence": 1}'
    )
    assert settings.min_top1_agreement is None and settings.max_kl_divergence == 1
    quantize = QuantizeSettings.of({"bits": 8, "modules": ["q_proj", "k_proj"]})
    assert quantize.modules == ("q_proj", "k_proj")
    assert quantize.record() == {"bits": 8, "modules": ["q_proj", "k_proj"]}
    assert CalibrationSettings.of({"nsamples": 4, "seqlen": 16, "seed": 0}).split == "train"
    with pytest.raises(dataclasses.FrozenInstanceError):
        quantize.bits = 4


@pytest.mark.parametrize(
    "values, message",
    [
        ({"insert_slice": True, "iter_num": 0, "iter_nums": 1}, r"PatchSettings: unknown setting\(s\) iter_nums"),
        ({"insert_slice": True}, r"PatchSettings: missing setting\(s\) iter_num"),
        ([True, 0], r"PatchSettings: expected a mapping of settings"),
    ],
)
def test_unknown_or_missing_keys_are_named(values, message):
    with pytest.raises(InputError, match=message):
        PatchSettings.of(values)


def test_a_nested_list_must_be_a_list():
    with pytest.raises(InputError, match=r"QuantizeSettings\.modules: expected a list"):
        QuantizeSettings.of({"bits": 8, "modules": "q_proj"})


def test_a_stage_refuses_settings_it_does_not_know_before_any_work(tmp_path):
    result = run_stage(
        "patch",
        "--model",
        "m",
        "--source",
        tmp_path / "missing" / "MANIFEST.json",
        "--manifest",
        tmp_path / "patched" / "MANIFEST.json",
        "--settings",
        json.dumps({"insert_slice": True, "iter_num": 0, "unknown": 1}),
        check=False,
    )
    assert result.returncode == 1
    assert "error: PatchSettings: unknown setting(s) unknown; this stage reads insert_slice, iter_num" in result.stderr
    assert not (tmp_path / "patched").exists()
