# Config validation, the job environment, what each model and tokenizer builds, and the code each stage runs.
import json
import os
import re
import shlex
import shutil

from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from workflow_scripts.checkpoint import gguf as gguf_source
from workflow_scripts.core.code_inputs import module_sources
from workflow_scripts.core.errors import StageError
from workflow_scripts.core.files import read_json
from workflow_scripts.data.tokenizers import tokenizer_fingerprint
from workflow_scripts.planning import job_resources
from workflow_scripts.planning.config import (
    DATASET_SOURCE_KEYS,
    check_config,
    source_kind,
    window_settings,
)
from workflow_scripts.serving import output_budget
from workflow_scripts.serving.benchmark import BenchSettings, Limits, plan_cases

validate(config, "../config/schema.yaml")
try:
    check_config(config)
except StageError as error:
    raise ValueError(str(error)) from None

MODELS = config["models"]
DATASETS = config["datasets"]
VAMC_DTYPES = ("fp16", "int8")
VAMC_FOUND = shutil.which("vamc")
VACC_COMPILE = config["compile"]["vacc"] == "on" or (
    config["compile"]["vacc"] == "auto" and VAMC_FOUND is not None
)
VASTGENX_FOUND = shutil.which("vastgenx")
logger.info(
    f"VACC compile: {'on' if VACC_COMPILE else 'off'} (compile.vacc: {config['compile']['vacc']}; "
    + (f"vamc at {VAMC_FOUND})" if VAMC_FOUND else "vamc not on PATH)")
    + (
        f"; vastgenx at {VASTGENX_FOUND}"
        if VASTGENX_FOUND
        else "; vastgenx not on PATH"
    )
)
for model, settings in MODELS.items():
    for index, variant in enumerate(settings["bench"]["variants"] or ()):
        if variant.startswith("vacc-") and not VACC_COMPILE:
            raise ValueError(
                f"config: models.{model}.bench.variants[{index}] = {variant} serves a VACC build, but the VACC "
                "compile is off (compile.vacc, and vamc on PATH)"
            )

# Jobs run `python3 -m workflow_scripts.stages.<stage>` from this checkout
# (PYTHONPATH) with the python3 beside WORKFLOW_PYTHON (by default the
# interpreter that runs Snakemake), or under --use-conda with the environment's
# own; a gguf source's package is looked for in WORKFLOW_PYTHON's environment
# too. It lets Snakemake and its SLURM plugin run from an environment of their
# own: the plugin's numpy excludes mistral-common's (docs/cluster.md). The
# prefix is formatted like a shell command, hence the doubled braces.
WORKFLOW_PYTHON_VARIABLE = os.environ.get("WORKFLOW_PYTHON")
WORKFLOW_PYTHON = os.path.abspath(
    sys.executable if WORKFLOW_PYTHON_VARIABLE is None else WORKFLOW_PYTHON_VARIABLE
)
if WORKFLOW_PYTHON_VARIABLE is not None:
    for interpreter in (
        WORKFLOW_PYTHON,
        os.path.join(os.path.dirname(WORKFLOW_PYTHON), "python3"),
    ):
        if not (os.path.isfile(interpreter) and os.access(interpreter, os.X_OK)):
            raise ValueError(
                f"WORKFLOW_PYTHON={WORKFLOW_PYTHON_VARIABLE}: {interpreter} is not an executable file; "
                "name the python of the workflow's environment (requirements.txt); the jobs run the python3 "
                "in its folder (docs/cluster.md)"
            )
JOB_PATH = (
    ""
    if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    else (f"export PATH={shlex.quote(os.path.dirname(WORKFLOW_PYTHON))}:$PATH; ")
)
shell.prefix(
    f"{JOB_PATH}export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
)


wildcard_constraints:
    model="|".join(re.escape(model) for model in MODELS),
    dataset="|".join(DATASETS),
    tokenizer="[0-9a-f]{16}",
    scheme="rtn-int8|gptq-int8",
    dtype="fp16|int8",
    variant="float|rtn-int8|gptq-int8",
    evaluation="float|rtn-int8|gptq-int8|aoti-float|aoti-rtn-int8|aoti-gptq-int8",
    served="float|rtn-int8|gptq-int8|aoti-float|aoti-rtn-int8|aoti-gptq-int8|vacc-fp16|vacc-int8",


