"""Stage 6, plots: ``results/report/{model}/`` metrics, stage costs and quantization error of one model
(:mod:`workflow_scripts.evaluation.report`).

Usage: python -m workflow_scripts.stages.plots --evaluations JSON [JSON ...] [--gptq MANIFEST] --benchmarks DIR
           --output DIR
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.evaluation.report import write_plots


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", required=True, nargs="+", type=Path)
    parser.add_argument("--gptq", type=Path, help="the GPTQ checkpoint's MANIFEST.json (per-layer figures)")
    parser.add_argument("--benchmarks", required=True, type=Path, help="the model's folder of job benchmark files")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    write_plots(args.evaluations, args.gptq, args.benchmarks, args.output)


if __name__ == "__main__":
    run_cli(main)
