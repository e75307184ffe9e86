"""Stage 3, datasets, for a ``python_docs`` source: real English from Python's own documentation in c4's or
alpaca's format, offline (:mod:`workflow_scripts.data.python_docs`).

Usage: python -m workflow_scripts.stages.fetch_dataset_python_docs --dataset NAME --format c4|alpaca --source JSON
           --manifest PATH
"""

from workflow_scripts.core.cli import run_cli
from workflow_scripts.data.assemble import assemble_dataset, dataset_arguments
from workflow_scripts.data.python_docs import generate


def main(argv):
    args = dataset_arguments(argv, __doc__)
    assemble_dataset(args.dataset, args.source, args.manifest.parent, generate, args.format)


if __name__ == "__main__":
    run_cli(main)
