"""Benchmark of our GPTQ against llm-compressor's on a trained model (not part of the test run: about 40 minutes).

Both quantizers round SmolLM2-135M-Instruct (the default run's real model) to
per-output-channel symmetric int8 weights with float activations (W8A16) from
the same calibration windows, with the same settings: block size 128,
dampening 0.01 of the Hessian's mean diagonal, no act-order, the first
``--nsamples`` windows of the calibration shard, batch 1, no shuffling.

* ours: the workflow's own stage, ``python -m workflow_scripts.stages.quantize_gptq``, on the patched checkpoint,
  once with those matched settings (``first_token_weight: 1``) and once, for information, with the project's
  defaults (``act_order: true``, ``first_token_weight: 256``); wall time of each stage process (which also
  measures its held-out errors and writes the checkpoint).
* llm-compressor: ``oneshot`` with a ``GPTQModifier`` (explicit channel-strategy config group, not the W8A16
  preset, which is group-128; ``actorder=None``, whose default is static) on a stock float32 model of the
  upstream folder, fed by ``workflow_scripts.data.token_datasets.token_dataset``. It runs in an isolated
  virtual environment (``--venv``; built on first use: torch 2.13.0, then llmcompressor 0.14.0.1 under a
  constraint pinning torch), as a subprocess that writes each Linear's integers and scale, taken from memory
  before anything is saved; wall time of the model load plus ``oneshot``. Once per ``--llmc-classes`` entry:
  ``MistralForCausalLM``, and ``LlamaForCausalLM`` on the same folder (SmolLM2 is a Llama model; a Mistral
  without a sliding window computes the same). With ``MistralForCausalLM``, llm-compressor 0.14.0.1 (transformers
  5.17) calibrates with bidirectional attention: the inputs its sequential pipeline gives layer 0's o_proj
  equal a stock forward with an all-True 4-D mask (2.7e-7 relative), not the causal one (25% off), under sdpa and
  eager alike; loaded as ``LlamaForCausalLM`` they equal the causal forward (2e-7). The Llama run is the
  comparison of the algorithms; the Mistral run is what a user of that class gets.

Then, in this interpreter, on a stock float32 ``MistralForCausalLM`` of the upstream folder, for float, RTN
(the run's ``rtn-int8``), ours and llm-compressor's dequantized weights (``q * scale``):

* per-layer output error: for each decoder layer i, the model with float weights everywhere except layer i's
  seven projections; the relative Frobenius error of layer i's output against the float model's, on the
  ``--holdout`` calibration windows after the first ``nsamples`` (never in a Hessian of either quantizer). Layer
  i's inputs are then the float model's, so they are captured once (a forward pre-hook) and layer i alone is
  rerun with each method's weights: the same figure as a whole hybrid forward, at a fraction of the cost.
  Also shown relative to what the layer adds to its input (the stage's held-out figure, docs/gptq.md); the
  per-layer ratio between methods is the same under both.
* end perplexity: every projection dequantized, on the evaluation windows (NLL over all predicted
  positions), its change against float, KL divergence to float's next-token distribution and top-1 agreement.

The check: ours (matched) no worse than each llm-compressor run by more than ``--tolerance`` (2%) in end
perplexity and in the mean per-layer error; PASS or FAIL, exit status 1 on FAIL.

The algorithms otherwise differ in: the scale (ours ``max|W| / 127`` rounded to the checkpoint's dtype, bf16
here, integers in [-127, 127]; theirs ``max|W| / 127.5`` in float32, integers in [-128, 127]); the Hessian
(ours ``2 X X^T / tokens`` in float64 on the CPU, factorised in float64; theirs ``2 X X^T / sequences`` in
float32, padding included: the scale cancels in the relative dampening, and these windows have no padding).
Both take each layer's inputs from the already-quantized layers before it, and within a layer every projection
sees inputs computed with the layer's original weights (neither is "true-sequential").

Usage: python tests/benchmarks/gptq_vs_llmcompressor.py [--run DIR] [--nsamples 32] [--results out.json]
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from workflow_scripts.data.tokenizers import TOKENIZER_FILE, file_fingerprint  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TORCH = "torch==2.13.0"
LLMCOMPRESSOR = "llmcompressor==0.14.0.1"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# Run by the llm-compressor venv's interpreter; argument: JSON of repo, upstream, model_class, calibration, nsamples,
# block_size, damp, out. Writes the integers and scales to out, its timings and versions to out.json.
LLMC_SCRIPT = r"""
import json, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["repo"])
started = time.perf_counter()
import compressed_tensors, llmcompressor, torch, transformers
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
from safetensors.torch import save_file
from transformers import AutoTokenizer
from workflow_scripts.data.token_datasets import token_dataset
import_s = time.perf_counter() - started

