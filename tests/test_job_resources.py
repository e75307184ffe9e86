"""What jobs ask a scheduler for: sized by the model, grown on every retry."""

import pytest

from workflow_scripts.checkpoint.demo_presets import demo_config
from workflow_scripts.planning import job_resources
from workflow_scripts.planning.job_resources import ModelSize, planned_size

from conftest import embedded_default

REAL = embedded_default()["models"]
DEMO = planned_size({"source": {"demo": "mistral"}})
SEVEN_B = planned_size(REAL["mistral-7b-instruct-v0.2"])
PER_MODEL = {
    "download": {"generated": False},
    "patch": {},
    "verify": {"tokens": 300, "passes": 102, "device": "cpu"},
    "quantize": {},
    "gptq": {"samples": 144, "seqlen": 1024, "device": "cpu"},
    "vacc_compile": {"workers": 4},
    "aoti_compile": {"tokens": 300, "device": "cpu"},
    "evaluate": {"tokens": 65536, "device": "cpu", "logits_bytes": 4 * 65536 * 32000},
}


def test_the_real_models_configured_shape_gives_their_published_parameter_counts():
    assert SEVEN_B.parameters == 7_241_732_096
    assert planned_size(REAL["ministral-8b-instruct-2410"]).parameters == 8_019_808_256
    assert SEVEN_B.weight_bytes == 2 * SEVEN_B.parameters


def test_a_demo_model_is_sized_from_its_preset_and_a_hub_model_without_shape_as_8b_class():
    assert DEMO.config == demo_config("mistral")
    guessed = planned_size({"source": {"hub": "org/model", "revision": "main"}})
    assert guessed.parameters > planned_size(REAL["ministral-8b-instruct-2410"]).parameters
    assert planned_size({"source": {"hub": "org/m", "revision": "r"}, "shape": {"num_hidden_layers": 2}}).layers == 2


@pytest.mark.parametrize("stage", sorted(PER_MODEL))
def test_every_retry_asks_for_half_as_much_memory_and_time_again(stage):
    estimate = getattr(job_resources, stage)
    first, second, third = (estimate(SEVEN_B, attempt, **PER_MODEL[stage]) for attempt in (1, 2, 3))
    for key in ("mem_mb", "runtime"):  # each figure is rounded up: within 1 + growth of the exact ratio
        assert second[key] == pytest.approx(1.5 * first[key], abs=2.5)
        assert third[key] == pytest.approx(2.25 * first[key], abs=3.25)
    assert first["threads"] == second["threads"] == third["threads"]


@pytest.mark.parametrize("stage", sorted(PER_MODEL))
def test_a_7b_model_asks_for_more_than_a_demo_model(stage):
    estimate = getattr(job_resources, stage)
    small, large = (estimate(size, 1, **PER_MODEL[stage]) for size in (DEMO, SEVEN_B))
    assert large["mem_mb"] >= small["mem_mb"] and large["runtime"] >= small["runtime"]
    assert large["mem_mb"] > small["mem_mb"] or large["runtime"] > small["runtime"]


def test_gptq_on_a_gpu_needs_little_host_memory_and_minutes_instead_of_hours():
    cpu = job_resources.quantize_gptq(SEVEN_B, 1, samples=144, seqlen=1024, device="cpu")
    gpu = job_resources.quantize_gptq(SEVEN_B, 1, samples=144, seqlen=1024, device="cuda")
    assert gpu["mem_mb"] < cpu["mem_mb"] and gpu["runtime"] * 10 < cpu["runtime"]


def test_on_the_cpu_a_7b_models_verify_and_evaluate_fit_20_gb_holding_its_bf16_weights_once():
    for stage, figures in (("verify", PER_MODEL["verify"]), ("evaluate", PER_MODEL["evaluate"])):
        request = getattr(job_resources, stage)(SEVEN_B, 1, **figures)
        assert SEVEN_B.weight_bytes / 1e6 < request["mem_mb"] < 20_000


@pytest.mark.parametrize("stage", ["verify", "aoti_compile", "evaluate"])
def test_on_a_gpu_the_heavy_stages_ask_for_less_host_memory_and_time_than_on_the_cpu(stage):
    estimate = getattr(job_resources, stage)
    cpu = estimate(SEVEN_B, 1, **PER_MODEL[stage])
    gpu = estimate(SEVEN_B, 1, **(PER_MODEL[stage] | {"device": "cuda"}))
    assert gpu["mem_mb"] <= cpu["mem_mb"] and gpu["runtime"] < cpu["runtime"] and gpu["threads"] < cpu["threads"]


def test_compute_threads_follow_the_weights():
    assert DEMO.compute_threads == 2 and SEVEN_B.compute_threads == 8
    assert ModelSize({**SEVEN_B.config, "num_hidden_layers": 320}).compute_threads == 16


def test_the_scale_config_is_mistral_7b_shaped():
    import yaml

    from conftest import REPO

    scale = yaml.safe_load((REPO / "config" / "scale-7b.yaml").read_text())["models"]["scale-7b"]
    size = planned_size(scale)
    assert size.parameters == SEVEN_B.parameters and size.layers == 32
    assert size.config["sliding_window"] is None and size.config["vocab_size"] == 32000
