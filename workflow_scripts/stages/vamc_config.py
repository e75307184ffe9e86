"""Stage 5, vamc build configs: ``results/{model}/vamc/{fp16,int8}.yaml``.

Renders the YAML that ``vamc compile`` takes for one model and dtype, with the
keys of the vendor's build configs (``../shared/docs/vacc-reference.md``):
``name`` as ``<Model>-<dtype>-tp<N>-<seq_in>-<seq_total>``, the patched
checkpoint as the frontend, the static input shapes, the tensor-parallel
settings, the int8 build's ``w8a16_gptq`` quantization with its calibration
dataset, the ``tvm_vacc`` backend and the workspace the artifacts go to.
int8 differs from fp16 only in ``name``, ``frontend.quantize``, ``dataset`` and
``backend.dtype``. Per-model ``overrides`` are merged last; only keys that vamc
documents are accepted, so a typo fails here and not after a long compile.

Usage: python -m workflow_scripts.stages.vamc_config --model ID --patched DIR --dtype fp16|int8 --settings JSON
           --dataset-dir DIR --calibration JSON --workspace DIR --output YAML
"""

import argparse
import json
from pathlib import Path

import yaml

from workflow_scripts.checkpoint.folder import read_mistral_config
from workflow_scripts.compilation.vamc import check_lengths, check_overrides
from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_text

DTYPES = ("fp16", "int8")
# the calibration datasets vamc reads, by name; a configured dataset passes its format (python-docs: c4)
VAMC_DATASETS = ("c4", "alpaca", "ceval")


def model_kwargs(where, settings, config):
    """``tp``, ``b2s``, ``model_arch`` and, where the kv heads do not split evenly, ``align_qkv``."""
    tp, heads, kv_heads = settings["tp"], config["num_attention_heads"], config["num_key_value_heads"]
    if heads % tp:
        raise InputError(f"config: {where}.tp = {tp} does not divide the model's {heads} attention heads")
    kwargs = {"tp": tp, "b2s": settings["b2s"], "model_arch": "vacc"}
    if kv_heads % tp:
        kwargs["align_qkv"] = True
    return kwargs


def merged(base, overrides):
    result = dict(base)
    for key, value in overrides.items():
        result[key] = merged(result.get(key, {}), value) if isinstance(value, dict) else value
    return result


def render(model, config, settings, dtype, checkpoint, workspace, calibration=None):
    """The build config of ``model`` for ``dtype`` as a dict; ``calibration`` (int8 only) is the dataset block."""
    where = f"models.{model}.vamc"
    check_lengths(where, settings, config.get("max_position_embeddings"))
    check_overrides(f"{where}.overrides", settings["overrides"])
    document = {
        "name": f"{settings['name']}-{dtype}-tp{settings['tp']}-{settings['seq_in']}-{settings['seq_total']}",
        "frontend": {
            "checkpoint": str(Path(checkpoint).resolve()),
            "type": "huggingface",
            "shape": {"input_ids": [[settings["seq_in"]], [settings["seq_total"]]]},
            "model_kwargs": model_kwargs(where, settings, config),
        },
        "backend": {
            "type": "tvm_vacc",
            "dtype": dtype,
            "merge_params": True,
            "compile": {"data_type": 0, "gather_data_vccl_dsp_enable": True},
        },
        "workspace": {"path": str(Path(workspace).resolve()), "workers": settings["workers"]},
    }
    if dtype == "int8":
        document["frontend"]["quantize"] = {"type": "w8a16_gptq"}
        document["dataset"] = {"type": "huggingface", **calibration}
    return merged(document, settings["overrides"])


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--patched", required=True, type=Path)
    parser.add_argument("--dtype", required=True, choices=DTYPES)
    parser.add_argument("--settings", required=True, type=json.loads, help="the model's vamc section, name filled")
    parser.add_argument("--dataset-dir", type=Path, help="int8: the calibration dataset's raw files")
    parser.add_argument(
        "--calibration",
        type=json.loads,
        help="int8: {name, nsamples, seqlen}; name is the dataset's format, which vamc reads",
    )
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    config = read_mistral_config(args.patched, args.model)
    calibration = None
    if args.dtype == "int8":
        if args.calibration["name"] not in VAMC_DATASETS:
            raise InputError(
                f"model {args.model}: vamc reads the calibration datasets {', '.join(VAMC_DATASETS)}, "
                f"not {args.calibration['name']!r}"
            )
        calibration = {
            "name": args.calibration["name"],
            "path": str(args.dataset_dir.resolve()),
            "nsamples": args.calibration["nsamples"],
            "seqlen": args.calibration["seqlen"],
        }
    document = render(args.model, config, args.settings, args.dtype, args.patched, args.workspace, calibration)
    atomic_write_text(args.output, yaml.safe_dump(document, sort_keys=False))


if __name__ == "__main__":
    run_cli(main)
