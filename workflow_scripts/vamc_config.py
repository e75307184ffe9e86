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

Usage: python -m workflow_scripts.vamc_config --model ID --patched DIR --dtype fp16|int8 --settings JSON
           --dataset-dir DIR --calibration JSON --workspace DIR --output YAML
"""
import argparse
import json
from pathlib import Path

import yaml

from .checkpoint import read_mistral_config
from .common import InputError, atomic_write_text, run_cli
from .mistral_layout import tensor_shapes

DTYPES = ("fp16", "int8")
# the calibration datasets vamc reads, by name; a configured dataset passes its format (python-docs: c4)
VAMC_DATASETS = ("c4", "alpaca", "ceval")
SEQUENCE_MULTIPLE = 16
LARGE_MODEL_PARAMETERS = 32e9  # from this size the zoo's notes ask for VACC_STACK_SIZE=256
LARGE_MODEL_STACK_SIZE = "256"

# Every key vamc's build configs are documented or seen to take; None marks a leaf.
VAMC_KEYS = {
    "name": None,
    "frontend": {
        "checkpoint": None, "type": None, "shape": {"input_ids": None},
        "model_kwargs": {"tp": None, "b2s": None, "model_arch": None, "align_qkv": None},
        "quantize": {"type": None},
    },
    "backend": {
        "type": None, "dtype": None, "merge_params": None, "remove_params": None,
        "compile": {"data_type": None, "gather_data_vccl_dsp_enable": None, "attention_split_num": None,
                    "ffn_split_num": None},
    },
    "workspace": {"path": None, "workers": None, "pyenv": None},
    "dataset": {"type": None, "name": None, "path": None, "nsamples": None, "seqlen": None},
}


def check_overrides(where, overrides, known=VAMC_KEYS):
    """Refuse any override key vamc does not document, naming its config path."""
    for key, value in overrides.items():
        if key not in known:
            raise InputError(f"config: {where}.{key} is not a vamc build-config key "
                             f"(known here: {', '.join(sorted(known))})")
        if known[key] is not None:
            if not isinstance(value, dict):
                raise InputError(f"config: {where}.{key} must be a mapping of {', '.join(sorted(known[key]))}")
            check_overrides(f"{where}.{key}", value, known[key])


def check_lengths(where, settings, max_positions=None):
    """Sequence lengths: multiples of 16, prompt within context, context within the model's positions."""
    for key in ("seq_in", "seq_total"):
        if settings[key] % SEQUENCE_MULTIPLE:
            raise InputError(f"config: {where}.{key} = {settings[key]} is not a multiple of {SEQUENCE_MULTIPLE}")
    if settings["seq_in"] > settings["seq_total"]:
        raise InputError(f"config: {where}.seq_in = {settings['seq_in']} exceeds seq_total = {settings['seq_total']}")
    if max_positions is not None and settings["seq_total"] > max_positions:
        raise InputError(f"config: {where}.seq_total = {settings['seq_total']} exceeds the model's "
                         f"max_position_embeddings = {max_positions}")


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


def parameter_count(config):
    count = 0
    for shape in tensor_shapes(config).values():
        size = 1
        for extent in shape:
            size *= extent
        count += size
    return count


def build_environment(config):
    """Environment variables ``vamc compile`` needs for this model."""
    return {"VACC_STACK_SIZE": LARGE_MODEL_STACK_SIZE} if parameter_count(config) >= LARGE_MODEL_PARAMETERS else {}


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
        "backend": {"type": "tvm_vacc", "dtype": dtype, "merge_params": True,
                    "compile": {"data_type": 0, "gather_data_vccl_dsp_enable": True}},
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
    parser.add_argument("--calibration", type=json.loads,
                        help="int8: {name, nsamples, seqlen}; name is the dataset's format, which vamc reads")
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args(argv)
    config = read_mistral_config(args.patched, args.model)
    calibration = None
    if args.dtype == "int8":
        if args.calibration["name"] not in VAMC_DATASETS:
            raise InputError(f"model {args.model}: vamc reads the calibration datasets {', '.join(VAMC_DATASETS)}, "
                             f"not {args.calibration['name']!r}")
        calibration = {"name": args.calibration["name"], "path": str(args.dataset_dir.resolve()),
                       "nsamples": args.calibration["nsamples"], "seqlen": args.calibration["seqlen"]}
    document = render(args.model, config, args.settings, args.dtype, args.patched, args.workspace, calibration)
    atomic_write_text(args.output, yaml.safe_dump(document, sort_keys=False))


if __name__ == "__main__":
    run_cli(main)
