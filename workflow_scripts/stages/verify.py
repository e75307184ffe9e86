"""Stage 2, verify: the patched checkpoint computes what upstream Mistral computes
(:mod:`workflow_scripts.evaluation.verify`); ``verify.json`` records every figure, and a failed check fails the
stage and writes nothing.

Usage: python -m workflow_scripts.stages.verify --model ID --patched MANIFEST --upstream MANIFEST --output PATH
           --settings JSON
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli
from workflow_scripts.evaluation.verify import VerifySettings, verify_checkpoint


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--patched", required=True, type=MANIFEST_FOLDER, help="the patched checkpoint's MANIFEST.json")
    parser.add_argument(
        "--upstream", required=True, type=MANIFEST_FOLDER, help="the downloaded checkpoint's MANIFEST.json"
    )
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--settings", required=True, type=VerifySettings.parse, help="models.<id>.verify as JSON")
    args = parser.parse_args(argv)
    verify_checkpoint(args.model, args.patched, args.upstream, args.settings, args.output)


if __name__ == "__main__":
    run_cli(main)
