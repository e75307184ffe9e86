"""Stage 6, summary: ``results/summary.md`` and ``results/report/summary.html``, every variant's metrics,
verdicts and serving figures (:mod:`workflow_scripts.evaluation.report`).

Usage: python -m workflow_scripts.stages.summary --evaluations JSON --gates JSON --gptq JSON [--bench JSON]
           --markdown PATH --html PATH
"""

import argparse
import json
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.evaluation.report import gate_settings_by_model, write_summary


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evaluations", required=True, type=json.loads, help="{model: [evaluation JSON, ...]}")
    parser.add_argument("--gates", required=True, type=gate_settings_by_model, help="{model: gate settings}")
    parser.add_argument("--gptq", required=True, type=json.loads, help="{model: GPTQ manifest or null}")
    parser.add_argument(
        "--bench", default={}, type=json.loads, help="{model: [serving benchmark JSON, ...]}; lists may be empty"
    )
    parser.add_argument("--markdown", required=True, type=Path)
    parser.add_argument("--html", required=True, type=Path)
    args = parser.parse_args(argv)
    write_summary(args.evaluations, args.gates, args.gptq, args.markdown, args.html, args.bench)


if __name__ == "__main__":
    run_cli(main)
