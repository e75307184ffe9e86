"""Stage 6, ceval prompts: ``results/evaluation-sets/{tokenizer}/ceval.json``, few-shot prompts of the ceval
validation questions, tokenized for one tokenizer (:mod:`workflow_scripts.data.evaluation_sets`).

Usage: python -m workflow_scripts.stages.ceval_evaluation_set --files MANIFEST --tokenizer TOKENIZER_JSON
           --fingerprint HEX --settings JSON --output PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import add_tokenizer_arguments, run_cli
from workflow_scripts.data.evaluation_sets import CevalSettings, write_ceval_prompts


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_arguments(parser, "the fetched ceval dataset's MANIFEST.json")
    parser.add_argument("--settings", required=True, type=CevalSettings.parse, help="evaluation.ceval as JSON")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    write_ceval_prompts(args.files, args.tokenizer, args.fingerprint, args.settings, args.output)


if __name__ == "__main__":
    run_cli(main)
