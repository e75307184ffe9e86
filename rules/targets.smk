# One target rule per configured model, named after its id: `snakemake demo_mistral`.
from workflow_scripts.planning.config import rule_name

for model_id in MODELS:

    rule:
        name:
            rule_name(model_id)
        input:
            model_outputs([model_id]),
            shared_outputs([model_id]),
