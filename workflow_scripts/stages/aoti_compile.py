"""Stage 5, AOTInductor: ``results/{model}/aoti/{variant}/{prefill,decode}.pt2``, verified against eager
(:mod:`workflow_scripts.compilation.aoti_build`).

Usage: python -m workflow_scripts.stages.aoti_compile --model ID --variant NAME --patched MANIFEST --checkpoint MANIFEST
           --settings JSON --verify JSON --manifest PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.compilation.aoti_build import AotiSettings, compile_variant
from workflow_scripts.core.cli import folder_of, run_cli
from workflow_scripts.evaluation.decode import VerifyPrompts


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--variant", required=True)
    parser.add_argument(
        "--patched", required=True, type=folder_of("MANIFEST.json"), help="the patched checkpoint's MANIFEST.json"
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=folder_of("MANIFEST.json"),
        help="the patched or quantized checkpoint's MANIFEST.json",
    )
    parser.add_argument("--settings", required=True, type=AotiSettings.parse, help="models.<id>.aoti as JSON")
    parser.add_argument("--verify", required=True, type=VerifyPrompts.parse, help="models.<id>.verify's prompts")
    parser.add_argument("--manifest", required=True, type=Path, help="MANIFEST.json inside the package folder")
    args = parser.parse_args(argv)
    compile_variant(
        args.model, args.variant, args.patched, args.checkpoint, args.settings, args.verify, args.manifest.parent
    )


if __name__ == "__main__":
    run_cli(main)
