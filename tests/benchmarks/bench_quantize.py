"""Benchmark of the rtn-int8 quantize stage on a Mistral-7B-shaped checkpoint (not part of the test run).

Synthesizes a checkpoint with Mistral-7B-Instruct-v0.2's tensor names, shapes,
dtype (bf16) and 5 GB sharding (random values, seeded), runs it through the
workflow's own download (local source) and patch stages once, and caches all
of it under ``.cache/bench/mistral-7b-shape/`` (14.5 GB of disk; each run
below writes and deletes up to 7.6 GB more). Then, in one run, each as its own
process, timed with its peak RSS:

* stage: ``python -m workflow_scripts.stages.quantize`` as the workflow runs it;
* copy: read the same tensors and write as many bytes as the stage writes, no compute
  (stage and copy alternate, twice each, since the disk's speed drifts);
* vendor: ``AutoModelForCausalLM.from_pretrained`` of the whole model, ``quantize(8)``, ``save_pretrained``;
* gguf Q8_0: the ``gguf`` package's numpy Q8_0 quantizer on the same projection tensors;
* in memory: both quantizers on the 7B projection shapes with no I/O (compute alone).

GB/s are bytes of input weights per second. Targets: stage peak RSS <= 1.5 GB,
stage >= 3x Q8_0 and >= 0.4x copy.

Usage: python tests/benchmarks/bench_quantize.py [--skip-vendor]   (needs `pip install gguf`)
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
ROOT = REPO / ".cache" / "bench" / "mistral-7b-shape"
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "attention_dropout": 0.0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": 32000,
}
SHARD_BYTES = 5_000_000_000
SETTINGS = {"bits": 8, "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def synthesize(folder):
    """Write the checkpoint tensor by tensor (never all in memory), sharded as save_pretrained does at 5 GB."""
    import torch

    from workflow_scripts.checkpoint.layout import tensor_shapes
    from workflow_scripts.checkpoint.safetensors_stream import SafetensorsWriter
    from workflow_scripts.core.files import atomic_write_json
    from workflow_scripts.data.tokenizer_files import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    shapes = list(tensor_shapes(MISTRAL_7B).items())
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = 2 * int(torch.tensor(shape).prod())
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for index, tensors in enumerate(shards, start=1):
        shard = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(folder / shard, [(n, torch.bfloat16, s) for n, s in tensors], {"format": "pt"})
        for name, shape in tensors:
            writer.write(
                (torch.randn(shape, generator=generator) * (1.0 if len(shape) == 1 else 0.02)).to(torch.bfloat16)
            )
            weight_map[name] = shard
        writer.close()
    atomic_write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    atomic_write_json(folder / "config.json", MISTRAL_7B)
    write_tokenizer("sentencepiece-v1", folder)


def prepare():
    patched = ROOT / "results" / "patched"
    if (patched / "MANIFEST.json").exists():
        return patched
    if not (ROOT / "source" / "config.json").exists():
        synthesize(ROOT / "source")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    resources = ROOT / "resources" / "MANIFEST.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "workflow_scripts.stages.download",
            "--model",
            "bench-7b",
            "--source",
            json.dumps({"local": str(ROOT / "source")}),
            "--manifest",
            str(resources),
        ],
        check=True,
        env=env,
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "workflow_scripts.stages.patch",
            "--model",
            "bench-7b",
            "--source",
            str(resources),
            "--manifest",
            str(patched / "MANIFEST.json"),
            "--settings",
            json.dumps({"insert_slice": True, "iter_num": 0}),
        ],
        check=True,
        env=env,
    )
    return patched


def timed(command):
    """Run ``command``; return (seconds, peak RSS in GB) of that process alone."""
    start = time.monotonic()
    process = subprocess.Popen(
        command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - start
    if status != 0:
        raise RuntimeError(f"{command[:4]} failed: {process.stderr.read().decode()[-2000:]}")
    return seconds, usage.ru_maxrss / 1e6


def copy_baseline(patched, out_bytes, target):
    """Read every tensor byte of the shards and write ``out_bytes`` of them: I/O with no compute."""
    written, chunk = 0, 64 << 20
    with open(target, "wb") as out:
        for shard in sorted(patched.glob("model-*.safetensors")):
            with open(shard, "rb") as source:
                while data := source.read(chunk):
                    if written < out_bytes:
                        out.write(data[: out_bytes - written])
                        written += min(len(data), out_bytes - written)


def gguf_q8_0(patched):
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from workflow_scripts.checkpoint.safetensors_stream import SafetensorsFile
    from workflow_scripts.quantization.int8_checkpoint import projection_of

    for shard in sorted(patched.glob("model-*.safetensors")):
        with SafetensorsFile(shard) as handle:
            for name in handle.entries:
                if projection_of(name, SETTINGS["modules"]):
                    weight = handle.tensor(name).float().numpy()
                    quantize(np.ascontiguousarray(weight), GGMLQuantizationType.Q8_0)
                    handle.release(name, 0, weight.size)


def kernels():
    """In memory, no I/O: this stage's chunked quantizer (with its error figures) against gguf's Q8_0."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    from workflow_scripts.checkpoint.vacc_files.quantization_vacc import quantize_per_channel
    from workflow_scripts.quantization.int8_checkpoint import MatrixError, keep_freed_chunks
    from workflow_scripts.quantization.rtn import CHUNK_ELEMENTS

    keep_freed_chunks()
    generator = torch.Generator().manual_seed(0)
    for shape in ((4096, 4096), (14336, 4096), (4096, 14336)):
        weight = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        rows = max(1, CHUNK_ELEMENTS // shape[1])
        timings = {}
        for label in ("stage", "gguf Q8_0"):
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                if label == "stage":
                    error = MatrixError()
                    for first in range(0, shape[0], rows):
                        chunk = weight[first : first + rows]
                        q, scale = quantize_per_channel(chunk)
                        error.add(chunk, q, scale)
                else:
                    quantize(np.ascontiguousarray(weight.float().numpy()), GGMLQuantizationType.Q8_0)
                best = min(best, time.perf_counter() - start)
            timings[label] = weight.numel() * 2 / best / 1e9
        print(
            f"in memory {shape}: stage {timings['stage']:.2f} GB/s, gguf Q8_0 {timings['gguf Q8_0']:.2f} GB/s, "
            f"ratio {timings['stage'] / timings['gguf Q8_0']:.1f}"
        )


def vendor(patched, target):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(patched, trust_remote_code=True, dtype=torch.bfloat16)
    model.quantize(8)
    model.save_pretrained(target)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-vendor", action="store_true")
    parser.add_argument("mode", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode == "prepare":
        return prepare()
    if args.mode == "copy":
        return copy_baseline(Path(args.args[0]), int(args.args[1]), Path(args.args[2]))
    if args.mode == "gguf":
        return gguf_q8_0(Path(args.args[0]))
    if args.mode == "vendor":
        return vendor(Path(args.args[0]), Path(args.args[1]))
    if args.mode == "kernels":
        return kernels()

    start = time.monotonic()
    # In a child: a process's peak RSS counts its parent's at fork, so this one stays small.
    subprocess.run([sys.executable, __file__, "prepare"], check=True)
    patched = ROOT / "results" / "patched"
    weights = sum(p.stat().st_size for p in patched.glob("model-*.safetensors"))
    projections = sum(4096 * 4096 + 2 * 1024 * 4096 + 4096 * 4096 + 3 * 14336 * 4096 for _ in range(32)) * 2
    print(
        f"checkpoint: {weights / 1e9:.2f} GB of bf16 safetensors in {len(list(patched.glob('model-*')))} "
        f"shards, projections {projections / 1e9:.2f} GB (ready in {time.monotonic() - start:.0f} s)"
    )
    out = ROOT / "out"
    shutil.rmtree(out, ignore_errors=True)
    results = {}
    stage = [
        sys.executable,
        "-m",
        "workflow_scripts.stages.quantize",
        "--model",
        "bench-7b",
        "--scheme",
        "rtn-int8",
        "--patched",
        str(patched / "MANIFEST.json"),
        "--manifest",
        str(out / "stage" / "MANIFEST.json"),
        "--settings",
        json.dumps(SETTINGS),
    ]
    me = [sys.executable, __file__]
    out_bytes = None
    # Stage and copy alternate, twice each: this disk's speed drifts with the page cache's state, and a
    # pair run back to back meets the same state.
    for attempt in (1, 2):
        results[f"stage #{attempt}"] = (*timed(stage), weights)
        out_bytes = sum(p.stat().st_size for p in (out / "stage").glob("model-*.safetensors"))
        shutil.rmtree(out / "stage")
        out.mkdir(exist_ok=True)
        results[f"copy #{attempt}"] = (
            *timed([*me, "copy", str(patched), str(out_bytes), str(out / "copy.bin")]),
            weights,
        )
        (out / "copy.bin").unlink()
    results["gguf Q8_0"] = (*timed([*me, "gguf", str(patched)]), projections)
    subprocess.run([*me, "kernels"], check=True)
    if not args.skip_vendor:
        results["vendor"] = (*timed([*me, "vendor", str(patched), str(out / "vendor")]), weights)
    shutil.rmtree(out, ignore_errors=True)

    print(f"stage output: {out_bytes / 1e9:.2f} GB")
    print(f"{'':12} {'seconds':>8} {'GB/s':>6} {'peak RSS GB':>12}")
    for label, (seconds, rss, nbytes) in results.items():
        print(f"{label:12} {seconds:8.1f} {nbytes / seconds / 1e9:6.2f} {rss:12.2f}")
    rate = {label: nbytes / seconds for label, (seconds, _, nbytes) in results.items()}
    for attempt in (1, 2):
        print(
            f"pair {attempt}: stage / copy {rate[f'stage #{attempt}'] / rate[f'copy #{attempt}']:.2f}   "
            f"stage / gguf Q8_0 {rate[f'stage #{attempt}'] / rate['gguf Q8_0']:.2f}"
        )


if __name__ == "__main__":
    main()
