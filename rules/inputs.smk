# Input and params functions, named after the rules that use them, in stage order.
import json
import os
import re
import shlex

from workflow_scripts.checkpoint import gguf as gguf_source
from workflow_scripts.core import variants
from workflow_scripts.planning.config import (
    DATASET_SOURCE_KEYS,
    source_kind,
    window_settings,
)


def model_settings(*keys):
    """Params function: one model's config section as JSON, so a change reruns that model only.

    ``keys`` lead into the model's settings; each is formatted with the wildcards (``"{scheme}"``).
    """

    def section(wildcards):
        value = MODELS[wildcards.model]
        for key in keys:
            value = value[key.format(**wildcards)]
        return json.dumps(value, sort_keys=True)

    return section


def verified_checkpoint():
    """The input that makes a stage wait for its model's verification: a failing checkpoint yields nothing.

    ancient: re-verifying (new verify settings) that passes again does not rebuild every stage after it;
    one that fails leaves no verify.json, so the next run stops at verify.
    """
    return ancient("results/{model}/patched/verify.json")


def download_stage(model):
    """The download rule's stage for the model's source kind: download (hub, local), download_demo (generated),
    download_gguf (a GGUF file imported)."""
    kind = source_kind(f"models.{model}.source", MODELS[model]["source"])
    return {"demo": "download_demo", "gguf": "download_gguf"}.get(kind, "download")


def download_source_files(wildcards):
    """For a local source, its config and weights, for a gguf source its file, so that editing them reruns
    the download."""
    source = MODELS[wildcards.model]["source"]
    if "gguf" in source:
        path = gguf_source.existing_file(source, WORKFLOW_PYTHON)
        return [str(path)] if path is not None else []
    if "local" not in source:
        return []
    folder = source["local"]
    names = ("config.json", "model.safetensors.index.json")
    return (
        sorted(
            os.path.join(folder, name)
            for name in os.listdir(folder)
            if name in names or re.fullmatch(r"model.*\.safetensors", name)
        )
        if os.path.isdir(folder)
        else []
    )


def fetch_dataset_stage(dataset):
    """The fetch_dataset rule's stage for the dataset's source kind: fetch_dataset (hub, local),
    fetch_dataset_demo (generated), fetch_dataset_python_docs (Python's own documentation).
    """
    source = DATASETS[dataset]["source"]
    kind = source_kind(f"datasets.{dataset}.source", source, DATASET_SOURCE_KEYS)
    return {
        "demo": "fetch_dataset_demo",
        "python_docs": "fetch_dataset_python_docs",
    }.get(kind, "fetch_dataset")


def tokenizer_store_source(wildcards):
    """The download of a model whose tokenizer has this fingerprint: the downloads on disk first, by the
    manifest on disk (a checkpoint's get() would make this store depend on every download that reruns),
    else the configured models' downloads in turn, targets first, each built until one matches.

    ancient: the store is named by its content, so a model's new download never rewrites it, nor reruns the
    shards made with it.
    """
    on_disk = [m for m in MODELS if os.path.exists(download_manifest(m))]
    pending = [
        m for m in dict.fromkeys((*config["targets"], *MODELS)) if m not in on_disk
    ]
    for model in on_disk + pending:
        found = (
            manifest_tokenizer(model, download_manifest(model))
            if model in on_disk
            else model_tokenizer(model)
        )
        if found == wildcards.tokenizer:
            return ancient(download_manifest(model))
    raise ValueError(
        f"no configured model has tokenizer fingerprint {wildcards.tokenizer} "
        f"(models: {', '.join(MODELS)}); results/calibration/ and results/evaluation-sets/ are keyed by it"
    )


def calibration_shard_settings(wildcards):
    """Params function: a dataset's sampling settings (its source is tracked by the fetched manifest,
    its format passed on its own, its evaluation windows are another rule's)."""
    section = {
        k: v
        for k, v in DATASETS[wildcards.dataset].items()
        if k not in ("source", "format", "evaluation")
    }
    return json.dumps(section, sort_keys=True)


def c4_format_datasets():
    """The ids of the c4-format datasets: those with a validation file to cut perplexity windows from."""
    return [d for d in DATASETS if DATASETS[d]["format"] == "c4"]


def c4_evaluation_windows_settings(wildcards):
    """Params function: the perplexity windows of a c4-format dataset."""
    return json.dumps(window_settings(config, wildcards.dataset), sort_keys=True)


def quantize_gptq_calibration(wildcards):
    """The calibration shards GPTQ runs through a model, for its tokenizer."""
    fingerprint = model_tokenizer(wildcards.model)
    datasets = MODELS[wildcards.model]["quantize"]["gptq-int8"]["datasets"]
    return [
        f"results/calibration/{fingerprint}/{dataset}.safetensors"
        for dataset in datasets
    ]