dataset = token_dataset(args["calibration"], args["nsamples"])
seqlen = len(dataset[0]["input_ids"])
start = time.perf_counter()
model_class = getattr(transformers, args["model_class"])
model = model_class.from_pretrained(args["upstream"], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(args["upstream"])  # oneshot wants one even for pre-tokenized rows
load_s = time.perf_counter() - start
weights = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
recipe = GPTQModifier(
    config_groups={"group_0": {"targets": ["Linear"], "weights": weights,
                               "input_activations": None, "output_activations": None}},
    ignore=["lm_head"], block_size=args["block_size"], dampening_frac=args["damp"], actorder=None,
)
start = time.perf_counter()
oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=args["nsamples"],
        max_seq_length=seqlen, batch_size=1, shuffle_calibration_samples=False)
oneshot_s = time.perf_counter() - start

# After oneshot each Linear holds its fake-quantized weight q * scale and weight_scale [out, 1]; saving the model
# would compress it in place, so the integers are taken from memory here.
tensors, worst = {}, 0.0
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
        assert not module.weight_zero_point.any(), name
        scale = module.weight_scale.detach().float().reshape(-1)
        units = module.weight.detach().float() / scale.unsqueeze(1)
        q = units.round()
        worst = max(worst, float((units - q).abs().max()))
        tensors[name + ".weight"] = q.to(torch.int8).contiguous()
        tensors[name + ".weight_scale"] = scale.contiguous()
save_file(tensors, args["out"])
open(args["out"] + ".json", "w").write(json.dumps({
    "import_s": import_s, "load_s": load_s, "oneshot_s": oneshot_s, "matrices": len(tensors) // 2,
    "seqlen": seqlen, "samples": len(dataset), "max_off_grid": worst,
    "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                 "transformers": transformers.__version__, "torch": torch.__version__},
}))
"""


def llmcompressor_python(venv, base_python, work):
    """The isolated venv's interpreter, built when ``venv`` lacks one with llm-compressor in it (the style of
    tests/test_transformers445.py; not shared, since that one skips a pytest test where this one exits)."""
    python = venv / "bin" / "python"
    if (
        python.exists()
        and subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True).returncode == 0
    ):
        return python
    print(f"building the llm-compressor venv in {venv} (a few minutes)", flush=True)
    constraints = work / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    steps = [
        [base_python, "-m", "venv", str(venv)],
        [str(python), "-m", "pip", "install", "-q", TORCH],
        [str(python), "-m", "pip", "install", "-q", "-c", str(constraints), LLMCOMPRESSOR],
    ]
    if python.exists():
        steps = steps[1:]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"cannot build the llm-compressor venv ({' '.join(step[:6])}...):\n{result.stderr[-3000:]}")
    return python


def run_logged(command, log, env=None):
    """Run ``command`` from the repository, its output into ``log``; its wall seconds, exit on failure."""
    start = time.perf_counter()
    with open(log, "w") as output:
        result = subprocess.run(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(
            f"{' '.join(map(str, command[:4]))}... failed (exit {result.returncode}); its log {log}:\n"
            + Path(log).read_text()[-3000:]
        )
    return seconds


def run_ours(args, folder, act_order, first_token_weight):
    """The project's GPTQ stage into ``folder``, from scratch (no partial files of an earlier run); wall seconds."""
    settings = {
        "bits": 8,
        "modules": list(PROJECTIONS),
        "nsamples": args.nsamples,
        "holdout": args.holdout,
        "block_size": args.block_size,
        "damp": args.damp,
        "act_order": act_order,
        "first_token_weight": first_token_weight,
        "device": "cpu",
        "datasets": [args.calibration.stem],
    }
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(folder.parent / f".{folder.name}.partial", ignore_errors=True)
    command = [sys.executable, "-m", "workflow_scripts.stages.quantize_gptq", "--model", args.model]
    command += ["--patched", str(args.patched / "MANIFEST.json"), "--calibration", str(args.calibration)]
    command += ["--manifest", str(folder / "MANIFEST.json"), "--settings", json.dumps(settings)]
    return run_logged(command, folder.parent / f"{folder.name}.log")


