"""Stage 6, evaluate: ``results/{model}/eval/{variant}.json``, a variant's perplexity, KL divergence and top-1
agreement against float, ceval accuracy and sample completions (:mod:`workflow_scripts.evaluation.evaluate`).

Usage: python -m workflow_scripts.stages.evaluate --model ID --variant NAME --patched MANIFEST --checkpoint MANIFEST
           --windows PATH --ceval PATH --settings JSON --output PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import add_variant_arguments, run_cli
from workflow_scripts.evaluation.evaluate import EvaluateSettings, evaluate


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_arguments(parser, "a checkpoint's or a compiled package folder's MANIFEST.json")
    parser.add_argument("--windows", required=True, type=Path)
    parser.add_argument("--ceval", required=True, type=Path)
    parser.add_argument("--settings", required=True, type=EvaluateSettings.parse, help="models.<id>.evaluate")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    evaluate(
        args.model, args.variant, args.patched, args.checkpoint, args.windows, args.ceval, args.settings, args.output
    )


if __name__ == "__main__":
    run_cli(main)
