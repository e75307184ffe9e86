# Job resources of every rule, keyed by the rule's name: threads, mem_mb and runtime from
# workflow_scripts.planning.job_resources, and the gpu of the rules whose stage may run on one.
import os
import shutil

from workflow_scripts.core import variants
from workflow_scripts.core.files import read_json
from workflow_scripts.planning import job_resources
from workflow_scripts.planning.config import window_settings
from workflow_scripts.serving.sweep import BenchSettings, Limits, plan_cases


class Needs:
    """A job's threads and resources from a job_resources estimate of its wildcards and attempt; with ``device``
    (wildcards -> cuda, cpu, vacc), a ``gpu`` count too, which the SLURM executor sends as --gpus.
    """

    def __init__(self, estimate, device=None):
        self.estimate = estimate
        self.device = device

    def threads(self, wildcards):
        return self.estimate(wildcards, 1)["threads"]

    def resources(self):
        needs = {
            key: lambda wildcards, attempt, key=key: self.estimate(wildcards, attempt)[
                key
            ]
            for key in ("mem_mb", "runtime")
        }
        if self.device is not None:
            needs["gpu"] = lambda wildcards: int(self.device(wildcards) == "cuda")
        return needs


def model_size(model):
    """From the downloaded config.json once it exists; before that, what the config says (job_resources)."""
    downloaded = f"resources/models/{model}/config.json"
    if os.path.exists(downloaded):
        return job_resources.ModelSize(read_json(downloaded))
    return job_resources.planned_size(MODELS[model], WORKFLOW_PYTHON)


def stage_device(model, *keys):
    """The device of a model's stage (its settings under ``keys``): cuda, or auto on a machine with an NVIDIA
    driver, asks the scheduler for a GPU."""
    section = MODELS[model]
    for key in keys:
        section = section[key]
    uses_gpu = section["device"] == "cuda" or (
        section["device"] == "auto" and shutil.which("nvidia-smi") is not None
    )
    return "cuda" if uses_gpu else "cpu"


def device_of(*keys):
    """The device of a rule whose stage's device is under ``keys`` of its model's settings."""
    return lambda wildcards: stage_device(wildcards.model, *keys)


def evaluation_device(wildcards):
    """A compiled variant is evaluated where its packages run (aoti.device), the others where evaluate.device says."""
    compiled = variants.parse(wildcards.evaluation).kind == "aoti"
    return stage_device(wildcards.model, "aoti" if compiled else "evaluate")


def served_device(wildcards):
    """Ours runs where the compiled packages do (aoti.device); vastgenx runs on the VACC dies."""
    if variants.parse(wildcards.served).kind == "vacc":
        return "vacc"
    return stage_device(wildcards.model, "aoti")


def per_model(rule, figures=lambda wildcards: {}, device=None):
    """Needs of a per-model job: job_resources.<rule>(size, attempt, **figures(wildcards), device=...)."""
    estimate = getattr(job_resources, rule)

    def needs(wildcards, attempt):
        located = {} if device is None else {"device": device(wildcards)}
        return estimate(
            model_size(wildcards.model), attempt, **figures(wildcards), **located
        )

    return Needs(needs, device)


def quantize_gptq_figures(wildcards):
    gptq = MODELS[wildcards.model]["quantize"]["gptq-int8"]
    return {
        "samples": (gptq["nsamples"] + gptq["holdout"]) * len(gptq["datasets"]),
        "seqlen": max(DATASETS[d]["seqlen"] for d in gptq["datasets"]),
    }


def verify_tokens(wildcards):
    """Each prompt (at most a token per character) and its greedy continuation."""
    verify = MODELS[wildcards.model]["verify"]
    return {
        "tokens": sum(
            len(prompt) + verify["greedy_tokens"] for prompt in verify["prompts"]
        )
    }


def verify_figures(wildcards):
    """Verify's tokens, and its forward passes: two models, each prompt and each greedy step."""
    verify = MODELS[wildcards.model]["verify"]
    passes = 2 * len(verify["prompts"]) * (verify["greedy_tokens"] + 1)
    return verify_tokens(wildcards) | {"passes": passes}


def aoti_compile_figures(wildcards):
    """Verify's tokens, and whether the variant compiles int8 projections (about a third of a float one's memory)."""
    return verify_tokens(wildcards) | {
        "quantized": variants.parse(wildcards.variant).base != "float"
    }


