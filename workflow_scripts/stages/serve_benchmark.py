"""Stage 7, serving benchmark: ``results/{model}/bench/{variant}.json``.

Starts a server on a free port of this host, drives it through the vendor's
sweep scaled to the compiled lengths, and stops it
(workflow_scripts/serving/local_server.py, workflow_scripts/serving/bench_client.py,
docs/serving.md). The server is ours (``python -m workflow_scripts.serve``) for
a compiled package folder (``aoti-{variant}``) or an eager checkpoint (at the
shape of ``--shape``), and VastAI's ``vastgenx serve`` for a VACC build
(``vacc-{dtype}``, with ``--vastgenx``).

Usage: python -m workflow_scripts.stages.serve_benchmark --model ID --variant NAME --served MANIFEST --settings JSON
           [--shape JSON | --vastgenx JSON] --output PATH
"""

import argparse
import json
import sys
from pathlib import Path

from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli
from workflow_scripts.serving.local_server import OwnServer, benchmark_variant, vacc_server
from workflow_scripts.serving.sweep import BenchSettings


def serve_arguments(shape):
    """The server's options for an eager checkpoint's shape ``{batch, context, device}``."""
    return [f"--{key.replace('_', '-')}={value}" for key, value in sorted(shape.items())]


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True, help="aoti-{variant}, an eager checkpoint's name, or vacc-{dtype}")
    parser.add_argument(
        "--served",
        required=True,
        type=MANIFEST_FOLDER,
        help="the package's, checkpoint's or VACC build's MANIFEST.json",
    )
    parser.add_argument("--settings", required=True, type=BenchSettings.parse, help="models.<id>.bench")
    served = parser.add_mutually_exclusive_group()
    served.add_argument("--shape", type=json.loads, default={}, help="an eager checkpoint's batch, lengths, device")
    served.add_argument("--vastgenx", type=json.loads, help="batch_size, devices and the build's lengths")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    if args.vastgenx is not None:
        server, tokenizer = vacc_server(args.served, args.vastgenx, output=sys.stderr)
    else:
        server, tokenizer = OwnServer(args.served, *serve_arguments(args.shape), output=sys.stderr), args.served
    benchmark_variant(args.model, args.variant, server, tokenizer, args.settings, args.output)


if __name__ == "__main__":
    run_cli(main)
