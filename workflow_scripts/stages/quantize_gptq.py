"""Stage 4, quantize with GPTQ: ``results/{model}/quantized/gptq-int8/``, layer by layer, resumable
(:mod:`workflow_scripts.quantization.gptq_checkpoint`).

Usage: python -m workflow_scripts.stages.quantize_gptq --model ID --patched MANIFEST --calibration SHARD [SHARD ...]
           --manifest PATH --settings JSON
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli
from workflow_scripts.quantization.gptq_checkpoint import GptqSettings, quantize_gptq
from workflow_scripts.quantization.int8_checkpoint import keep_freed_chunks


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--patched", required=True, type=MANIFEST_FOLDER, help="the patched checkpoint's MANIFEST.json")
    parser.add_argument("--calibration", required=True, nargs="+", type=Path)
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--settings", required=True, type=GptqSettings.parse, help="models.<id>.quantize.gptq-int8")
    args = parser.parse_args(argv)
    keep_freed_chunks()
    # __spec__.name: this module's dotted name, also under python -m (where __name__ is "__main__")
    quantize_gptq(args.model, args.patched, args.calibration, args.manifest.parent, args.settings, __spec__.name)


if __name__ == "__main__":
    run_cli(main)
