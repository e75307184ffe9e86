"""Stage 5, vamc build configs: ``results/{model}/vamc/{fp16,int8}.yaml``, the YAML ``vamc compile`` takes
(:mod:`workflow_scripts.compilation.vamc_config`).

Usage: python -m workflow_scripts.stages.vamc_config --model ID --patched MANIFEST --dtype fp16|int8 --settings JSON
           --dataset MANIFEST --calibration JSON --workspace DIR --output YAML
"""

import argparse
from pathlib import Path

from workflow_scripts.compilation.vamc_config import VamcCalibration, VamcSettings, write_build_config
from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli
from workflow_scripts.core.variants import VAMC_DTYPES


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--patched", required=True, type=MANIFEST_FOLDER, help="the patched checkpoint's MANIFEST.json")
    parser.add_argument("--dtype", required=True, choices=VAMC_DTYPES)
    parser.add_argument("--settings", required=True, type=VamcSettings.parse, help="models.<id>.vamc, name filled")
    parser.add_argument("--dataset", type=MANIFEST_FOLDER, help="int8: the calibration dataset's MANIFEST.json")
    parser.add_argument("--calibration", type=VamcCalibration.parse, help="int8: {name, nsamples, seqlen}")
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    write_build_config(
        args.model,
        args.patched,
        args.dtype,
        args.settings,
        args.workspace,
        args.output,
        args.dataset,
        args.calibration,
    )


if __name__ == "__main__":
    run_cli(main)
