"""Stage 5, VACC compile: ``vamc compile`` of a build config into ``<workspace>/<name>/``, with the tokenizer
that ``vastgenx serve`` reads; the real vamc, or an error that says what to install
(:mod:`workflow_scripts.compilation.vacc_compile`).

Usage: python -m workflow_scripts.stages.vacc_compile --model ID --config YAML --patched MANIFEST --manifest PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.compilation.vacc_compile import compile_config
from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", required=True, type=Path, help="the rendered vamc build config")
    parser.add_argument(
        "--patched",
        required=True,
        type=MANIFEST_FOLDER,
        help="the patched checkpoint's MANIFEST.json (tokenizer files)",
    )
    parser.add_argument("--manifest", required=True, type=Path)
    args = parser.parse_args(argv)
    compile_config(args.model, args.config, args.patched, args.manifest)


if __name__ == "__main__":
    run_cli(main)
