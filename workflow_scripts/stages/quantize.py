"""Stage 4, quantize: int8 checkpoints under ``results/{model}/quantized/{scheme}/``, streamed.

Scheme ``rtn-int8``: every q/k/v/o/gate/up/down projection is rounded per
output channel (symmetric, ``scale = max|W| / 127`` over the input dimension,
round to nearest) by the same function the patched model's ``quantize(8)``
uses, so the file is bit-identical to quantizing in memory. Embeddings, norms
and ``lm_head`` are copied byte for byte.

Memory stays bounded by a few chunks, whatever the model size: the source
shards are memory-mapped, each projection is processed in chunks of rows whose
pages are released once done, and each output shard is written as it is
produced (its header is known in advance: every output dtype and shape follows
from the input's). The result is a complete checkpoint that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads as
the int8 model; the manifest carries the fingerprint of its inputs and, per
matrix, the relative Frobenius error and the largest error in units of the
row's scale.

Usage: python -m workflow_scripts.stages.quantize --model ID --scheme rtn-int8 --patched MANIFEST --manifest PATH
           --settings JSON
"""

import argparse
from pathlib import Path

from workflow_scripts.core.cli import MANIFEST_FOLDER, run_cli
from workflow_scripts.quantization.int8_checkpoint import QuantizeSettings, keep_freed_chunks
from workflow_scripts.quantization.rtn import quantize_checkpoint


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--scheme", required=True)
    parser.add_argument("--patched", required=True, type=MANIFEST_FOLDER, help="the patched checkpoint's MANIFEST.json")
    parser.add_argument("--manifest", required=True, type=Path)
    parser.add_argument("--settings", required=True, type=QuantizeSettings.parse, help="models.<id>.quantize.<scheme>")
    args = parser.parse_args(argv)
    keep_freed_chunks()
    # __spec__.name: this module's dotted name, also under python -m (where __name__ is "__main__")
    quantize_checkpoint(args.model, args.scheme, args.patched, args.manifest.parent, args.settings, __spec__.name)


if __name__ == "__main__":
    run_cli(main)
