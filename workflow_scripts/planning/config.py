"""Checks of the workflow config that a JSON schema cannot state clearly.

The schema (``config/schema.yaml``) rejects unknown keys and wrong types and
fills defaults; these checks cover relations between keys, each with a
message that names the model and the key.
"""

import re

from workflow_scripts.compilation.vamc import check_lengths, check_overrides
from workflow_scripts.core import variants
from workflow_scripts.core.errors import InputError
from workflow_scripts.data.windows import MAX_TOKENS

SOURCE_KINDS = ("hub", "local", "demo", "gguf")
MODEL_SOURCE_KEYS = {
    "hub": {"hub", "revision", "allow_pickle"},
    "local": {"local", "allow_pickle"},
    "demo": {"demo", "seed", "shape"},
    "gguf": {"gguf", "package", "sha256"},  # read by workflow_scripts/checkpoint/gguf.py and gguf_import.py
}
DATASET_SOURCE_KEYS = {
    "hub": {"hub", "revision"},
    "local": {"local"},
    "demo": {"demo", "seed"},
    "python_docs": {"python_docs"},
}
# the dataset formats each dataset source kind can give (python_docs: docs/calibration.md)
SOURCE_FORMATS = {"python_docs": ("c4", "alpaca")}


def rule_name(model):
    """The per-model target rule: the model id with every character outside [A-Za-z0-9_] made ``_``."""
    name = re.sub(r"\W", "_", model)
    return f"model_{name}" if name[0].isdigit() else name


def source_kind(where, source, keys_by_kind=MODEL_SOURCE_KEYS):
    """One of ``keys_by_kind`` (``hub``, ``local``, ...); ``where`` is the source's config path, e.g.
    ``models.x.source``."""
    kinds = [kind for kind in keys_by_kind if kind in source]
    if len(kinds) != 1:
        raise InputError(
            f"config: {where} must have exactly one of {', '.join(keys_by_kind)}; found {', '.join(kinds) or 'none'}"
        )
    kind = kinds[0]
    stray = set(source) - keys_by_kind[kind]
    if stray:
        raise InputError(f"config: {where}.{sorted(stray)[0]} does not apply to a {kind} source")
    if kind == "hub" and "revision" not in source:
        raise InputError(
            f"config: {where}.revision is required for a hub source (pin a commit hash for reproducible builds)"
        )
    return kind


def check_sizes(where, settings):
    if settings["nsamples"] * settings["seqlen"] > MAX_TOKENS:
        raise InputError(
            f"config: {where}: nsamples x seqlen = {settings['nsamples']} x {settings['seqlen']} "
            f"exceeds {MAX_TOKENS} tokens"
        )


def check_dataset(dataset, settings):
    """Source, format and sizes of one dataset; its window settings checked by :func:`window_settings`."""
    where = f"datasets.{dataset}"
    kind = source_kind(f"{where}.source", settings["source"], DATASET_SOURCE_KEYS)
    data_format = settings["format"]
    if data_format not in SOURCE_FORMATS.get(kind, (data_format,)):
        raise InputError(
            f"config: {where}.source.{kind} gives {' or '.join(SOURCE_FORMATS[kind])} files, "
            f"not the {data_format} format of {where}.format"
        )
    if "evaluation" in settings and data_format != "c4":
        raise InputError(
            f"config: {where}.evaluation applies to a c4-format dataset only (perplexity windows "
            f"come from its validation file); {where}.format is {data_format}"
        )
    check_sizes(where, settings)


def window_settings(config, dataset):
    """The perplexity windows of a c4-format dataset: evaluation.c4, overridden by datasets.<id>.evaluation."""
    return {**config["evaluation"]["c4"], **config["datasets"][dataset].get("evaluation", {})}


def dataset_named(where, dataset, datasets, data_format=None, why=""):
    """Refuse a dataset id that is not configured, or not of ``data_format``."""
    if dataset not in datasets:
        raise InputError(f"config: {where} = {dataset} is not under datasets (known: {', '.join(sorted(datasets))})")
    if data_format and datasets[dataset]["format"] != data_format:
        raise InputError(
            f"config: {where} = {dataset} has format {datasets[dataset]['format']}, but {why} "
            f"a dataset of format {data_format}"
        )


