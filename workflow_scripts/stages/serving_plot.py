"""Stage 7, serving plot: ``results/report/{model}/serving.png``, output tokens/s and TTFT by concurrency of a
model's serving benchmarks (:mod:`workflow_scripts.evaluation.report`).

Usage: python -m workflow_scripts.stages.serving_plot --bench JSON [JSON ...] --output PNG
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.evaluation.report import write_serving_plot


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True, nargs="+", type=Path, help="a model's serving benchmark records")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    write_serving_plot(args.bench, args.output)


if __name__ == "__main__":
    run_cli(main)
