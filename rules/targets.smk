# What each model and each tokenizer builds: the inputs of `rule all` and of each model's target rule.
from workflow_scripts.core import variants
from workflow_scripts.core.files import read_json
from workflow_scripts.data.tokenizers import tokenizer_fingerprint


def download_manifest(model):
    return f"resources/models/{model}/MANIFEST.json"


def manifest_tokenizer(model, manifest):
    """The tokenizer fingerprint that a model's download manifest lists."""
    return tokenizer_fingerprint(read_json(manifest), f"model {model}")


def model_tokenizer(model):
    """A model's tokenizer fingerprint, known once its download (a checkpoint) has run."""
    return manifest_tokenizer(model, checkpoints.download.get(model=model).output[0])


def gptq_datasets(model):
    """The datasets GPTQ calibrates a model on (its shards' datasets); none without the gptq-int8 scheme."""
    quantize = MODELS[model]["quantize"]
    return (
        quantize["gptq-int8"]["datasets"] if "gptq-int8" in quantize["schemes"] else []
    )


def tokenizer_outputs(fingerprint, models):
    """Calibration shards and evaluation sets of one tokenizer: those of the datasets its ``models`` use.

    (vamc.dataset's raw files are read by vamc itself, untokenized.)
    """
    outputs = []
    for dataset in sorted({d for model in models for d in gptq_datasets(model)}):
        for ext in ("safetensors", "json"):
            outputs.append(f"results/calibration/{fingerprint}/{dataset}.{ext}")
    for dataset in sorted({MODELS[model]["evaluate"]["dataset"] for model in models}):
        outputs.append(
            f"results/evaluation-sets/{fingerprint}/{dataset}-validation.safetensors"
        )
    outputs.append(f"results/evaluation-sets/{fingerprint}/ceval.json")
    return outputs


def model_evaluations(model):
    """The evaluation of every variant of a model: eager checkpoints and compiled packages."""
    return [
        f"results/{model}/eval/{variant}.json"
        for variant in variants.model_variants(MODELS[model])
    ]


def bench_variants(model):
    """What a model's serving benchmark serves: bench.variants, by default every compiled variant and, where
    vastgenx is on PATH, every VACC build."""
    chosen = MODELS[model]["bench"]["variants"]
    if chosen is not None:
        return chosen
    kinds = ("aoti", "vacc") if VACC_COMPILE and VASTGENX_FOUND else ("aoti",)
    return variants.model_variants(MODELS[model], kinds)


def model_benchmarks(model):
    return [
        f"results/{model}/bench/{variant}.json" for variant in bench_variants(model)
    ]


def model_builds(model):
    """Every file a model's stages build, before its gate and report."""
    settings = MODELS[model]
    outputs = [f"results/{model}/patched/verify.json"]
    for scheme in settings["quantize"]["schemes"]:
        outputs.append(f"results/{model}/quantized/{scheme}/MANIFEST.json")
        if "compressed-tensors" in settings["quantize"]["exports"]:
            outputs.append(f"results/{model}/quantized/{scheme}-ct/MANIFEST.json")
    for dtype in variants.VAMC_DTYPES:
        outputs.append(f"results/{model}/vamc/{dtype}.yaml")
        if VACC_COMPILE:
            outputs.append(f"results/{model}/vacc/{dtype}/MANIFEST.json")
    for variant in settings["aoti"]["variants"]:
        outputs.append(f"results/{model}/aoti/{variant}/MANIFEST.json")
    return outputs + model_evaluations(model) + model_benchmarks(model)


def model_report(model):
    """A model's gate and report plots."""
    plots = ["metrics", "stages", "quantization-error"] + (
        ["serving"] if model_benchmarks(model) else []
    )
    return [f"results/{model}/gate.json"] + [
        f"results/report/{model}/{plot}.png" for plot in plots
    ]


def model_outputs(models):
    """The final per-model files of each model."""
    return [
        path for model in models for path in model_builds(model) + model_report(model)
    ]


def shared_outputs(models):
    """Input function: the calibration and evaluation files of each of these models' tokenizers."""

    def outputs(wildcards):
        by_tokenizer = {}
        for model in models:
            by_tokenizer.setdefault(model_tokenizer(model), []).append(model)
        return [
            path
            for fingerprint in sorted(by_tokenizer)
            for path in tokenizer_outputs(fingerprint, by_tokenizer[fingerprint])
        ]

    return outputs
