# Mistral-family checkpoints from the Hugging Face hub to VACC deployables.
# This file is the table of contents: the stages live in rules/, the work in
# the workflow_scripts package. See README.md.
import sys

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, workflow.basedir)


configfile: "config/config.yaml"


report: "rules/report/workflow.rst"


include: "rules/validation.smk"
include: "rules/inputs.smk"
include: "rules/resources.smk"


rule all:
    default_target: True
    input:
        model_outputs(config["targets"]),
        shared_outputs(config["targets"]),
        "results/summary.md",
        "results/report/summary.html",


include: "rules/download.smk"
include: "rules/patch.smk"
include: "rules/calibration.smk"
include: "rules/quantize.smk"
include: "rules/compile.smk"
include: "rules/evaluate.smk"
include: "rules/serve.smk"
include: "rules/targets.smk"
