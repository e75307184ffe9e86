"""Run a compiled variant on one prompt: greedy decoding through its AOTInductor packages, no checkpoint needed.

Usage: python -m workflow_scripts.run_compiled results/{model}/aoti/{variant} "a prompt" [--max-new-tokens N]
"""

import argparse
import json
import time
from pathlib import Path

import torch

from workflow_scripts.core.cli import run_cli
from workflow_scripts.runtime.package import load_compiled


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="results/{model}/aoti/{variant}")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    runner, tokenizer, graphs = load_compiled(args.folder)
    ids = tokenizer.encode(args.prompt).ids
    start = time.perf_counter()
    tokens, _ = runner.generate(ids, args.max_new_tokens, stop=set(graphs["stop_token_ids"]))
    seconds = time.perf_counter() - start
    print(tokenizer.decode(ids + tokens, skip_special_tokens=True))
    print(json.dumps({"prompt_tokens": len(ids), "new_tokens": len(tokens), "seconds": round(seconds, 3)}))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run_cli(main)
