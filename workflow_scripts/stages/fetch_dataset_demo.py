"""Stage 3, datasets, for a ``demo`` source: small stand-ins for c4, ceval-exam and alpaca-cleaned in the real
files' formats, generated offline (:mod:`workflow_scripts.data.demo_datasets`).

Usage: python -m workflow_scripts.stages.fetch_dataset_demo --dataset NAME [--format c4|alpaca|ceval] --source JSON
           --manifest PATH
"""

from workflow_scripts.core.cli import run_cli
from workflow_scripts.data.assemble import assemble_dataset, dataset_arguments
from workflow_scripts.data.demo_datasets import generate


def main(argv):
    args = dataset_arguments(argv, __doc__)
    assemble_dataset(args.dataset, args.source, args.manifest.parent, generate, args.format)


if __name__ == "__main__":
    run_cli(main)
