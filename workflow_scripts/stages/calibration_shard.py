"""Stage 3, calibration: ``results/calibration/{tokenizer}/{dataset}.safetensors`` and its record, a dataset
tokenized and sampled for one tokenizer (:mod:`workflow_scripts.data.calibration`).

Usage: python -m workflow_scripts.stages.calibration_shard --dataset NAME [--format c4|alpaca|ceval] --files MANIFEST
           --tokenizer TOKENIZER_JSON --fingerprint HEX --settings JSON --shard PATH --record PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import add_tokenizer_arguments, run_cli
from workflow_scripts.data.calibration import CalibrationSettings, calibrate
from workflow_scripts.data.datasets import FORMATS


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="the dataset's id under datasets in the config")
    parser.add_argument("--format", choices=FORMATS, help="its files' format (default: the id, for c4/alpaca/ceval)")
    add_tokenizer_arguments(parser, "the fetched dataset's MANIFEST.json")
    parser.add_argument("--settings", required=True, type=CalibrationSettings.parse, help="the dataset's settings")
    parser.add_argument("--shard", required=True, type=Path)
    parser.add_argument("--record", required=True, type=Path)
    args = parser.parse_args(argv)
    calibrate(
        args.dataset, args.format, args.files, args.tokenizer, args.fingerprint, args.settings, args.shard, args.record
    )


if __name__ == "__main__":
    run_cli(main)
