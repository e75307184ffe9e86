# Mistral-family checkpoints from the Hugging Face hub to VACC deployables.
# This file is the table of contents: the stages live in rules/, the work in
# the workflow_scripts package. See README.md.
import sys

from snakemake.utils import min_version

from workflow_scripts.planning.config import rule_name

min_version("9.0")

sys.path.insert(0, workflow.basedir)


configfile: "config/config.yaml"


report: "rules/report/workflow.rst"


include: "rules/common.smk"
include: "rules/targets.smk"
include: "rules/inputs.smk"
include: "rules/resources.smk"


rule all:
    default_target: True
    input:
        model_outputs(config["targets"]),
        shared_outputs(config["targets"]),
        "results/summary.md",
        "results/report/summary.html",


# One target rule per configured model, named after its id: `snakemake demo_mistral`.
for model_id in MODELS:

    rule:
        name:
            rule_name(model_id)
        input:
            model_outputs([model_id]),
            shared_outputs([model_id]),


include: "rules/download.smk"
include: "rules/patch.smk"
include: "rules/calibration.smk"
include: "rules/quantize.smk"
include: "rules/compile.smk"
include: "rules/evaluate.smk"
include: "rules/serve.smk"
