"""Benchmark of GPTQ per decoder layer (not part of the test run).

Builds a decoder layer of the chosen shape with random bf16 weights and random
calibration hidden states, then runs the stage's own per-layer step
(``quantization.gptq_checkpoint.process_layer``: Hessian pass, GPTQ of the four groups, the
held-out check, the partial file, and the pass that moves the samples on) for
a few layers, timing each part. Layer 1 includes one-off costs (kernel
compilation, library warm-up); the figures are the mean of the later layers.

Baseline, same run, same Hessians: the plain PyTorch column-by-column GPTQ,
each of the seven projections on its own (no stacking, no fused block).

Usage: python tests/benchmarks/bench_gptq.py --shape 7b --device cuda --samples 128 --seqlen 1024
       python tests/benchmarks/bench_gptq.py --shape mid --device cpu --samples 32 --seqlen 512
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from workflow_scripts.checkpoint.vacc_files.configuration_mistral_vacc import MistralConfig  # noqa: E402
from workflow_scripts.checkpoint.vacc_files.modeling_mistral_vacc import MistralDecoderLayer, MistralStaticRotary  # noqa: E402
from workflow_scripts.core.devices import resolve_dtype  # noqa: E402
from workflow_scripts.quantization import gptq  # noqa: E402
from workflow_scripts.quantization import gptq_checkpoint as quantize_gptq  # noqa: E402

SHAPES = {
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_theta": 1e6,
    },
    "mid": {
        "hidden_size": 1024,
        "intermediate_size": 3584,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "rope_theta": 1e6,
    },
}
SETTINGS = quantize_gptq.GptqSettings(
    bits=8,
    modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    nsamples=128,
    holdout=16,
    block_size=128,
    damp=0.01,
    act_order=True,
    first_token_weight=256,
    device="cpu",
    datasets=("c4",),
)


class Timers:
    """Wall seconds spent in wrapped functions (the device synchronized around each call)."""

    def __init__(self, device):
        self.device = device
        self.seconds = {}

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def wrap(self, owner, name, label):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.sync()
            self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
            return result

        setattr(owner, name, timed)


def random_layer(config, seed, device, dtype):
    torch.manual_seed(seed)
    layer = MistralDecoderLayer(config)
    with torch.no_grad():
        for _name, parameter in layer.named_parameters():
            parameter.copy_(
                1.0 + 0.1 * torch.randn_like(parameter) if parameter.dim() == 1 else 0.02 * torch.randn_like(parameter)
            )
    return layer.to(device, dtype).eval()


def baseline_rounding(layer, hessians, timers):
    """The plain loop: each projection alone, column by column in PyTorch."""
    timers.sync()
    start = time.perf_counter()
    fused = gptq.round_block
    gptq.round_block = gptq.round_block_reference
    try:
        for owner, members in quantize_gptq.HESSIAN_GROUPS.items():
            for module in members:
                weight = layer.get_submodule(module).weight.detach()
                gptq.gptq_quantize(weight, hessians[owner], 8, SETTINGS.block_size, SETTINGS.damp)
    finally:
        gptq.round_block = fused
    timers.sync()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="mid")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    config = MistralConfig(**SHAPES[args.shape], vocab_size=1024, num_hidden_layers=args.layers)
    dtype = resolve_dtype("auto", args.device)
    generator = torch.Generator().manual_seed(0)
    embeddings = 0.02 * torch.randn(config.vocab_size, config.hidden_size, generator=generator)
    ids = torch.randint(0, config.vocab_size, (args.samples + SETTINGS.holdout, args.seqlen), generator=generator)
    masks = torch.ones_like(ids)
    rotary = MistralStaticRotary(config)
    calibration = quantize_gptq.Samples(
        embeddings, ids[: args.samples], masks[: args.samples], rotary, args.device, dtype
    )
    holdout = quantize_gptq.Samples(embeddings, ids[args.samples :], masks[args.samples :], rotary, args.device, dtype)
    timers = Timers(args.device)
    timers.wrap(quantize_gptq, "collect_hessians", "hessian pass (forward + X^T X)")
    timers.wrap(quantize_gptq, "quantize_group", "GPTQ + RTN of the 4 groups (incl. error figures)")
    timers.wrap(quantize_gptq, "gptq_quantize", "  of which GPTQ rounding")
    timers.wrap(quantize_gptq.Samples, "advance", "moving samples on (forward)")
    timers.wrap(quantize_gptq, "save_file", "partial file")
    timers.wrap(quantize_gptq, "set_dequantized", "setting dequantized weights")
    timers.wrap(quantize_gptq.Samples, "relative_change", "held-out error figures")
    captured = {}
    original_collect = quantize_gptq.collect_hessians
    quantize_gptq.collect_hessians = lambda layer, samples, weight: captured.setdefault(
        "h", original_collect(layer, samples, weight)
    )
    per_layer, baseline = [], []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.layers):
            layer = random_layer(config, index, args.device, dtype)
            before = dict(timers.seconds)
            captured.clear()
            timers.sync()
            start = time.perf_counter()
            figures = quantize_gptq.process_layer(
                layer,
                index,
                calibration,
                holdout,
                SETTINGS,
                torch.bfloat16,
                Path(folder) / f"layer-{index}.safetensors",
                "bench",
            )
            timers.sync()
            parts = {k: v - before.get(k, 0.0) for k, v in timers.seconds.items()}
            total = time.perf_counter() - start
            nested = "  of which GPTQ rounding"
            per_layer.append(
                {
                    "total": total,
                    **parts,
                    "rest (held-out forwards, bookkeeping)": total - sum(v for k, v in parts.items() if k != nested),
                    "heldout": figures["heldout_output_error"],
                }
            )
            if not args.no_baseline and index > 0:
                baseline.append(
                    baseline_rounding(random_layer(config, index, args.device, dtype), captured["h"], timers)
                )
            print(f"layer {index}: {per_layer[-1]['total']:.3f} s", flush=True)
    warm = per_layer[1:] or per_layer
    report = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "tokens": f"{args.samples} x {args.seqlen}",
        "first layer s": round(per_layer[0]["total"], 3),
        "per layer s (mean of later layers)": {
            k: round(sum(layer[k] for layer in warm) / len(warm), 4) for k in per_layer[0] if k != "heldout"
        },
        "heldout output error (last layer)": per_layer[-1]["heldout"],
        "peak host RSS GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
    }
    if args.device == "cuda":
        report["peak GPU memory GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    if baseline:
        rounding = report["per layer s (mean of later layers)"]["  of which GPTQ rounding"]
        report["baseline plain PyTorch GPTQ rounding s"] = round(sum(baseline) / len(baseline), 3)
        report["rounding speed-up vs baseline"] = round(report["baseline plain PyTorch GPTQ rounding s"] / rounding, 1)
        report["layer s with the baseline rounding"] = round(
            report["per layer s (mean of later layers)"]["total"]
            - rounding
            + report["baseline plain PyTorch GPTQ rounding s"],
            3,
        )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