def evaluate_figures(wildcards):
    """Perplexity windows and ceval prompts (each with its shots) that a variant scores, the bytes of the
    reference's logits on the windows, and whether it is a float32 package on the CPU.
    """
    model = wildcards.model
    windows = window_settings(config, MODELS[model]["evaluate"]["dataset"])
    questions = (
        MODELS[model]["evaluate"]["ceval_questions"]
        or job_resources.CEVAL_VAL_QUESTIONS
    )
    shots = config["evaluation"]["ceval"]["shots"]
    windows_scored = MODELS[model]["evaluate"]["c4_windows"] or windows["nsamples"]
    scored = windows_scored * windows["seqlen"]
    return {
        "tokens": scored
        + questions * (shots + 1) * job_resources.CEVAL_TOKENS_PER_SHOT,
        "logits_bytes": 4 * scored * model_size(model).config["vocab_size"],
        "float32_package": wildcards.evaluation == "aoti-float"
        and evaluation_device(wildcards) == "cpu",
    }


def serve_benchmark_figures(wildcards):
    """Tokens the sweep sends and receives (each case's requests, and the warm-up)."""
    model = wildcards.model
    settings = BenchSettings.of(bench_settings(model), f"models.{model}.bench")
    if variants.parse(wildcards.served).kind == "vacc":
        vamc = MODELS[model]["vamc"]
        limits = Limits(vamc["seq_in"], vamc["seq_total"] - vamc["seq_in"])
    else:
        limits = Limits.of_context(MODELS[model]["aoti"]["context"])
    cases, _ = plan_cases(settings, limits)
    tokens = sum(
        case.requests(settings) * (case.input_tokens + case.output_tokens)
        for case in cases
    )
    warmup = settings.warmup_requests * limits.max_prompt_tokens
    return {"tokens": tokens + warmup}


def tokenized(tokens_of):
    """Needs of a per-tokenizer or per-dataset job that tokenizes ``tokens_of(wildcards)`` tokens."""
    return Needs(
        lambda wildcards, attempt: job_resources.tokenize(attempt, tokens_of(wildcards))
    )


def window_tokens(dataset):
    windows = window_settings(config, dataset)
    return windows["nsamples"] * windows["seqlen"]


CEVAL_TOKENS = (
    job_resources.CEVAL_VAL_QUESTIONS
    * (config["evaluation"]["ceval"]["shots"] + 1)
    * job_resources.CEVAL_TOKENS_PER_SHOT
)
SMALL_JOB = Needs(lambda wildcards, attempt: job_resources.small(attempt))
NEEDS = {
    "download": per_model(
        "download",
        lambda wildcards: job_resources.download_figures(
            MODELS[wildcards.model]["source"], WORKFLOW_PYTHON
        ),
    ),
    "patch": per_model("patch"),
    "verify": per_model("verify", verify_figures, device_of("verify")),
    "fetch_dataset": Needs(
        lambda wildcards, attempt: job_resources.fetch_dataset(attempt)
    ),
    "tokenizer_store": SMALL_JOB,
    "calibration_shard": tokenized(
        lambda wildcards: DATASETS[wildcards.dataset]["nsamples"]
        * DATASETS[wildcards.dataset]["seqlen"]
    ),
    "c4_evaluation_windows": tokenized(
        lambda wildcards: window_tokens(wildcards.dataset)
    ),
    "ceval_evaluation_set": tokenized(lambda wildcards: CEVAL_TOKENS),
    "quantize": per_model("quantize"),
    "quantize_gptq": per_model(
        "quantize_gptq", quantize_gptq_figures, device_of("quantize", "gptq-int8")
    ),
    "export_compressed_tensors": per_model("export_compressed_tensors"),
    "vamc_config": SMALL_JOB,
    "vacc_compile": per_model(
        "vacc_compile",
        lambda wildcards: {"workers": MODELS[wildcards.model]["vamc"]["workers"]},
    ),
    "aoti_compile": per_model("aoti_compile", aoti_compile_figures, device_of("aoti")),
    "evaluate": per_model("evaluate", evaluate_figures, evaluation_device),
    "gate": SMALL_JOB,
    "plots": SMALL_JOB,
    "summary": SMALL_JOB,
    "serve_benchmark": per_model(
        "serve_benchmark", serve_benchmark_figures, served_device
    ),
    "serving_plot": SMALL_JOB,
}
