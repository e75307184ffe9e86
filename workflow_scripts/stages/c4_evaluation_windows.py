"""Stage 6, perplexity windows: ``results/evaluation-sets/{tokenizer}/{dataset}-validation.safetensors`` from the
validation file of a c4-format dataset, tokenized for one tokenizer (:mod:`workflow_scripts.data.evaluation_sets`).

Usage: python -m workflow_scripts.stages.c4_evaluation_windows --files MANIFEST --tokenizer TOKENIZER_JSON
           --fingerprint HEX --settings JSON --output PATH --record PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import add_tokenizer_arguments, run_cli
from workflow_scripts.data.evaluation_sets import WindowSettings, write_c4_windows


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tokenizer_arguments(parser, "the fetched c4-format dataset's MANIFEST.json")
    parser.add_argument("--settings", required=True, type=WindowSettings.parse, help="the windows' settings as JSON")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--record", required=True, type=Path, help="the JSON record beside the windows")
    args = parser.parse_args(argv)
    write_c4_windows(args.files, args.tokenizer, args.fingerprint, args.settings, args.output, args.record)


if __name__ == "__main__":
    run_cli(main)
