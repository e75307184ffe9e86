"""Stage 6, evaluation sets: ``results/evaluation-sets/{tokenizer}/``, c4-format perplexity windows and ceval
few-shot prompts, tokenized for one tokenizer (:mod:`workflow_scripts.data.evaluation_sets`).

Usage: python -m workflow_scripts.stages.evaluation_sets c4-windows|ceval --files DIR --tokenizer DIR
           --fingerprint HEX --settings JSON --output PATH [--record PATH]
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.data.evaluation_sets import CevalSettings, WindowSettings, write_c4_windows, write_ceval_prompts


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["c4-windows", "ceval"])
    parser.add_argument(
        "--files", required=True, type=Path, help="the fetched dataset folder (c4-windows: of a c4-format dataset)"
    )
    parser.add_argument("--tokenizer", required=True, type=Path, help="a checkpoint folder with tokenizer.json")
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--settings", required=True, help="the dataset's evaluation settings as JSON")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--record", type=Path, help="c4-windows: the JSON record beside the windows")
    args = parser.parse_args(argv)
    if args.kind == "c4-windows":
        settings = WindowSettings.parse(args.settings)
        write_c4_windows(args.files, args.tokenizer, args.fingerprint, settings, args.output, args.record)
    else:
        write_ceval_prompts(
            args.files, args.tokenizer, args.fingerprint, CevalSettings.parse(args.settings), args.output
        )


if __name__ == "__main__":
    run_cli(main)
