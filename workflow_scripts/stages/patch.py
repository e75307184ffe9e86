"""Stage 2, patch: the checkpoint that vamc loads, under ``results/{model}/patched/``
(:mod:`workflow_scripts.checkpoint.patch`).

Usage: python -m workflow_scripts.stages.patch --model ID --source MANIFEST --manifest PATH --settings JSON
"""

import argparse
from pathlib import Path

from workflow_scripts.checkpoint.patch import PatchSettings, patch_checkpoint
from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--source", required=True, type=MANIFEST_FOLDER, help="the downloaded checkpoint's MANIFEST.json"
    )
    parser.add_argument("--manifest", required=True, type=Path, help="MANIFEST.json inside the patched folder")
    parser.add_argument("--settings", required=True, type=PatchSettings.parse, help="models.<id>.patch as JSON")
    args = parser.parse_args(argv)
    patch_checkpoint(args.model, args.source, args.manifest.parent, args.settings)


if __name__ == "__main__":
    run_cli(main)
