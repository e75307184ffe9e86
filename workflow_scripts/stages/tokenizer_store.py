"""Tokenizer store: ``resources/tokenizers/{fingerprint}/tokenizer.json``, content-addressed.

Calibration shards and evaluation sets depend on a tokenizer, not on the
model it came with. Keeping one copy per fingerprint (the first 16 hex digits
of the file's sha256) means a model's re-download never reruns the shards of
a tokenizer that did not change: the stored file is named by its content, so
it can never be stale.

Usage: python -m workflow_scripts.stages.tokenizer_store --fingerprint HEX --source MANIFEST --output PATH
"""

import argparse
import logging
import shutil
from pathlib import Path

from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_path
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, file_fingerprint

LOG = logging.getLogger(__spec__.name)  # run as __main__ by python -m: its own name in the log


def store_tokenizer(fingerprint, source, output):
    """Copy the ``tokenizer.json`` of the downloaded checkpoint folder ``source`` into ``output``, if it has
    this fingerprint (the rule picks the model: rules/inputs.smk, tokenizer_store_source)."""
    candidate = Path(source) / TOKENIZER_FILE
    if not candidate.is_file():
        raise InputError(f"{source}: has no {TOKENIZER_FILE}")
    if file_fingerprint(candidate) != fingerprint:
        raise InputError(f"{candidate}: has fingerprint {file_fingerprint(candidate)}, not the requested {fingerprint}")
    with atomic_path(output) as tmp:
        shutil.copyfile(candidate, tmp)
    LOG.info("tokenizer %s: stored from %s", fingerprint, candidate)


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fingerprint", required=True)
    parser.add_argument("--source", required=True, type=MANIFEST_FOLDER, help="a downloaded checkpoint's MANIFEST.json")
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    store_tokenizer(args.fingerprint, args.source, args.output)


if __name__ == "__main__":
    run_cli(main)
