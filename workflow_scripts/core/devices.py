"""Where and in what precision a stage that runs the model computes.

Every heavy stage has a ``device`` setting: ``auto`` takes CUDA when torch
sees a GPU, ``cpu`` and ``cuda`` force one (the rule then asks the scheduler
for a GPU). A ``dtype`` of ``auto`` is float32 on the CPU, where half
precision matrix products are slow and float32 is the exact reference, and
the checkpoint's own half precision on a GPU, where float32 runs at a tenth of
the speed.

On the CPU, :func:`float32_compute` gives float32 results from a model held in
its checkpoint's bfloat16: a 7B model then needs 15 GB instead of 29.
"""

from pathlib import Path

import torch

from workflow_scripts.core.errors import InputError

# cgroup v2, then v1: (limit, usage)
CGROUP_MEMORY_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def resolve_device(setting, key):
    """``cpu`` or ``cuda`` for a ``device`` setting; ``key`` names it in the error when CUDA is missing."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise InputError(f"{key} is cuda, but torch sees no CUDA device here")
    return setting


def resolve_dtype(setting, device, checkpoint_dtype=torch.bfloat16):
    """The torch dtype of a ``dtype`` setting (``auto``: float32 on the CPU, the checkpoint's on a GPU)."""
    if setting == "auto":
        return torch.float32 if device == "cpu" else checkpoint_dtype
    return getattr(torch, setting)


def load_computing_in(load, dtype, device):
    """``load(dtype, device)``'s model, computing in ``dtype`` on ``device``. Float32 on the CPU is loaded in the
    checkpoint's own dtype and widened as it runs (:func:`float32_compute`)."""
    if device == "cpu" and dtype == torch.float32:
        return float32_compute(load("auto", device))
    return load(dtype, device)


def float32_compute(model):
    """Make a model held in bfloat16 compute in float32, exactly as its float32 copy would.

    The small floating parameters (norms, biases, int8 scales) become float32 for good;
    int8 weights stay int8. Each linear weight is widened to a float32 copy just
    before its module runs, and the stored one is put back after: widening a
    bfloat16 value is exact, so every product sees the float32 weights of a
    float32 load, while only one matrix at a time exists in float32. An
    embedding looks its rows up in bfloat16 and widens them, which is the same.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(widen_weight)
            module.register_forward_hook(narrow_weight)
        elif isinstance(module, torch.nn.Embedding):
            module.register_forward_hook(widen_output)
        for name, parameter in module.named_parameters(recurse=False):
            held_as_stored = name == "weight" and isinstance(module, torch.nn.Linear | torch.nn.Embedding)
            if parameter.is_floating_point() and not held_as_stored:
                parameter.data = parameter.data.float()
    return model


def widen_weight(module, _inputs):
    module.stored_weight = module.weight.data
    module.weight.data = module.stored_weight.float()


def narrow_weight(module, _inputs, _output):
    module.weight.data = module.stored_weight
    del module.stored_weight


def widen_output(_module, _inputs, output):
    return output.float()


def available_memory_bytes():
    """What this process can still allocate: the machine's available memory, or less where a cgroup (a SLURM job,
    a container) sets a lower limit."""
    with open("/proc/meminfo") as handle:
        available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    for limit_file, usage_file in CGROUP_MEMORY_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():
            available = min(available, int(limit) - usage)
    return available


def require_memory(needed, what, advice):
    """Refuse a job before it starts when it would need more memory than is available: say the figures and what
    to do, instead of being killed halfway."""
    available = available_memory_bytes()
    if needed > available:
        raise InputError(
            f"{what} needs about {needed / 1e9:.1f} GB of memory, and {available / 1e9:.1f} GB is available here; "
            f"{advice}"
        )
