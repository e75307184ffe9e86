"""Stage 1, download, for a ``gguf`` source: a llama.cpp GGUF file imported as a bf16 Mistral checkpoint
(:mod:`workflow_scripts.checkpoint.gguf_import`).

Usage: python -m workflow_scripts.stages.download_gguf --model ID --source JSON --manifest PATH
"""

from workflow_scripts.checkpoint.assemble import assemble_checkpoint
from workflow_scripts.checkpoint.gguf_import import import_gguf
from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.fetch import fetch_arguments


def main(argv):
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    args = fetch_arguments(argv, __doc__, "model")
    assemble_checkpoint(args.model, args.source, args.manifest.parent, import_gguf)


if __name__ == "__main__":
    run_cli(main)