def run_rtn(args, folder):
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "workflow_scripts.stages.quantize", "--model", args.model, "--scheme", "rtn-int8"]
    command += ["--patched", str(args.patched / "MANIFEST.json"), "--manifest", str(folder / "MANIFEST.json")]
    command += ["--settings", json.dumps({"bits": 8, "modules": list(PROJECTIONS)})]
    run_logged(command, folder.parent / "rtn-int8.log")


def run_llmcompressor(args, python, model_class, out):
    """llm-compressor's GPTQ in its venv, the upstream folder loaded as ``model_class``; its JSON report."""
    script = args.work / "llmc_gptq.py"
    script.write_text(LLMC_SCRIPT)
    request = {
        "repo": str(REPO),
        "upstream": str(args.upstream),
        "model_class": model_class,
        "calibration": str(args.calibration),
        "nsamples": args.nsamples,
        "block_size": args.block_size,
        "damp": args.damp,
        "out": str(out),
    }
    env = {**os.environ, **OFFLINE, "PYTHONPATH": ""}
    run_logged([str(python), str(script), json.dumps(request)], args.work / f"llmcompressor-{model_class}.log", env)
    return json.loads(Path(f"{out}.json").read_text())


def int8_weights(path):
    """``{projection weight name: (int8 q [out, in], float32 scale [out])}`` of an int8 checkpoint folder (ours,
    RTN) or llm-compressor's file: both name them ``<module>.weight`` and ``<module>.weight_scale``."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    found = {}
    for file in files:
        with safe_open(str(file), "pt") as handle:
            names = set(handle.keys())
            for name in names:
                if name.endswith("_proj.weight") and f"{name}_scale" in names:
                    found[name] = (handle.get_tensor(name), handle.get_tensor(f"{name}_scale").float().reshape(-1))
    return found


def dequantized(entries, expected):
    if set(entries) != set(expected):
        sys.exit(
            f"the quantized matrices differ from the model's projections: {sorted(set(entries) ^ set(expected))[:6]}"
        )
    return {name: q.float() * scale.unsqueeze(1) for name, (q, scale) in entries.items()}


def conventions(entries, float_weights):
    """Range of the integers and which scale convention they follow: ours max|W|/127 rounded to the checkpoint's
    dtype, llm-compressor's max|W|/127.5 in float32."""
    low = min(int(q.min()) for q, _ in entries.values())
    high = max(int(q.max()) for q, _ in entries.values())
    rules = {}
    for label, divisor in (("max|W|/127", 127.0), ("max|W|/127.5", 127.5)):
        for dtype in (torch.float32, torch.bfloat16):
            rules[f"{label} in {str(dtype).split('.')[-1]}"] = all(
                torch.allclose(scale, (float_weights[name].abs().amax(dim=1) / divisor).to(dtype).float(), 1e-6, 0)
                for name, (_, scale) in entries.items()
            )
    return {"q_range": [low, high], "scale": [rule for rule, holds in rules.items() if holds] or ["other"]}


def set_weights(model, weights, names=None):
    with torch.no_grad():
        for name in names or weights:
            model.get_parameter(name).copy_(weights[name])


