# What the rules share: the checked config, the machine's VACC tools, the jobs' environment, the
# wildcards' constraints and each stage's code inputs.
import os
import re
import shlex
import shutil
import sys

from snakemake.logging import logger
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

from workflow_scripts.core import variants
from workflow_scripts.core.code_inputs import module_sources
from workflow_scripts.core.errors import StageError
from workflow_scripts.planning.config import check_config

validate(config, "../config/schema.yaml")
try:
    check_config(config)
except StageError as error:
    raise ValueError(str(error)) from None

MODELS = config["models"]
DATASETS = config["datasets"]
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
        if variants.parse(variant).kind == "vacc" and not VACC_COMPILE:
            raise ValueError(
                f"config: models.{model}.bench.variants[{index}] = {variant} serves a VACC build, but the VACC "
                "compile is off (compile.vacc, and vamc on PATH)"
            )

# Jobs run `python3 -m workflow_scripts.stages.<rule>` from this checkout
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
    dataset="|".join(re.escape(dataset) for dataset in DATASETS),
    tokenizer="[0-9a-f]{16}",
    scheme="|".join(variants.SCHEMES),
    dtype="|".join(variants.VAMC_DTYPES),
    variant="|".join(variants.EAGER),
    evaluation=variants.pattern(("eager", "aoti")),
    served=variants.pattern(),


def code(stage):
    """The source files of a stage's entry point and of everything it imports."""
    return module_sources(f"workflow_scripts.stages.{stage}")
