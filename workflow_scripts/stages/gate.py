"""Stage 6, quality gates: ``results/{model}/gate.json``, written only when every variant passes.

Each variant other than float eager is held to the model's ``gates`` against
the float eager model: c4 perplexity at most ``max_perplexity_increase``
above float's on the same positions, top-1 agreement at least ``min_top1_agreement``, KL divergence
at most ``max_kl_divergence``. Non-finite logits fail every gate. A failure
names the variant, the metric and both values; the summary and the report
show the same verdicts, so they still build when a gate fails.

Usage: python -m workflow_scripts.stages.gate --model ID --evaluations JSON [JSON ...] --settings JSON --output PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.files import atomic_write_json, read_json
from workflow_scripts.evaluation.gates import GateSettings, gate_record


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--evaluations", required=True, nargs="+", type=Path)
    parser.add_argument("--settings", required=True, type=GateSettings.parse, help="models.<id>.gates as JSON")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    evaluations = {path.stem: read_json(path, what="evaluation") for path in args.evaluations}
    atomic_write_json(args.output, gate_record(args.model, evaluations, args.settings))


if __name__ == "__main__":
    run_cli(main)