def layer_errors(model, ids, float_weights, methods):
    """Per decoder layer and method, the relative error of the layer's output (layer i quantized, all else float),
    against the output and against the layer's own contribution (output minus input)."""
    layers = model.model.layers
    inputs, outputs, hooks = {}, {}, []
    for index, layer in enumerate(layers):
        hooks.append(
            layer.register_forward_pre_hook(
                lambda module, args, kwargs, index=index: inputs.__setitem__(index, (args, kwargs)), with_kwargs=True
            )
        )
        hooks.append(layer.register_forward_hook(lambda m, a, out, index=index: outputs.__setitem__(index, out)))
    with torch.no_grad():
        model.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    for hook in hooks:
        hook.remove()
    figures = {method: {"output": [], "contribution": []} for method in methods}
    with torch.no_grad():
        for index, layer in enumerate(layers):
            args, kwargs = inputs[index]
            hidden = args[0] if args else kwargs["hidden_states"]
            reference = outputs[index][0] if isinstance(outputs[index], tuple) else outputs[index]
            names = [f"model.layers.{index}.{part}.{p}.weight" for part, p in module_names()]
            if index == 0:  # the rerun reproduces the captured output with float weights
                rerun = layer(*args, **kwargs)
                rerun = rerun[0] if isinstance(rerun, tuple) else rerun
                assert (rerun - reference).norm() <= 1e-6 * reference.norm(), "layer 0 rerun differs"

            for method, weights in methods.items():
                set_weights(model, weights, names)
                out = layer(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                error = (out.double() - reference.double()).norm()
                figures[method]["output"].append(float(error / reference.double().norm()))
                figures[method]["contribution"].append(float(error / (reference.double() - hidden.double()).norm()))
            set_weights(model, float_weights, names)
    return figures


def module_names():
    return [("self_attn" if p in PROJECTIONS[:4] else "mlp", p) for p in PROJECTIONS]


def end_to_end(model, ids, float_weights, methods, batch):
    """Perplexity of float and each method on the evaluation windows, with each method's KL divergence to float
    (nats per position) and top-1 agreement, over all predicted positions."""
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0} for name in ("float", *methods)}
    positions = 0
    with torch.no_grad():
        for first in range(0, ids.shape[0], batch):
            rows = ids[first : first + batch]
            targets = rows[:, 1:].unsqueeze(-1)
            set_weights(model, float_weights)
            reference = torch.log_softmax(model(input_ids=rows, use_cache=False).logits[:, :-1].float(), dim=-1)
            sums["float"]["nll"] -= float(reference.gather(-1, targets).double().sum())
            top = reference.argmax(-1)
            probabilities = reference.exp()
            for method, weights in methods.items():
                set_weights(model, weights)
                logp = torch.log_softmax(model(input_ids=rows, use_cache=False).logits[:, :-1].float(), dim=-1)
                sums[method]["nll"] -= float(logp.gather(-1, targets).double().sum())
                sums[method]["kl"] += float((probabilities * (reference - logp)).sum(-1).double().sum())
                sums[method]["agree"] += int((logp.argmax(-1) == top).sum())
                del logp
            positions += targets.numel()
    set_weights(model, float_weights)
    result = {}
    for name, total in sums.items():
        result[name] = {"perplexity": math.exp(total["nll"] / positions)}
        if name != "float":
            result[name]["kl"] = total["kl"] / positions
            result[name]["top1"] = total["agree"] / positions
    for name in methods:
        result[name]["perplexity_change"] = result[name]["perplexity"] / result["float"]["perplexity"] - 1
    result["positions"] = positions
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=REPO, help="a finished default run's folder (default: this repo)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dataset", default="python-docs")
    parser.add_argument("--upstream", type=Path, help="stock checkpoint (default RUN/resources/models/MODEL)")
    parser.add_argument("--patched", type=Path, help="patched checkpoint (default RUN/results/MODEL/patched)")
    parser.add_argument("--calibration", type=Path, help="shard (default RUN/results/calibration/TOKENIZER/DATASET)")
    parser.add_argument("--evaluation", type=Path, help="windows (default RUN/results/evaluation-sets/...-validation)")
    parser.add_argument("--rtn", type=Path, help="rtn-int8 checkpoint (default the run's; made when absent)")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (the default run's for SmolLM2)")
    parser.add_argument("--holdout", type=int, default=16, help="windows after them, for the per-layer errors")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument(
        "--llmc-classes",
        default="MistralForCausalLM,LlamaForCausalLM",
        help="model classes llm-compressor loads the upstream folder as, one run each (see the docstring)",
    )
    parser.add_argument("--venv", type=Path, default=REPO / ".cache" / "venv-llmcompressor")
    parser.add_argument("--base-python", default=shutil.which("python3.11") or sys.executable)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench" / "gptq-vs-llmcompressor")
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--no-defaults", action="store_true", help="skip the informational run with our defaults")
    parser.add_argument(
        "--reuse", action="store_true", help="take quantizer outputs of an earlier run with these settings"
    )
    parser.add_argument("--results", type=Path, help="write every figure here as JSON")
    args = parser.parse_args()
    os.environ.update(OFFLINE)
    run, model_id = args.run.resolve(), args.model
    args.upstream = args.upstream or run / "resources" / "models" / model_id
    args.patched = args.patched or run / "results" / model_id / "patched"
    tokenizer = file_fingerprint(args.patched / TOKENIZER_FILE)
    args.calibration = args.calibration or run / "results" / "calibration" / tokenizer / f"{args.dataset}.safetensors"
    args.evaluation = args.evaluation or (
        run / "results" / "evaluation-sets" / tokenizer / f"{args.dataset}-validation.safetensors"
    )
    rtn = args.rtn or run / "results" / model_id / "quantized" / "rtn-int8"
    args.work.mkdir(parents=True, exist_ok=True)
    for path in (args.upstream, args.patched, args.calibration, args.evaluation):
        if not path.exists():
            sys.exit(f"{path} does not exist (finish a default run first, or pass --run / the paths)")

    # What each quantizer was run with and took, kept so that --reuse can skip a run already done.
    record_path = args.work / "runs.json"
    record = json.loads(record_path.read_text()) if args.reuse and record_path.exists() else {}
    common = {"nsamples": args.nsamples, "block_size": args.block_size, "damp": args.damp}
    common.update(calibration=str(args.calibration), upstream=str(args.upstream), patched=str(args.patched))

    def done(label, output, settings):
        return record.get(label, {}).get("settings") == settings and output.exists()

    sources, theirs = {}, []
    for model_class in args.llmc_classes.split(","):
        label = f"llmc ({model_class.removesuffix('ForCausalLM')})"
        theirs.append(label)
        sources[label] = args.work / f"llmcompressor-{model_class}.safetensors"
        settings = {**common, "model_class": model_class}
        if done(label, sources[label], settings):
            print(f"{label}: reusing {sources[label]}")
        else:
            python = llmcompressor_python(args.venv, args.base_python, args.work)
            print(f"{label}: oneshot GPTQ ({python}) ...", flush=True)
            report = run_llmcompressor(args, python, model_class, sources[label])
            record[label] = {"settings": settings, "report": report, "wall_s": report["load_s"] + report["oneshot_s"]}
            record_path.write_text(json.dumps(record, indent=1))
        report = record[label]["report"]
        if report["max_off_grid"] > 1e-3:  # its weights are q * scale: anything else is a misread
            sys.exit(f"{label}: weights {report['max_off_grid']:.3g} scale units off the integer grid")
        print(f"  load {report['load_s']:.1f} s + oneshot {report['oneshot_s']:.1f} s", flush=True)
    runs = {"ours (matched)": (False, 1.0)}
    if not args.no_defaults:
        runs["ours (defaults)"] = (True, 256.0)
    for label, (act_order, first_token_weight) in runs.items():
        sources[label] = args.work / ("gptq-matched" if first_token_weight == 1.0 else "gptq-defaults")
        settings = {**common, "holdout": args.holdout, "act_order": act_order, "first_token_weight": first_token_weight}
        if done(label, sources[label] / "MANIFEST.json", settings):
            print(f"{label}: reusing {sources[label]}")
        else:
            print(f"{label}: quantize_gptq, act_order {act_order}, first_token_weight {first_token_weight:g} ...")
            record[label] = {
                "settings": settings,
                "wall_s": run_ours(args, sources[label], act_order, first_token_weight),
            }
            record_path.write_text(json.dumps(record, indent=1))
        print(f"  {record[label]['wall_s']:.1f} s", flush=True)
    walls = {label: record[label]["wall_s"] for label in sources}
    if not (rtn / "MANIFEST.json").exists():
        rtn = args.work / "rtn-int8"
        print(f"rtn-int8 stage into {rtn} ...", flush=True)
        run_rtn(args, rtn)
    sources = {
        "rtn-int8": rtn,
        **{label: sources[label] for label in runs},
        **{label: sources[label] for label in theirs},
    }

    from safetensors.torch import load_file
    from transformers import MistralForCausalLM

    from workflow_scripts.data.token_datasets import token_dataset

    torch.set_grad_enabled(False)
    model = MistralForCausalLM.from_pretrained(args.upstream, dtype=torch.float32).eval()
    names = [
        f"model.layers.{i}.{part}.{p}.weight" for i in range(len(model.model.layers)) for part, p in module_names()
    ]
    float_weights = {name: model.get_parameter(name).detach().clone() for name in names}
    entries = {label: int8_weights(path) for label, path in sources.items()}
    methods = {label: dequantized(found, float_weights) for label, found in entries.items()}
    checks = {label: conventions(found, float_weights) for label, found in entries.items()}
    del entries

    calibration = torch.tensor(token_dataset(args.calibration, args.nsamples + args.holdout)["input_ids"])
    if calibration.shape[0] < args.nsamples + args.holdout:
        sys.exit(f"{args.calibration}: fewer than nsamples + holdout = {args.nsamples + args.holdout} windows")
    held = calibration[args.nsamples :]
    evaluation = load_file(str(args.evaluation))["input_ids"].long()
    print(f"per-layer errors on {held.shape[0]} x {held.shape[1]} held-out calibration tokens ...", flush=True)
    start = time.perf_counter()
    layers = layer_errors(model, held, float_weights, methods)
    print(f"  {time.perf_counter() - start:.0f} s; perplexity on {evaluation.shape[0]} x {evaluation.shape[1]} ...")
    start = time.perf_counter()
    end = end_to_end(model, evaluation, float_weights, methods, args.eval_batch)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)

    ours = "ours (matched)"
    mean = {label: {k: sum(v) / len(v) for k, v in figures.items()} for label, figures in layers.items()}
    ratios = {
        label: {
            "mean_layer_error": mean[ours]["output"] / mean[label]["output"],
            "perplexity": end[ours]["perplexity"] / end[label]["perplexity"],
            "wall": walls[ours] / walls[label],
        }
        for label in theirs
    }
    passed = all(value <= 1 + args.tolerance for r in ratios.values() for k, value in r.items() if k != "wall")

    print(f"\nper-layer relative output error (layer i alone quantized, {held.shape[0]} held-out windows)")
    print("layer " + "".join(f"{label:>17}" for label in methods) + "".join(f"{'ours/' + t:>19}" for t in theirs))
    for index in range(len(layers[ours]["output"])):
        row = "".join(f"{layers[label]['output'][index]:17.3e}" for label in methods)
        row += "".join(f"{layers[ours]['output'][index] / layers[t]['output'][index]:19.3f}" for t in theirs)
        print(f"{index:5d} {row}")
    print(
        f"\n{'method':17} {'mean layer err':>14} {'(of contrib.)':>13} {'perplexity':>11} {'vs float':>9}"
        f" {'KL nats':>9} {'top-1':>7} {'wall s':>7}  q range, scale"
    )
    print(f"{'float':17} {'':>14} {'':>13} {end['float']['perplexity']:11.4f}")
    for label in methods:
        wall = f"{walls[label]:7.1f}" if label in walls else f"{'':>7}"
        print(
            f"{label:17} {mean[label]['output']:14.4e} {mean[label]['contribution']:13.4e} "
            f"{end[label]['perplexity']:11.4f} {100 * end[label]['perplexity_change']:+8.3f}% "
            f"{end[label]['kl']:9.2e} {end[label]['top1']:7.4f} {wall}  {checks[label]['q_range']}, "
            f"{', '.join(checks[label]['scale'])}"
        )
    print(f"\nwall s: {ours} {walls[ours]:.1f} (the stage process); llm-compressor: model load + oneshot")
    for label, r in ratios.items():
        verdict = (
            "ok" if r["mean_layer_error"] <= 1 + args.tolerance and r["perplexity"] <= 1 + args.tolerance else "WORSE"
        )
        print(
            f"ours (matched) / {label}: mean layer error {r['mean_layer_error']:.4f}, perplexity {r['perplexity']:.5f}"
            f" (each at most {1 + args.tolerance:g}: {verdict}), wall time {r['wall']:.2f}"
        )
    print("PASS" if passed else "FAIL")
    if args.results:
        figures = {
            "settings": {
                "model": model_id,
                "upstream": str(args.upstream),
                "patched": str(args.patched),
                "calibration": str(args.calibration),
                "evaluation": str(args.evaluation),
                "nsamples": args.nsamples,
                "holdout": args.holdout,
                "block_size": args.block_size,
                "damp": args.damp,
                "tolerance": args.tolerance,
            },
            "llm_compressor": {label: record[label]["report"] for label in theirs},
            "wall_s": walls,
            "ratios_ours_matched_over": ratios,
            "layer_errors": layers,
            "mean_layer_errors": mean,
            "end_to_end": end,
            "conventions": checks,
            "passed": passed,
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }
        args.results.write_text(json.dumps(figures, indent=1))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
