"""Where and in what precision a stage that runs the model computes.

Every heavy stage has a ``device`` setting: ``auto`` takes CUDA when torch
sees a GPU, ``cpu`` and ``cuda`` force one (the rule then asks the scheduler
for a GPU). A ``dtype`` of ``auto`` is float32 on the CPU, where half
precision matrix products are slow and float32 is the exact reference, and
the checkpoint's own half precision on a GPU, where float32 runs at a tenth of
the speed.

On the CPU, :func:`float32_compute` gives float32 results from a model held in
its checkpoint's bfloat16: a 7B model then needs 15 GB instead of 29. It is
used where a float32 copy would take more than half the available memory
(:func:`load_computing_in`), since widening every matrix on every pass is
slower than a float32 model's products.
"""

from pathlib import Path

import torch

from workflow_scripts.core.errors import InputError

CGROUP_SELF = "/proc/self/cgroup"
CGROUP_ROOT = Path("/sys/fs/cgroup")


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


def load_computing_in(load, dtype, device, checkpoint_bytes):
    """``load(dtype, device)``'s model, computing in ``dtype`` on ``device``. Float32 on the CPU is loaded in float32
    when that copy (twice the ``checkpoint_bytes`` of bf16) takes at most half the available memory;
    otherwise in the checkpoint's own dtype, widened as it runs (:func:`float32_compute`): the same bits, in half
    the memory, at the cost of widening every matrix on every pass."""
    if device == "cpu" and dtype == torch.float32 and 2 * checkpoint_bytes > available_memory_bytes() / 2:
        return float32_compute(load("auto", device))
    return load(dtype, device)


def stored_bytes(folder):
    """Bytes of a checkpoint's weight files."""
    return sum(path.stat().st_size for path in Path(folder).glob("*.safetensors"))


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
            module.register_forward_hook(narrow_weight, always_call=True)
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
    """What this process can still allocate: the machine's available memory, or less where its cgroup or one above
    it (a SLURM job's, a container's) sets a lower limit. Reclaimable page cache counts as available, as in
    ``MemAvailable``."""
    with open("/proc/meminfo") as handle:
        available = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemAvailable:"))
    for folder, limit_name, usage_name, cache_name in cgroup_memory_folders():
        try:
            limit = (folder / limit_name).read_text().strip()
            usage = int((folder / usage_name).read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            available = min(available, int(limit) - usage + int(stat.get(cache_name, 0)))
    return available


def cgroup_memory_folders():
    """``(folder, limit file, usage file, reclaimable cache key)`` of this process's memory cgroups, innermost
    first, with their ancestors (cgroup v2's unified tree, then v1's memory controller)."""
    folders = []
    try:
        lines = Path(CGROUP_SELF).read_text().splitlines()
    except OSError:
        return folders
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            version = (CGROUP_ROOT, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            version = (CGROUP_ROOT / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        root, *names = version
        folder = root / path.lstrip("/")
        while True:
            folders.append((folder, *names))
            if folder == root:
                break
            folder = folder.parent
    return folders


def require_memory(needed, what, advice):
    """Refuse a job before it starts when it would need more memory than is available: say the figures and what
    to do, instead of being killed halfway."""
    available = available_memory_bytes()
    if needed > available:
        raise InputError(
            f"{what} needs about {needed / 1e9:.1f} GB of memory, and {available / 1e9:.1f} GB is available here; "
            f"{advice}"
        )
