"""Stage 7, serving benchmark: ``results/{model}/bench/{variant}.json``.

Starts ``python -m workflow_scripts.serve`` on a free loopback port for a
compiled package folder (``aoti-{variant}``) or an eager checkpoint (at the
shape of ``--shape``), drives it through the vendor's sweep scaled to the
compiled lengths, and stops it (workflow_scripts/serving/local_server.py,
workflow_scripts/serving/benchmark.py, docs/serving.md).

Usage: python -m workflow_scripts.stages.serve_benchmark --model ID --variant NAME --folder DIR --settings JSON
           [--shape JSON] --output PATH
"""

import argparse
import json
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.serving.benchmark import BenchSettings
from workflow_scripts.serving.local_server import benchmark_variant


def serve_arguments(shape):
    """The server's options for an eager checkpoint's shape ``{batch, seq_in, seq_total, device}``."""
    return [f"--{key.replace('_', '-')}={value}" for key, value in sorted(shape.items())]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True, help="aoti-{variant} for a package, else an eager checkpoint")
    parser.add_argument("--folder", required=True, type=Path, help="the package folder or the checkpoint folder")
    parser.add_argument("--settings", required=True, type=BenchSettings.parse, help="models.<id>.bench")
    parser.add_argument("--shape", type=json.loads, default={}, help="an eager checkpoint's batch, lengths, device")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    benchmark_variant(args.model, args.variant, args.folder, args.settings, args.output, serve_arguments(args.shape))


if __name__ == "__main__":
    run_cli(main)
