"""What jobs need, computed without importing torch, so that the Snakefile can size its rules quickly."""

GPTQ_BATCH = 8  # samples per forward pass in GPTQ
RUNTIME_BYTES = 500 * 10 ** 6  # the interpreter, torch and a stage's own code
CUDA_RUNTIME_BYTES = 2000 * 10 ** 6  # the same with the CUDA libraries loaded


def gptq_memory_bytes(config, samples, seqlen, device):
    """``{"host": bytes, "gpu": bytes}`` at GPTQ's peak: the README's formula.

    ``config`` is the model's config.json, ``samples`` the calibration plus
    held-out samples. The peak is either a batch's attention during a forward
    pass or the factorisation of the largest Hessian plus the rounding of the
    stacked gate/up projections, on top of the activations, the layer and its
    four Hessians.
    """
    on_cpu = device == "cpu"
    value, hessian = (4, 8) if on_cpu else (2, 4)  # bytes per activation or weight, per Hessian entry
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    parameters = 4 * hidden * hidden + 3 * hidden * inter
    activations = 2 * samples * seqlen * hidden * value
    attention = 3 * GPTQ_BATCH * config["num_attention_heads"] * seqlen ** 2 * 4
    rounding = 4 * inter ** 2 * hessian + 3 * 4 * 2 * inter * hidden
    compute = (activations + parameters * value + (3 * hidden ** 2 + inter ** 2) * hessian
               + max(attention, rounding))
    if on_cpu:
        return {"host": RUNTIME_BYTES + compute, "gpu": 0}
    return {"host": CUDA_RUNTIME_BYTES + samples * seqlen * hidden * value + parameters, "gpu": compute}
