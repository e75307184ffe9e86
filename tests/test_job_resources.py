"""What jobs ask a scheduler for: sized by the model, grown on every retry."""

from dataclasses import dataclass

import pytest
import yaml

from workflow_scripts.checkpoint.demo_presets import demo_config
from workflow_scripts.planning import job_resources
from workflow_scripts.planning.job_resources import ModelSize, planned_size

from conftest import REPO, embedded_default

REAL = embedded_default()["models"]
SCALE_7B = yaml.safe_load((REPO / "config" / "scale-7b.yaml").read_text())["models"]["scale-7b"]
DEMO = planned_size({"source": {"demo": "mistral"}})
SEVEN_B = planned_size(REAL["mistral-7b-instruct-v0.2"])
PER_MODEL = {
    "download": {"generated": False},
    "patch": {},
    "verify": {"tokens": 300, "passes": 102, "device": "cpu"},
    "quantize": {},
    "quantize_gptq": {"samples": 144, "seqlen": 1024, "device": "cpu"},
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
    size = planned_size(SCALE_7B)
    assert size.parameters == SEVEN_B.parameters and size.layers == 32
    assert size.config["sliding_window"] is None and size.config["vocab_size"] == 32000


def mistral_7b_shaped(layers):
    """config/scale-7b.yaml's model (Mistral-7B-Instruct-v0.2's shape) with ``layers`` layers."""
    size = planned_size(SCALE_7B)
    return ModelSize({**size.config, "num_hidden_layers": layers})


MINISTRAL_8B_LAYER = ModelSize(
    demo_config(
        "ministral",
        {
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 1,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
        },
    )
)
# SmolLM2-135M-Instruct as its GGUF file's header describes it (requirements-models.txt installs the file)
SMOLLM2 = planned_size(REAL["smollm2-135m-instruct"])
assert SMOLLM2.layers == 30, "the GGUF file of requirements-models.txt was not found"


@dataclass(frozen=True)
class MeasuredPeak:
    """A job's measured peak host memory (RSS), and the document section that states it."""

    stage: str  # the job_resources function that sizes the job
    label: str
    size: ModelSize
    figures: dict
    peak_gb: float
    where: str


# Host memory only: mem_mb is what a job asks for (a GPU is asked for whole). Peaks from Snakemake's benchmark
# files (the CPU rows of "Real size") are lower bounds: it samples a job's memory every 30 s after its first 15 s.
# Tokens, passes and logits move a request's time, not its memory: each device gets one set.
CPU_7B = "figures.md, Real size: on the CPU"
H200 = "figures.md, Real size: on one GPU (the H200 host)"
DEMO_DOWNLOAD = "figures.md, Real size: the demo download"
VERIFY = {"tokens": 300, "passes": 102}
EVALUATE = {"tokens": 65536, "logits_bytes": 4 * 65536 * 32000}
MEASURED = [
    MeasuredPeak("download", "7b", mistral_7b_shaped(32), {"generated": True}, 1.0, CPU_7B),
    MeasuredPeak("download", "7b-8-layers", mistral_7b_shaped(8), {"generated": True}, 1.44, DEMO_DOWNLOAD),
    MeasuredPeak("download", "ministral-8b-1-layer", MINISTRAL_8B_LAYER, {"generated": True}, 4.60, DEMO_DOWNLOAD),
    MeasuredPeak("download", "demo", DEMO, {"generated": True}, 0.39, DEMO_DOWNLOAD),
    MeasuredPeak(
        "download",
        "smollm2-gguf",
        SMOLLM2,
        {"generated": False, "gguf_bytes": 98_362_432},
        0.66,
        "real-models.md, GGUF",
    ),
    MeasuredPeak("patch", "7b", mistral_7b_shaped(32), {}, 0.06, CPU_7B),
    MeasuredPeak("verify", "7b", mistral_7b_shaped(32), VERIFY | {"device": "cpu"}, 14.2, CPU_7B),
    MeasuredPeak("verify", "1-layer", mistral_7b_shaped(1), VERIFY | {"device": "cpu"}, 1.6, CPU_7B),
    MeasuredPeak("verify", "2-layers", mistral_7b_shaped(2), VERIFY | {"device": "cpu"}, 2.2, CPU_7B),
    MeasuredPeak("verify", "8-layers-cuda", mistral_7b_shaped(8), VERIFY | {"device": "cuda"}, 6.2, H200),
    MeasuredPeak("quantize", "7b", mistral_7b_shaped(32), {}, 0.48, CPU_7B),
    MeasuredPeak("quantize", "1-layer", mistral_7b_shaped(1), {}, 0.36, CPU_7B),
    MeasuredPeak("quantize", "2-layers", mistral_7b_shaped(2), {}, 0.51, CPU_7B),
    MeasuredPeak("quantize", "8-layers", mistral_7b_shaped(8), {}, 0.75, H200),
    MeasuredPeak("quantize", "7b-bench", mistral_7b_shaped(32), {}, 0.68, "figures.md, Quantize benchmark"),
    # 8 + 2 samples of c4, the default calibration set, at its default 1024 tokens
    MeasuredPeak(
        "quantize_gptq",
        "2-layers",
        mistral_7b_shaped(2),
        {"samples": 10, "seqlen": 1024, "device": "cpu"},
        11.5,
        CPU_7B,
    ),
    MeasuredPeak(
        "quantize_gptq", "demo", DEMO, {"samples": 144, "seqlen": 1024, "device": "cpu"}, 1.49, "gptq.md, Memory"
    ),
    MeasuredPeak(
        "quantize_gptq",
        "8-layers-cuda",
        mistral_7b_shaped(8),
        {"samples": 144, "seqlen": 1024, "device": "cuda"},
        4.1,
        H200,
    ),
    MeasuredPeak("evaluate", "7b", mistral_7b_shaped(32), EVALUATE | {"device": "cpu"}, 11.2, CPU_7B),
    MeasuredPeak("evaluate", "1-layer", mistral_7b_shaped(1), EVALUATE | {"device": "cpu"}, 2.1, CPU_7B),
    MeasuredPeak("evaluate", "2-layers", mistral_7b_shaped(2), EVALUATE | {"device": "cpu"}, 2.7, CPU_7B),
    MeasuredPeak("evaluate", "8-layers-cuda", mistral_7b_shaped(8), EVALUATE | {"device": "cuda"}, 4.9, H200),
    MeasuredPeak(
        "aoti_compile",
        "7b-int8",
        mistral_7b_shaped(32),
        {"tokens": 300, "device": "cpu", "quantized": True},
        17.1,
        CPU_7B,
    ),
    MeasuredPeak("aoti_compile", "1-layer-float", mistral_7b_shaped(1), {"tokens": 300, "device": "cpu"}, 2.5, CPU_7B),
    MeasuredPeak("aoti_compile", "8-layers-cuda", mistral_7b_shaped(8), {"tokens": 300, "device": "cuda"}, 5.7, H200),
]
# calibration_shard's job, sized by job_resources.tokenize: bench_calibration.py's 128 windows of 1024 tokens
CALIBRATION_TOKENS = 128 * 1024
TOKENIZE_PEAKS_GB = {"sentencepiece-v1": 0.128, "tekken-240911": 0.254}  # figures.md, Calibration benchmark
# A request holds its measured peak and asks at most twice it plus 2 GB (the formulas round a process's fixed cost
# up to 1-2 GB), so a stage change that moves a peak has to move its request.
MARGIN = 2
ALLOWANCE_GB = 2


def within_margin(asked_mb, peak_gb):
    return peak_gb <= asked_mb / 1000 <= MARGIN * peak_gb + ALLOWANCE_GB


@pytest.mark.parametrize("peak", MEASURED, ids=lambda peak: f"{peak.stage}-{peak.label}")
def test_a_request_holds_its_measured_peak_and_asks_at_most_twice_it_plus_2_gb(peak):
    asked = getattr(job_resources, peak.stage)(peak.size, 1, **peak.figures)["mem_mb"]
    assert within_margin(asked, peak.peak_gb), (
        f"{peak.stage} asks {asked} MB; {peak.peak_gb} GB measured ({peak.where})"
    )


@pytest.mark.parametrize("tokenizer", sorted(TOKENIZE_PEAKS_GB))
def test_the_calibration_shard_request_holds_its_measured_peak(tokenizer):
    asked = job_resources.tokenize(1, CALIBRATION_TOKENS)["mem_mb"]
    assert within_margin(asked, TOKENIZE_PEAKS_GB[tokenizer]), asked
