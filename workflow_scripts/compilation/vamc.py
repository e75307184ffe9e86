"""vamc build configs: the keys vamc takes, the checks on lengths and overrides, and the environment it needs.

The vamc_config stage renders a config from these; the vacc_compile stage runs ``vamc compile`` on it.
"""

from workflow_scripts.checkpoint.layout import parameter_count
from workflow_scripts.core.errors import InputError

SEQUENCE_MULTIPLE = 16
LARGE_MODEL_PARAMETERS = 32e9  # from this size the zoo's notes ask for VACC_STACK_SIZE=256
LARGE_MODEL_STACK_SIZE = "256"

# Every key vamc's build configs are documented or seen to take; None marks a leaf.
VAMC_KEYS = {
    "name": None,
    "frontend": {
        "checkpoint": None,
        "type": None,
        "shape": {"input_ids": None},
        "model_kwargs": {"tp": None, "b2s": None, "model_arch": None, "align_qkv": None},
        "quantize": {"type": None},
    },
    "backend": {
        "type": None,
        "dtype": None,
        "merge_params": None,
        "remove_params": None,
        "compile": {
            "data_type": None,
            "gather_data_vccl_dsp_enable": None,
            "attention_split_num": None,
            "ffn_split_num": None,
        },
    },
    "workspace": {"path": None, "workers": None, "pyenv": None},
    "dataset": {"type": None, "name": None, "path": None, "nsamples": None, "seqlen": None},
}


def check_overrides(where, overrides, known=VAMC_KEYS):
    """Refuse any override key vamc does not document, naming its config path."""
    for key, value in overrides.items():
        if key not in known:
            raise InputError(
                f"config: {where}.{key} is not a vamc build-config key (known here: {', '.join(sorted(known))})"
            )
        if known[key] is not None:
            if not isinstance(value, dict):
                raise InputError(f"config: {where}.{key} must be a mapping of {', '.join(sorted(known[key]))}")
            check_overrides(f"{where}.{key}", value, known[key])


def check_lengths(where, seq_in, seq_total, max_positions=None):
    """Sequence lengths: multiples of 16, prompt within context, context within the model's positions."""
    for key, value in (("seq_in", seq_in), ("seq_total", seq_total)):
        if value % SEQUENCE_MULTIPLE:
            raise InputError(f"config: {where}.{key} = {value} is not a multiple of {SEQUENCE_MULTIPLE}")
    if seq_in > seq_total:
        raise InputError(f"config: {where}.seq_in = {seq_in} exceeds seq_total = {seq_total}")
    if max_positions is not None and seq_total > max_positions:
        raise InputError(
            f"config: {where}.seq_total = {seq_total} exceeds the model's max_position_embeddings = {max_positions}"
        )


def build_environment(config):
    """Environment variables ``vamc compile`` needs for this model."""
    return {"VACC_STACK_SIZE": LARGE_MODEL_STACK_SIZE} if parameter_count(config) >= LARGE_MODEL_PARAMETERS else {}
