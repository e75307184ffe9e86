"""Benchmark of the compiled runtime: one layer graph run per layer against one graph of the whole model (not part
of the test run).

For each variant the workflow built under ``results/{model}/aoti/`` (run ``snakemake`` first), in one process and
one run, from that variant's checkpoint:

* per-layer: the layer and head graphs the compile stage builds (``compile_graphs``), compiled here again and
  timed;
* whole-model: every decoder layer in one exported graph, with the same attention (``runtime.graphs.attend``), the
  weights as the graph's constants, compiled and timed the same way; the head is the per-layer build's;
* eager: the same layer and head modules, not compiled (``runtime.package.eager_runner``);
* eager model: the checkpoint's own forward and growing KV cache (``runtime.decode.greedy_decode``), what a user
  of the checkpoint runs without compiling.

For each: compile seconds, time to first token of a 20-token prompt, and decode tokens per second of 1 and of
``rows`` requests at once at two context positions. Each figure is the median of ``--repeats`` runs after one
warm-up; ratios are against the eager model and between the two compiled forms, measured in the same process.

Usage: python tests/benchmarks/bench_aoti.py [--models smollm2-135m-instruct] [--steps 16] [--repeats 5]
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from workflow_scripts.checkpoint.vacc_code import load_vacc_model  # noqa: E402
from workflow_scripts.compilation.aoti_build import AotiSettings, compile_graphs, private_inductor_cache  # noqa: E402
from workflow_scripts.runtime.decode import greedy_decode  # noqa: E402
from workflow_scripts.runtime.graphs import attend  # noqa: E402
from workflow_scripts.runtime.package import ModelRunner, eager_runner, load_compiled  # noqa: E402

PROMPT_TOKENS = 20
POSITIONS = (64, 1024)


class WholeModel(torch.nn.Module):
    """Every decoder layer in one graph: ``forward(hidden, positions, cos, sin, *keys, *values)``."""

    def __init__(self, model):
        super().__init__()
        self.layers = model.model.layers
        self.rotate_half = sys.modules[type(self.layers[0]).__module__].rotate_half

    def forward(self, hidden, positions, cos, sin, *caches):
        keys, values = caches[: len(self.layers)], caches[len(self.layers) :]
        for layer, layer_keys, layer_values in zip(self.layers, keys, values, strict=True):
            hidden = attend(layer, self.rotate_half, hidden, positions, cos, sin, layer_keys, layer_values)
        return hidden


class WholeModelRunner(ModelRunner):
    """A :class:`ModelRunner` whose layers run as one compiled graph."""

    def __init__(self, whole, runner):
        super().__init__(
            None,
            None,
            runner.head,
            runner.weights,
            runner.layer_weights,
            runner.head_weights,
            runner.rows,
            runner.context,
            (runner.kv_heads, runner.head_dim),
            runner.device,
        )
        self.whole = whole

    def forward(self, cache, first_row, ids, positions, all_logits=False):
        rows, length = slice(first_row, first_row + ids.shape[0]), int(positions.max()) + 1
        caches = [keys[rows, :, :length] for keys in cache.keys] + [values[rows, :, :length] for values in cache.values]
        hidden = self.whole(self.embedding[ids], positions, self.cos, self.sin, *caches)
        hidden = hidden.reshape(-1, hidden.shape[-1]) if all_logits else hidden[:, -1]
        return self.head(hidden.contiguous(), *self.head_weights)


def compile_whole_model(model, runner, folder):
    """The whole-model graph, exported with the same dynamic sizes as the layer graph; ``(package, seconds)``."""
    config = model.config
    cache = runner.new_cache()
    example = torch.zeros(2, 3, config.hidden_size, dtype=model.dtype)
    positions = torch.arange(5, 8).expand(2, -1).contiguous()
    caches = [keys[:2, :, :8] for keys in cache.keys] + [values[:2, :, :8] for values in cache.values]
    dynamic = torch.export.Dim.DYNAMIC
    shapes = (
        {0: dynamic, 1: dynamic},
        {0: dynamic, 1: dynamic},
        None,
        None,
        tuple({0: dynamic, 2: dynamic} for _ in caches),
    )
    start = time.monotonic()
    with private_inductor_cache("bench-whole-model", "x"):
        exported = torch.export.export(
            WholeModel(model).eval(), (example, positions, runner.cos, runner.sin, *caches), dynamic_shapes=shapes
        )
        path = torch._inductor.aoti_compile_and_package(
            exported, package_path=str(folder / "whole.pt2"), inductor_configs={"freezing": False}
        )
    seconds = time.monotonic() - start
    return torch._inductor.aoti_load_package(path), seconds


def median_seconds(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def runner_figures(runner, steps, repeats):
    cache = runner.new_cache()
    figures = {
        "ttft ms": 1e3
        * median_seconds(lambda: runner.prefill(cache, 0, list(range(100, 100 + PROMPT_TOKENS))), repeats)
    }
    for rows in sorted({1, runner.rows}):
        for position in POSITIONS:

            def decode(rows=rows, position=position):
                for step in range(steps):
                    runner.decode(cache, [7] * rows, [position + step] * rows)

            figures[f"decode tok/s, {rows} rows at {position}"] = rows * steps / median_seconds(decode, repeats)
    return figures


def model_figures(model, steps, repeats):
    ids = torch.arange(100, 100 + PROMPT_TOKENS).unsqueeze(0)
    prefill = median_seconds(lambda: model(input_ids=ids, use_cache=True), repeats)
    total = median_seconds(lambda: greedy_decode(model, ids, steps), repeats)
    return {"ttft ms": 1e3 * prefill, f"decode tok/s, 1 rows at {PROMPT_TOKENS}": steps / (total - prefill)}


def checkpoint_of(results, model_id, variant):
    return results / model_id / ("patched" if variant == "float" else f"quantized/{variant}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=REPO / "results", help="a workflow folder's results/")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for model_id in args.models:
        for folder in sorted((args.results / model_id / "aoti").iterdir()):
            graphs = json.loads((folder / "graphs.json").read_text())
            settings = AotiSettings("cpu", graphs["rows"], "float32", graphs["context"], {"float32": 1e-3})
            model = load_vacc_model(
                checkpoint_of(args.results, model_id, folder.name),
                torch.float32,
                max_position_embeddings=graphs["context"],
            )
            eager = eager_runner(model, graphs["rows"], graphs["context"])
            with tempfile.TemporaryDirectory() as scratch:
                start = time.monotonic()
                with private_inductor_cache("bench-per-layer", "x"):
                    compile_graphs(model, settings, Path(scratch))
                per_layer_seconds = time.monotonic() - start
                (Path(scratch) / "graphs.json").write_text(json.dumps(graphs))
                (Path(scratch) / "tokenizer.json").symlink_to(folder / "tokenizer.json")
                per_layer = load_compiled(scratch)[0]
                whole_package, whole_seconds = compile_whole_model(model, eager, Path(scratch))
                whole = WholeModelRunner(whole_package, per_layer)
                rows = {
                    "per-layer graphs": {
                        "compile s": per_layer_seconds,
                        **runner_figures(per_layer, args.steps, args.repeats),
                    },
                    "whole-model graph": {
                        "compile s": whole_seconds,
                        **runner_figures(whole, args.steps, args.repeats),
                    },
                    "eager layers": runner_figures(eager, args.steps, args.repeats),
                    "eager model": model_figures(model, args.steps, args.repeats),
                }
            for label, figures in rows.items():
                record = {"model": model_id, "variant": folder.name, "runtime": label}
                print(json.dumps(record | {key: round(value, 2) for key, value in figures.items()}), flush=True)
            per, one = rows["per-layer graphs"], rows["whole-model graph"]
            ratios = {
                "compile time, whole-model / per-layer": one["compile s"] / per["compile s"],
                "ttft, whole-model / per-layer": one["ttft ms"] / per["ttft ms"],
                **{f"{key}, per-layer / whole-model": per[key] / one[key] for key in per if key.startswith("decode")},
            }
            print(json.dumps({"model": model_id, "variant": folder.name} | {k: round(v, 2) for k, v in ratios.items()}))
    print(
        json.dumps(
            {
                "steps": args.steps,
                "repeats": args.repeats,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