def code(stage):
    """The source files of a stage's entry point and of everything it imports."""
    return module_sources(f"workflow_scripts.stages.{stage}")


def model_tokenizer(model):
    """A model's tokenizer fingerprint, known once its download (a checkpoint) has run."""
    manifest = checkpoints.download.get(model=model).output[0]
    return tokenizer_fingerprint(read_json(manifest), f"model {model}")


def model_datasets(model):
    """The datasets a model's shards and perplexity windows come from: its GPTQ datasets, its evaluate.dataset.

    (vamc.dataset's raw files are read by vamc itself, untokenized.)
    """
    quantize = MODELS[model]["quantize"]
    gptq = (
        quantize["gptq-int8"]["datasets"] if "gptq-int8" in quantize["schemes"] else []
    )
    return gptq, MODELS[model]["evaluate"]["dataset"]


def tokenizer_outputs(fingerprint, models):
    """Calibration shards and evaluation sets of one tokenizer: those of the datasets its ``models`` use."""
    shards = sorted({d for model in models for d in model_datasets(model)[0]})
    windows = sorted({model_datasets(model)[1] for model in models})
    return (
        [
            f"results/calibration/{fingerprint}/{dataset}.{ext}"
            for dataset in shards
            for ext in ("safetensors", "json")
        ]
        + [
            f"results/evaluation-sets/{fingerprint}/{dataset}-validation.safetensors"
            for dataset in windows
        ]
        + [f"results/evaluation-sets/{fingerprint}/ceval.json"]
    )


def model_outputs(models, reported=True):
    """The final per-model files of each model; with ``reported``, also its gate and report plots."""
    return [
        path
        for model in models
        for path in [f"results/{model}/patched/verify.json"]
        + [
            f"results/{model}/quantized/{scheme}/MANIFEST.json"
            for scheme in MODELS[model]["quantize"]["schemes"]
        ]
        + [
            f"results/{model}/quantized/{scheme}-ct/MANIFEST.json"
            for scheme in MODELS[model]["quantize"]["schemes"]
            if "compressed-tensors" in MODELS[model]["quantize"]["exports"]
        ]
        + [f"results/{model}/vamc/{dtype}.yaml" for dtype in VAMC_DTYPES]
        + [
            f"results/{model}/aoti/{variant}/MANIFEST.json"
            for variant in MODELS[model]["aoti"]["variants"]
        ]
        + (
            [f"results/{model}/vacc/{dtype}/MANIFEST.json" for dtype in VAMC_DTYPES]
            if VACC_COMPILE
            else []
        )
        + model_evaluations(model)
        + model_benchmarks(model)
        + (
            [f"results/{model}/gate.json"]
            + [
                f"results/report/{model}/{plot}.png"
                for plot in ("metrics", "stages", "quantization-error")
            ]
            + (
                [f"results/report/{model}/serving.png"]
                if model_benchmarks(model)
                else []
            )
            if reported
            else []
        )
    ]


def bench_variants(model):
    """What a model's serving benchmark serves: bench.variants, by default every compiled variant and, where
    vastgenx is on PATH, every VACC build."""
    variants = MODELS[model]["bench"]["variants"]
    if variants is None:
        return [f"aoti-{variant}" for variant in MODELS[model]["aoti"]["variants"]] + (
            [f"vacc-{dtype}" for dtype in VAMC_DTYPES]
            if VACC_COMPILE and VASTGENX_FOUND
            else []
        )
    return variants


def model_benchmarks(model):
    return [
        f"results/{model}/bench/{variant}.json" for variant in bench_variants(model)
    ]


def model_evaluations(model):
    """The evaluation of every variant of a model: eager checkpoints and compiled packages."""
    variants = ["float", *MODELS[model]["quantize"]["schemes"]] + [
        f"aoti-{variant}" for variant in MODELS[model]["aoti"]["variants"]
    ]
    return [f"results/{model}/eval/{variant}.json" for variant in variants]


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