def check_model_datasets(model, settings, datasets):
    for index, dataset in enumerate(settings["quantize"]["gptq-int8"]["datasets"]):
        dataset_named(f"models.{model}.quantize.gptq-int8.datasets[{index}]", dataset, datasets)
    # vamc reads any of the three formats, under its format's name
    dataset_named(f"models.{model}.vamc.dataset", settings["vamc"]["dataset"], datasets)
    dataset_named(
        f"models.{model}.evaluate.dataset",
        settings["evaluate"]["dataset"],
        datasets,
        "c4",
        "perplexity windows come from the validation file of",
    )


def check_gptq_samples(model, quantize, datasets):
    if "gptq-int8" not in quantize["schemes"]:
        return
    gptq = quantize["gptq-int8"]
    needed = gptq["nsamples"] + gptq["holdout"]
    for dataset in gptq["datasets"]:
        if datasets[dataset]["nsamples"] < needed:
            raise InputError(
                f"config: models.{model}.quantize.gptq-int8 takes nsamples + holdout = "
                f"{gptq['nsamples']} + {gptq['holdout']} samples, but datasets.{dataset}.nsamples "
                f"is {datasets[dataset]['nsamples']}; raise it or lower those"
            )


def check_aoti(model, settings, window_tokens):
    """The compiled variants exist, and their context holds the verify steps and the perplexity windows (scored
    through the packages' prefill, on the same positions as the eager variants)."""
    aoti = settings["aoti"]
    for index, variant in enumerate(aoti["variants"]):
        if variant != "float" and variant not in settings["quantize"]["schemes"]:
            raise InputError(
                f"config: models.{model}.aoti.variants[{index}] = {variant} is not among "
                f"models.{model}.quantize.schemes"
            )
    steps = settings["verify"]["greedy_tokens"]
    if steps >= aoti["context"]:
        raise InputError(
            f"config: models.{model}.aoti.context = {aoti['context']} leaves no room for a prompt before "
            f"verify.greedy_tokens = {steps}"
        )
    if aoti["variants"] and window_tokens - 1 > aoti["context"]:
        raise InputError(
            f"config: models.{model}.aoti.context = {aoti['context']} is shorter than the perplexity windows of "
            f"models.{model}.evaluate.dataset ({window_tokens} tokens, less the last) its compiled variants are "
            "scored on; raise it or shorten the windows"
        )


def check_bench(model, settings):
    """Each benchmarked variant must be a variant and be built: a compiled one among aoti.variants, an eager one a
    checkpoint (a VACC build's depends on the machine: the Snakefile checks it)."""
    for index, name in enumerate(settings["bench"]["variants"] or ()):
        where = f"config: models.{model}.bench.variants[{index}]"
        try:
            variant = variants.parse(name)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
        if variant.kind == "vacc" or name in variants.model_variants(settings):
            continue
        raise InputError(
            f"{where} = {name} is not built: "
            + (
                f"add {variant.base} to models.{model}.aoti.variants"
                if variant.kind == "aoti"
                else f"it is not float nor among models.{model}.quantize.schemes"
            )
        )


def check_config(config):
    """Raise :class:`InputError` on the first relation between keys that does not hold."""
    models = config["models"]
    for model, settings in models.items():
        if source_kind(f"models.{model}.source", settings["source"]) == "demo" and "shape" in settings:
            raise InputError(
                f"config: models.{model}.shape does not apply to a demo source "
                f"(its shape is models.{model}.source.shape)"
            )
    for dataset, settings in config["datasets"].items():
        check_dataset(dataset, settings)
        if settings["format"] == "c4":
            where = f"datasets.{dataset}.evaluation" if "evaluation" in settings else "evaluation.c4"
            check_sizes(where, window_settings(config, dataset))
    check_sizes("evaluation.c4", config["evaluation"]["c4"])
    for model, settings in models.items():
        check_model_datasets(model, settings, config["datasets"])
        check_gptq_samples(model, settings["quantize"], config["datasets"])
        check_lengths(f"models.{model}.vamc", settings["vamc"]["seq_in"], settings["vamc"]["seq_total"])
        check_overrides(f"models.{model}.vamc.overrides", settings["vamc"]["overrides"])
        window_tokens = window_settings(config, settings["evaluate"]["dataset"])["seqlen"]
        check_aoti(model, settings, window_tokens)
        check_bench(model, settings)
    for index, target in enumerate(config["targets"]):
        if target not in models:
            raise InputError(
                f"config: targets[{index}] names model {target!r}, which is not under models "
                f"(known: {', '.join(sorted(models))})"
            )
    seen = {}
    for model in models:
        name = rule_name(model)
        if name in seen:
            raise InputError(
                f"config: models {seen[name]!r} and {model!r} both map to target rule {name!r}; rename one of them"
            )
        seen[name] = model
