"""Stage 6, report: ``results/summary.md``, ``results/report/summary.html`` and per-model plots
(:mod:`workflow_scripts.evaluation.report`).

Usage: python -m workflow_scripts.stages.report summary --evaluations JSON --gates JSON --gptq JSON [--bench JSON]
           --markdown PATH --html PATH
       python -m workflow_scripts.stages.report plots --model ID --evaluations JSON [JSON ...] [--gptq MANIFEST]
           --benchmarks DIR --output DIR
       python -m workflow_scripts.stages.report serving --bench JSON [JSON ...] --output PNG
"""

import argparse
import json
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.evaluation.report import gate_settings_by_model, write_plots, write_serving_plot, write_summary


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    summary = commands.add_parser("summary")
    summary.add_argument("--evaluations", required=True, type=json.loads, help="{model: [evaluation JSON, ...]}")
    summary.add_argument("--gates", required=True, type=gate_settings_by_model, help="{model: gate settings}")
    summary.add_argument("--gptq", required=True, type=json.loads, help="{model: GPTQ manifest or null}")
    summary.add_argument(
        "--bench", default={}, type=json.loads, help="{model: [serving benchmark JSON, ...]}; lists may be empty"
    )
    summary.add_argument("--markdown", required=True, type=Path)
    summary.add_argument("--html", required=True, type=Path)
    plots = commands.add_parser("plots")
    plots.add_argument("--model", required=True)
    plots.add_argument("--evaluations", required=True, nargs="+", type=Path)
    plots.add_argument("--gptq", type=Path)
    plots.add_argument("--benchmarks", required=True, type=Path)
    plots.add_argument("--output", required=True, type=Path)
    serving = commands.add_parser("serving")
    serving.add_argument("--bench", required=True, nargs="+", type=Path, help="a model's serving benchmark records")
    serving.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.command == "summary":
        write_summary(args.evaluations, args.gates, args.gptq, args.markdown, args.html, args.bench)
    elif args.command == "plots":
        write_plots(args.evaluations, args.gptq, args.benchmarks, args.output)
    else:
        write_serving_plot(args.bench, args.output)


if __name__ == "__main__":
    run_cli(main)