def vamc_config_settings(wildcards):
    """Params function: the model's vamc section with the model name filled in."""
    section = dict(MODELS[wildcards.model]["vamc"])
    source = MODELS[wildcards.model]["source"]
    # a hub repo id is owner/name
    section.setdefault(
        "name", os.path.basename(source["hub"]) if "hub" in source else wildcards.model
    )
    return json.dumps(section, sort_keys=True)


def vamc_config_dataset_manifest(wildcards):
    """int8 builds calibrate on the raw files of the model's vamc dataset."""
    if wildcards.dtype != "int8":
        return []
    return (
        f"resources/datasets/{MODELS[wildcards.model]['vamc']['dataset']}/MANIFEST.json"
    )


def vamc_config_calibration_arguments(wildcards, input):
    """Params function: the int8 build's dataset arguments (none for fp16)."""
    if wildcards.dtype != "int8":
        return ""
    dataset = MODELS[wildcards.model]["vamc"]["dataset"]
    calibration = {
        # vamc knows c4, alpaca and ceval: a dataset goes by its format's name (python-docs: c4)
        "name": DATASETS[dataset]["format"],
        "nsamples": MODELS[wildcards.model]["quantize"]["gptq-int8"]["nsamples"],
        "seqlen": DATASETS[dataset]["seqlen"],
    }
    return (
        f"--dataset {shlex.quote(input.dataset)}"
        f" --calibration {shlex.quote(json.dumps(calibration, sort_keys=True))}"
    )


def aoti_compile_settings(wildcards):
    """Params function: the model's aoti section without the variant list, so adding a variant reruns nothing."""
    section = {
        k: v for k, v in MODELS[wildcards.model]["aoti"].items() if k != "variants"
    }
    return json.dumps(section, sort_keys=True)


def aoti_compile_verify_settings(wildcards):
    """Params function: the prompts and greedy steps the compiled packages are checked on."""
    verify = MODELS[wildcards.model]["verify"]
    return json.dumps(
        {key: verify[key] for key in ("prompts", "greedy_tokens")}, sort_keys=True
    )


def aoti_compile_checkpoint_manifest(wildcards):
    """The float variant compiles the patched checkpoint, an int8 one its quantized checkpoint."""
    return variants.parse(wildcards.variant).manifest(wildcards.model)


def evaluate_checkpoint_manifest(wildcards):
    return variants.parse(wildcards.evaluation).manifest(wildcards.model)


def evaluate_set(wildcards, name):
    return f"results/evaluation-sets/{model_tokenizer(wildcards.model)}/{name}"


def evaluate_windows(wildcards):
    """The perplexity windows of the model's evaluate.dataset, for its tokenizer."""
    dataset = MODELS[wildcards.model]["evaluate"]["dataset"]
    return evaluate_set(wildcards, f"{dataset}-validation.safetensors")


def evaluate_settings(wildcards):
    """Params function: the model's evaluate section; its dataset is in the windows' path."""
    section = {
        k: v for k, v in MODELS[wildcards.model]["evaluate"].items() if k != "dataset"
    }
    return json.dumps(section, sort_keys=True)


def bench_settings(model):
    """The model's bench section without the variant list, so adding a variant reruns nothing."""
    return {
        k: v
        for k, v in MODELS[model]["bench"].items()
        if k not in ("variants", "vastgenx_batch_size")
    }


def serve_benchmark_settings(wildcards):
    return json.dumps(bench_settings(wildcards.model), sort_keys=True)


def serve_benchmark_input(wildcards):
    return variants.parse(wildcards.served).manifest(wildcards.model)


def serve_benchmark_server(wildcards):
    """How the server runs: an eager checkpoint at its compiled variant's shape and device, so that the two
    compare; a VACC build under vastgenx with its build's lengths and the model's dies.
    """
    settings = MODELS[wildcards.model]
    kind = variants.parse(wildcards.served).kind
    if kind == "aoti":
        return ""
    if kind == "vacc":
        vamc = settings["vamc"]
        options = {
            "batch_size": settings["bench"]["vastgenx_batch_size"],
            "devices": json.dumps(list(range(vamc["tp"])), separators=(",", ":")),
            "max_prompt_tokens": vamc["seq_in"],
            "max_output_tokens": vamc["seq_total"] - vamc["seq_in"],
        }
        return f"--vastgenx {shlex.quote(json.dumps(options, sort_keys=True))}"
    shape = {key: settings["aoti"][key] for key in ("batch", "context", "device")}
    return f"--shape {shlex.quote(json.dumps(shape, sort_keys=True))}"


def report_gptq_manifest(model):
    """The GPTQ manifest (per-layer figures) where the model has that scheme."""
    if "gptq-int8" not in MODELS[model]["quantize"]["schemes"]:
        return []
    return f"results/{model}/quantized/gptq-int8/MANIFEST.json"
