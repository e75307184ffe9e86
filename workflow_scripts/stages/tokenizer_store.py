"""Tokenizer store: ``resources/tokenizers/{fingerprint}/tokenizer.json``, content-addressed.

Calibration shards and evaluation sets depend on a tokenizer, not on the
model it came with. Keeping one copy per fingerprint (the first 16 hex digits
of the file's sha256) means a model's re-download never reruns the shards of
a tokenizer that did not change: the stored file is named by its content, so
it can never be stale.

Usage: python -m workflow_scripts.stages.tokenizer_store --fingerprint HEX --models DIR --output PATH
"""

import argparse
import logging
import shutil
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_path
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, file_fingerprint

LOG = logging.getLogger(__name__)


def store_tokenizer(fingerprint, models, output):
    """Copy the first downloaded ``tokenizer.json`` whose fingerprint matches into ``output``."""
    for candidate in sorted(Path(models).glob(f"*/{TOKENIZER_FILE}")):
        if file_fingerprint(candidate) == fingerprint:
            with atomic_path(output) as tmp:
                shutil.copyfile(candidate, tmp)
            LOG.info("tokenizer %s: stored from %s", fingerprint, candidate)
            return
    raise InputError(
        f"no tokenizer.json under {models}/*/ has fingerprint {fingerprint}; build a model that "
        "uses this tokenizer first"
    )


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--models", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    store_tokenizer(args.fingerprint, args.models, args.output)


if __name__ == "__main__":
    run_cli(main)
