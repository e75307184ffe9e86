"""vamc build configs (stage 5, ``results/{model}/vamc/{fp16,int8}.yaml``).

Renders the YAML that ``vamc compile`` takes for one model and dtype, with the
keys of the vendor's build configs (``../shared/docs/vacc-reference.md``):
``name`` as ``<Model>-<dtype>-tp<N>-<seq_in>-<seq_total>``, the patched
checkpoint as the frontend, the static input shapes, the tensor-parallel
settings, the int8 build's ``w8a16_gptq`` quantization with its calibration
dataset, the ``tvm_vacc`` backend and the workspace the artifacts go to.
int8 differs from fp16 only in ``name``, ``frontend.quantize``, ``dataset`` and
``backend.dtype``. Per-model ``overrides`` are merged last; only keys that vamc
documents are accepted, so a typo fails here and not after a long compile.
"""

from dataclasses import dataclass
from pathlib import Path

import yaml

from workflow_scripts.checkpoint.folder import read_mistral_config
from workflow_scripts.compilation.vamc import check_lengths, check_overrides
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_text
from workflow_scripts.core.settings import Settings

# the calibration datasets vamc reads, by name; a configured dataset passes its format (python-docs: c4)
VAMC_DATASETS = ("c4", "alpaca", "ceval")


@dataclass(frozen=True)
class VamcSettings(Settings):
    """``models.<id>.vamc`` with ``name`` filled in by the rule (``dataset`` is the rule's: it picks the
    calibration files)."""

    name: str
    tp: int
    b2s: bool
    seq_in: int
    seq_total: int
    workers: int
    dataset: str
    overrides: dict


@dataclass(frozen=True)
class VamcCalibration(Settings):
    """The int8 build's calibration: ``name`` is the dataset's format, which vamc reads."""

    name: str
    nsamples: int
    seqlen: int


def model_kwargs(where, settings, config):
    """``tp``, ``b2s``, ``model_arch`` and, where the kv heads do not split evenly, ``align_qkv``."""
    tp, heads, kv_heads = settings.tp, config["num_attention_heads"], config["num_key_value_heads"]
    if heads % tp:
        raise InputError(f"config: {where}.tp = {tp} does not divide the model's {heads} attention heads")
    kwargs = {"tp": tp, "b2s": settings.b2s, "model_arch": "vacc"}
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
    check_lengths(where, settings.seq_in, settings.seq_total, config.get("max_position_embeddings"))
    check_overrides(f"{where}.overrides", settings.overrides)
    document = {
        "name": f"{settings.name}-{dtype}-tp{settings.tp}-{settings.seq_in}-{settings.seq_total}",
        "frontend": {
            "checkpoint": str(Path(checkpoint).resolve()),
            "type": "huggingface",
            "shape": {"input_ids": [[settings.seq_in], [settings.seq_total]]},
            "model_kwargs": model_kwargs(where, settings, config),
        },
        "backend": {
            "type": "tvm_vacc",
            "dtype": dtype,
            "merge_params": True,
            "compile": {"data_type": 0, "gather_data_vccl_dsp_enable": True},
        },
        "workspace": {"path": str(Path(workspace).resolve()), "workers": settings.workers},
    }
    if dtype == "int8":
        document["frontend"]["quantize"] = {"type": "w8a16_gptq"}
        document["dataset"] = {"type": "huggingface", **calibration}
    return merged(document, settings.overrides)


def write_build_config(model, patched, dtype, settings, workspace, output, dataset_dir=None, calibration=None):
    """The YAML that ``vamc compile`` takes; int8 reads its calibration dataset from ``dataset_dir``."""
    config = read_mistral_config(patched, model)
    block = None
    if dtype == "int8":
        if calibration is None or dataset_dir is None:
            raise InputError(f"model {model}: the int8 build config needs --dataset and --calibration")
        if calibration.name not in VAMC_DATASETS:
            raise InputError(
                f"model {model}: vamc reads the calibration datasets {', '.join(VAMC_DATASETS)}, "
                f"not {calibration.name!r}"
            )
        block = {
            "name": calibration.name,
            "path": str(Path(dataset_dir).resolve()),
            "nsamples": calibration.nsamples,
            "seqlen": calibration.seqlen,
        }
    document = render(model, config, settings, dtype, patched, workspace, block)
    atomic_write_text(output, yaml.safe_dump(document, sort_keys=False))
