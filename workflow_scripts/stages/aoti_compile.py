"""Stage 5, AOTInductor: ``results/{model}/aoti/{variant}/{layer,head}.pt2``, verified against eager
(:mod:`workflow_scripts.compilation.aoti_build`).

Usage: python -m workflow_scripts.stages.aoti_compile --model ID --variant NAME --patched MANIFEST --checkpoint MANIFEST
           --settings JSON --verify JSON --manifest PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.compilation.aoti_build import AotiSettings, compile_variant
from workflow_scripts.core.cli import add_variant_arguments, run_cli
from workflow_scripts.runtime.decode import VerifyPrompts


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_variant_arguments(parser, "the patched or quantized checkpoint's MANIFEST.json")
    parser.add_argument("--settings", required=True, type=AotiSettings.parse, help="models.<id>.aoti as JSON")
    parser.add_argument("--verify", required=True, type=VerifyPrompts.parse, help="models.<id>.verify's prompts")
    parser.add_argument("--manifest", required=True, type=Path, help="MANIFEST.json inside the package folder")
    args = parser.parse_args(argv)
    # __spec__.name: this module's dotted name, also under python -m (where __name__ is "__main__")
    compile_variant(
        args.model,
        args.variant,
        args.patched,
        args.checkpoint,
        args.settings,
        args.verify,
        args.manifest.parent,
        __spec__.name,
    )


if __name__ == "__main__":
    run_cli(main)
