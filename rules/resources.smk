# Job resources: threads, mem_mb and runtime of each rule from workflow_scripts.planning.job_resources.


class Needs:
    """A job's threads and resources (mem_mb, runtime) from a job_resources estimate of its wildcards and attempt."""

    def __init__(self, estimate):
        self.estimate = estimate

    def threads(self, wildcards):
        return self.estimate(wildcards, 1)["threads"]

    def resources(self, **extra):
        return {
            key: lambda wildcards, attempt, key=key: self.estimate(wildcards, attempt)[
                key
            ]
            for key in ("mem_mb", "runtime")
        } | extra


def model_size(model):
    """From the downloaded config.json once it exists; before that, what the config says (job_resources)."""
    downloaded = f"resources/models/{model}/config.json"
    if os.path.exists(downloaded):
        return job_resources.ModelSize(read_json(downloaded))
    return job_resources.planned_size(MODELS[model], WORKFLOW_PYTHON)


def per_model(stage, figures=lambda model: {}):
    """Needs of a per-model job: job_resources.<stage>(size, attempt, **figures(model))."""
    estimate = getattr(job_resources, stage)
    return Needs(
        lambda wildcards, attempt: estimate(
            model_size(wildcards.model), attempt, **figures(wildcards.model)
        )
    )


def gptq_figures(model):
    gptq = MODELS[model]["quantize"]["gptq-int8"]
    return {
        "samples": (gptq["nsamples"] + gptq["holdout"]) * len(gptq["datasets"]),
        "seqlen": max(DATASETS[d]["seqlen"] for d in gptq["datasets"]),
        "device": stage_device(model, "quantize", "gptq-int8"),
    }


def verify_tokens(model):
    """Each prompt (at most a token per character) and its greedy continuation."""
    verify = MODELS[model]["verify"]
    return {
        "tokens": sum(
            len(prompt) + verify["greedy_tokens"] for prompt in verify["prompts"]
        ),
        "device": stage_device(model, "verify"),
    }


def verify_figures(model):
    """Verify's tokens, and its forward passes: two models, each prompt and each greedy step."""
    verify = MODELS[model]["verify"]
    return verify_tokens(model) | {
        "passes": 2 * len(verify["prompts"]) * (verify["greedy_tokens"] + 1)
    }


def aoti_figures(model):
    return verify_tokens(model) | {"device": stage_device(model, "aoti")}


def evaluation_figures(wildcards):
    """Perplexity windows and ceval prompts (each with its shots) that a variant scores, the bytes of the
    reference's logits on the windows, and where it runs: a compiled variant on its packages' device.
    """
    model = wildcards.model
    windows = window_settings(config, MODELS[model]["evaluate"]["dataset"])
    questions = (
        MODELS[model]["evaluate"]["ceval_questions"]
        or job_resources.CEVAL_VAL_QUESTIONS
    )
    shots = config["evaluation"]["ceval"]["shots"]
    scored = (MODELS[model]["evaluate"]["c4_windows"] or windows["nsamples"]) * windows[
        "seqlen"
    ]
    compiled = wildcards.evaluation.startswith("aoti-")
    device = stage_device(model, "aoti" if compiled else "evaluate")
    return {
        "tokens": scored
        + questions * (shots + 1) * job_resources.CEVAL_TOKENS_PER_SHOT,
        "device": device,
        "logits_bytes": 4 * scored * model_size(model).config["vocab_size"],
        "float32_package": wildcards.evaluation == "aoti-float" and device == "cpu",
    }


def serve_benchmark_figures(wildcards):
    """Tokens the sweep sends and receives (each case's requests, and the warm-up), and where the server runs."""
    model = wildcards.model
    settings = BenchSettings.of(bench_settings(model), f"models.{model}.bench")
    if wildcards.served.startswith("vacc-"):
        vamc = MODELS[model]["vamc"]
        limits = Limits(vamc["seq_in"], vamc["seq_total"] - vamc["seq_in"])
        device = "vacc"
    else:
        aoti = MODELS[model]["aoti"]
        limits = Limits(
            aoti["seq_in"], output_budget(aoti["seq_in"], aoti["seq_total"])
        )
        device = stage_device(model, "aoti")
    cases, _ = plan_cases(settings, limits)
    tokens = sum(
        case.requests(settings) * (case.input_tokens + case.output_tokens)
        for case in cases
    )
    warmup = settings.warmup_requests * limits.max_prompt_tokens
    return {"tokens": tokens + warmup, "device": device}


def tokenized(tokens_of):
    """Needs of a per-tokenizer or per-dataset job that tokenizes ``tokens_of(wildcards)`` tokens."""
    return Needs(
        lambda wildcards, attempt: job_resources.tokenize(attempt, tokens_of(wildcards))
    )


def dataset_tokens(dataset):
    return DATASETS[dataset]["nsamples"] * DATASETS[dataset]["seqlen"]


SMALL_JOB = Needs(lambda wildcards, attempt: job_resources.small(attempt))
NEEDS = {
    "download": per_model(
        "download",
        lambda model: job_resources.download_figures(
            MODELS[model]["source"], WORKFLOW_PYTHON
        ),
    ),
    "patch": per_model("patch"),
    "verify": per_model("verify", verify_figures),
    "quantize": per_model("quantize"),
    "export": per_model("export"),
    "gptq": per_model("gptq", gptq_figures),
    "vacc_compile": per_model(
        "vacc_compile", lambda model: {"workers": MODELS[model]["vamc"]["workers"]}
    ),
    "aoti_compile": per_model("aoti_compile", aoti_figures),
    "serve_benchmark": Needs(
        lambda wildcards, attempt: job_resources.serve_benchmark(
            model_size(wildcards.model), attempt, **serve_benchmark_figures(wildcards)
        )
    ),
    "evaluate": Needs(
        lambda wildcards, attempt: job_resources.evaluate(
            model_size(wildcards.model), attempt, **evaluation_figures(wildcards)
        )
    ),
    "fetch_dataset": Needs(
        lambda wildcards, attempt: job_resources.download_dataset(attempt)
    ),
    "calibration_shard": tokenized(lambda wildcards: dataset_tokens(wildcards.dataset)),
    "c4_windows": tokenized(
        lambda wildcards: (
            window_settings(config, wildcards.dataset)["nsamples"]
            * window_settings(config, wildcards.dataset)["seqlen"]
        )
    ),
    "ceval_set": tokenized(
        lambda wildcards: (
            job_resources.CEVAL_VAL_QUESTIONS
            * (config["evaluation"]["ceval"]["shots"] + 1)
            * job_resources.CEVAL_TOKENS_PER_SHOT
        )
    ),
}
