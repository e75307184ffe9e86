"""Benchmark of the AOTInductor packages against eager PyTorch (not part of the test run).

For every variant the workflow built under ``results/{model}/aoti/`` (run
``snakemake`` first), in one process and one run: compile time (from the
manifest), package size, prefill latency and decode tokens per second of

* compiled: the ``.pt2`` packages through ``runtime.package.StaticGenerator``;
* eager, static graphs: the same prefill/decode modules, not compiled, same loop;
* eager, model: the checkpoint's own forward and growing KV cache (``runtime.decode.greedy_decode``),
  what a user of the checkpoint runs without compiling.

Each figure is the median of ``--repeats`` runs of ``--steps`` decode steps after one warm-up.
Goal: compiled decode at least 1.5x the eager model on CPU.

Usage: python tests/benchmarks/bench_aoti.py [--models demo-mistral demo-ministral] [--steps 32] [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from workflow_scripts.checkpoint.vacc_code import load_vacc_model  # noqa: E402
from workflow_scripts.runtime.decode import greedy_decode  # noqa: E402
from workflow_scripts.runtime.graphs import Decode, Prefill  # noqa: E402
from workflow_scripts.runtime.package import StaticGenerator, load_compiled  # noqa: E402

PROMPT = "Mistral models are decoder-only transformers with grouped-query attention"


def median_seconds(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def figures(generator, ids, steps, repeats):
    """(prefill seconds, decode tokens per second) of a StaticGenerator."""
    prefill = median_seconds(lambda: generator.generate(ids, 0), repeats)
    total = median_seconds(lambda: generator.generate(ids, steps), repeats)
    return prefill, steps / (total - prefill)


def model_figures(model, ids, steps, repeats):
    tensor = torch.tensor([ids])
    prefill = median_seconds(lambda: model(input_ids=tensor, use_cache=True), repeats)
    total = median_seconds(lambda: greedy_decode(model, tensor, steps), repeats)
    return prefill, steps / (total - prefill)


def checkpoint_of(results, model_id, variant):
    return results / model_id / ("patched" if variant == "float" else f"quantized/{variant}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["demo-mistral", "demo-ministral"])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=REPO / "results", help="a workflow folder's results/")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    for model_id in args.models:
        for folder in sorted((args.results / model_id / "aoti").iterdir()):
            manifest = json.loads((folder / "MANIFEST.json").read_text())
            compiled, tokenizer, graphs = load_compiled(folder)
            ids = tokenizer.encode(PROMPT).ids
            steps = min(args.steps, graphs["seq_total"] - graphs["seq_in"])
            model = load_vacc_model(checkpoint_of(args.results, model_id, folder.name), getattr(torch, graphs["dtype"]))
            eager = StaticGenerator(
                Prefill(model, graphs["seq_total"]),
                Decode(model),
                graphs["batch"],
                graphs["seq_in"],
                graphs["seq_total"],
            )
            row = {
                "model": model_id,
                "variant": folder.name,
                "package MB": round((manifest["bytes"]["graphs"] + manifest["bytes"]["weights"]) / 1e6, 1),
                "checkpoint weights MB": round(manifest["bytes"]["checkpoint_weights"] / 1e6, 1),
            }
            for label, (prefill, rate) in (
                ("compiled", figures(compiled, ids, steps, args.repeats)),
                ("eager graphs", figures(eager, ids, steps, args.repeats)),
                ("eager model", model_figures(model, ids, steps, args.repeats)),
            ):
                row[f"{label} prefill ms"] = round(prefill * 1e3, 2)
                row[f"{label} decode tok/s"] = round(rate, 1)
            row["decode speed-up vs eager model"] = round(
                row["compiled decode tok/s"] / row["eager model decode tok/s"], 2
            )
            row["decode speed-up vs eager graphs"] = round(
                row["compiled decode tok/s"] / row["eager graphs decode tok/s"], 2
            )
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(
        json.dumps(
            {
                "prompt tokens": len(ids),
                "decode steps": steps,
                "repeats": args.repeats,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
