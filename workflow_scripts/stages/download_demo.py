"""Stage 1, download, for a ``demo`` source: a small random-weight Mistral checkpoint with the hub's layout,
generated offline and deterministically (:mod:`workflow_scripts.checkpoint.demo_checkpoint`).

Usage: python -m workflow_scripts.stages.download_demo --model ID --source JSON --manifest PATH
"""

from workflow_scripts.checkpoint.assemble import assemble_checkpoint
from workflow_scripts.checkpoint.demo_checkpoint import generate
from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.fetch import fetch_arguments


def main(argv):
    args = fetch_arguments(argv, __doc__, "model")
    assemble_checkpoint(args.model, args.source, args.manifest.parent, generate)


if __name__ == "__main__":
    run_cli(main)
