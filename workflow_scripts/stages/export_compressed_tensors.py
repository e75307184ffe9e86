"""Stage 4, export: an int8 checkpoint as compressed-tensors, under ``results/{model}/quantized/{scheme}-ct/``.

The same integers and scales as ``results/{model}/quantized/{scheme}/``, in the
format stock transformers (with the ``compressed-tensors`` package) and vLLM
load without ``trust_remote_code``: symmetric per-channel int8 weights with
16-bit activations, ``pack-quantized``. Streamed shard by shard with bounded
memory (workflow_scripts/quantization/compressed_tensors_export.py).

Usage: python -m workflow_scripts.stages.export_compressed_tensors --model ID --int8 MANIFEST --manifest PATH
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli
from workflow_scripts.quantization.compressed_tensors_export import export_compressed_tensors


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--int8", required=True, type=MANIFEST_FOLDER, help="the int8 checkpoint's MANIFEST.json")
    parser.add_argument("--manifest", required=True, type=Path)
    args = parser.parse_args(argv)
    # __spec__.name: this module's dotted name, also under python -m (where __name__ is "__main__")
    export_compressed_tensors(args.model, args.int8, args.manifest.parent, __spec__.name)


if __name__ == "__main__":
    run_cli(main)
