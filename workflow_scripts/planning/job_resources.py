"""What each job asks a scheduler for, computed without importing torch, so that the Snakefile stays fast.

Every figure follows from the model's shape (its ``config.json``: bytes of
weights, parameters, layer sizes), the calibration and evaluation sizes, and the
attempt: a retried job asks for ``RETRY_GROWTH`` times more memory and time
than the attempt before, so a job killed for memory or time comes back bigger.
Before the download exists, the shape comes from the config (a demo preset or
a model's ``shape``), else an 8B-class guess; Snakemake evaluates resources
again when a job is ready, so jobs after the download are sized from the real
``config.json``. Every formula with a measured peak (docs/figures.md) is held to
it by tests/test_job_resources.py: at least the peak, at most twice it plus 2 GB.
"""

import math
from dataclasses import dataclass

from workflow_scripts.checkpoint import gguf as gguf_source
from workflow_scripts.checkpoint.demo_presets import demo_config
from workflow_scripts.checkpoint.layout import head_dim, parameter_count, tensor_shapes
from workflow_scripts.evaluation import REFERENCE_LOGITS_BYTES
from workflow_scripts.quantization import GPTQ_BATCH

RUNTIME_BYTES = 500 * 10**6  # the interpreter, torch and a stage's own code
CUDA_RUNTIME_BYTES = 2000 * 10**6  # the same with the CUDA libraries loaded
RETRY_GROWTH = 1.5
GPU_THREADS = 2  # a stage on a GPU: the host only loads files and feeds the device
GB = 10**9
# Throughputs, kept at about half of what was measured (docs/figures.md), so
# that a slow node still finishes inside the request.
NETWORK_BYTES_PER_S = 20 * 10**6  # a hub download
DISK_BYTES_PER_S = 200 * 10**6  # hashing, copying, streaming safetensors
CPU_FLOPS_PER_THREAD = 25 * 10**9  # measured: 50 GFLOP/s per core in GPTQ's mid-shape bench
GPU_FLOPS = 50 * 10**12  # measured: about 220 TFLOP/s effective in GPTQ on an H100
TOKENS_PER_S = 20_000  # tokenizing calibration text, per job
WIDEN_PARAMETERS_PER_S_PER_THREAD = 60 * 10**6  # measured: 0.24 G/s on 2 threads, widening bf16 to float32 and decoding
DEQUANTIZE_PARAMETERS_PER_S = 30 * 10**6  # measured: about 70 M/s for SmolLM2's Q4_1 (gguf's numpy code)
CEVAL_TOKENS_PER_SHOT = 200  # a question with its four choices
CEVAL_VAL_QUESTIONS = 1346  # ceval-exam's val split, all 52 subjects
# Sizes a hub model whose config sets no `shape`: the larger figure of the two real models for each key.
DEFAULT_SHAPE = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
}


@dataclass(frozen=True)
class ModelSize:
    """The figures of a model that its jobs' needs scale with."""

    config: dict

    @property
    def parameters(self):
        return parameter_count(self.config)

    @property
    def weight_bytes(self):
        """Bytes of the bf16 checkpoint."""
        return 2 * self.parameters

    @property
    def largest_tensor_elements(self):
        """Elements of the largest weight matrix (the embedding or the output head)."""
        return max(math.prod(shape) for shape in tensor_shapes(self.config).values())

    @property
    def largest_tensor_bytes(self):
        """Bytes of the largest weight matrix in float32."""
        return 4 * self.largest_tensor_elements

    @property
    def projection_parameters(self):
        """Parameters of the layers' projections: what an int8 scheme rounds (the embeddings and norms stay)."""
        return sum(math.prod(shape) for name, shape in tensor_shapes(self.config).items() if "_proj." in name)

    @property
    def layers(self):
        return self.config["num_hidden_layers"]

    @property
    def layer_parameters(self):
        return parameter_count(self.config, prefix=f"model.layers.{self.layers - 1}.")

    @property
    def compute_threads(self):
        """Threads for stages that run the model: 2, plus 1 per 2 GB of weights, at most 16."""
        return min(16, max(2, math.ceil(self.weight_bytes / (2 * GB))))


def planned_size(model_settings, python=None):
    """The size of a model before its download exists: demo preset, a GGUF file's header, the config's
    ``shape``, else 8B-class. ``python``: the interpreter of the jobs' environment, where a GGUF file's
    package is found (gguf.package_folders)."""
    source = model_settings["source"]
    if "demo" in source:
        return ModelSize(demo_config(source["demo"], source.get("shape")))
    planned = gguf_source.planned(source, python) if "gguf" in source else None
    if planned is not None:
        return ModelSize(planned[1])
    return ModelSize({**DEFAULT_SHAPE, **model_settings.get("shape", {})})


def request(memory_bytes, seconds, attempt, threads=1):
    """``{"threads", "mem_mb", "runtime"}`` (runtime in minutes), grown for a retry."""
    growth = RETRY_GROWTH ** (attempt - 1)
    return {
        "threads": threads,
        "mem_mb": math.ceil(growth * memory_bytes / 10**6),
        "runtime": math.ceil(growth * (10 + seconds / 60)),
    }


def forward_seconds(size, tokens, threads, passes=1):
    """Seconds for ``passes`` forward passes of the whole model over ``tokens`` on the CPU."""
    return passes * 2 * size.parameters * tokens / (CPU_FLOPS_PER_THREAD * threads)


def download_figures(source, python=None):
    """The figures of :func:`download` for a model's source (``python`` as for :func:`planned_size`)."""
    figures = {"generated": "demo" in source}
    if "gguf" in source:
        planned = gguf_source.planned(source, python)
        # an unreadable file fails the import at once; its size is a guess from the model's bf16 weights
        figures["gguf_bytes"] = planned[0] if planned else 0
    return figures


def download(size, attempt, generated, gguf_bytes=None):
    """Streamed from the hub to disk. A demo model is generated and written one tensor at a time: the largest
    is drawn in float32 and scaled into a second float32 copy before it becomes bf16 (1.44 GB at peak for a
    7B shape, 4.60 GB for Ministral-8B's 131072-row embedding, measured: docs/figures.md, "Real size"). A GGUF
    import reads the file, dequantizes one tensor at a time (float32, the gguf package's temporaries, the bf16
    copy: 16 bytes per element of the largest tensor) and writes the bf16 shards, then hashes them."""
    if gguf_bytes is not None:
        seconds = (
            gguf_bytes + 2 * size.weight_bytes
        ) / DISK_BYTES_PER_S + size.parameters / DEQUANTIZE_PARAMETERS_PER_S
        return request(GB + 16 * size.largest_tensor_elements, seconds, attempt)
    if generated:
        return request(GB + 2 * size.largest_tensor_bytes, size.weight_bytes / DISK_BYTES_PER_S, attempt)
    return request(GB, size.weight_bytes / NETWORK_BYTES_PER_S, attempt)


def fetch_dataset(attempt):
    """A calibration dataset's files (c4's validation shard is the largest, about 40 MB)."""
    return request(GB, 1800, attempt)


def patch(size, attempt):
    return request(GB, size.weight_bytes / DISK_BYTES_PER_S, attempt)


def verify(size, attempt, tokens, passes, device):
    """Upstream and patched, one at a time, computing in float32 over the verify prompts (``passes`` forward
    passes in all: each prompt, then each greedy step). On a GPU each is loaded in float32 straight onto it, and the
    host holds the mapped checkpoint (6.2 GB for 4.0 GB of weights, measured). On the CPU each is held in its bf16
    (2.3 GB for 1.4 GB) and every pass widens every matrix, which costs more than the decode steps' products."""
    if device == "cuda":
        return request(
            CUDA_RUNTIME_BYTES + 1.1 * size.weight_bytes, 4 * size.weight_bytes / DISK_BYTES_PER_S, attempt, GPU_THREADS
        )
    threads = size.compute_threads
    widening = passes * size.parameters / (WIDEN_PARAMETERS_PER_S_PER_THREAD * threads)
    seconds = 2 * size.weight_bytes / DISK_BYTES_PER_S + forward_seconds(size, tokens, threads, passes=2) + widening
    return request(2 * GB + 1.1 * size.weight_bytes + 2 * size.largest_tensor_bytes, seconds, attempt, threads)


def quantize(size, attempt):
    """Streamed in chunks of 16 MB, each chunk's mapped pages dropped once written: a few chunks whatever the
    model's size (0.36 GB at peak for one 7B layer, 0.48-0.75 GB for 8 and 32, measured); twice the most."""
    return request(1.5 * GB, 3 * size.weight_bytes / DISK_BYTES_PER_S, attempt, threads=2)


def export_compressed_tensors(size, attempt):
    """Streamed: a chunk of rows packed at a time; reads and writes the int8 weights once."""
    return request(1 * GB, 2 * size.weight_bytes / DISK_BYTES_PER_S, attempt)


def quantize_gptq(size, attempt, samples, seqlen, device):
    """Host memory at GPTQ's peak plus 15%; time from the layer's FLOPs on the CPU or GPU."""
    peak = gptq_memory_bytes(size.config, samples, seqlen, device)["host"]
    hidden, inter = size.config["hidden_size"], size.config["intermediate_size"]
    attention_out = size.config["num_attention_heads"] * head_dim(size.config)
    # float and quantized forward passes, the Hessian products and the rounding, per layer
    layer_flops = 2 * samples * seqlen * (3 * size.layer_parameters + 2 * hidden**2 + attention_out**2 + inter**2)
    threads = size.compute_threads
    rate = GPU_FLOPS if device == "cuda" else CPU_FLOPS_PER_THREAD * threads
    seconds = size.layers * layer_flops / rate + 2 * size.weight_bytes / DISK_BYTES_PER_S
    return request(1.15 * peak, seconds, attempt, threads)


def vacc_compile(size, attempt, workers):
    """vamc loads the whole checkpoint, and the int8 build calibrates it; 10 minutes per GB of weights."""
    return request(8 * GB + 3 * size.weight_bytes, 600 * size.weight_bytes / GB, attempt, threads=workers)


def aoti_compile(size, attempt, tokens, device, quantized=False):
    """The model (float32 on the CPU, its projections int8 in a ``quantized`` variant; bf16 on a GPU), the weights
    file and the compiler; the check runs eager and compiled. One layer's graph is compiled whatever the depth
    (20 s for SmolLM2's on 2 cores): the time is the weights' reading and writing, and the check."""
    if device == "cuda":
        seconds = 120 + 4 * size.weight_bytes / DISK_BYTES_PER_S
        return request(CUDA_RUNTIME_BYTES + 1.5 * size.weight_bytes, seconds, attempt, GPU_THREADS)
    threads = size.compute_threads
    seconds = 120 + 4 * size.weight_bytes / DISK_BYTES_PER_S + forward_seconds(size, tokens, threads, passes=2)
    held = 4 * size.parameters - (3 * size.projection_parameters if quantized else 0)
    # twice the model it compiles, measured (17.1 GB for an int8 7B's 8.0 GB), and a tenth more: Snakemake, which
    # measured it, samples a job's memory every 30 s after its first 15 s
    return request(GB + 2.2 * held, seconds, attempt, threads)


def evaluate(size, attempt, tokens, device, logits_bytes, float32_package=False):
    """The reference, then the variant (never both: workflow_scripts.evaluation.evaluate.score_windows), with the
    reference's logits between them; every evaluation token through both. Where memory is short the two take
    turns per group of windows, loading again each time (``logits_bytes`` of logits in groups of
    REFERENCE_LOGITS_BYTES). On the CPU each is held in bf16 (int8) and computes in float32, except a compiled
    float variant, whose package holds float32 weights (``float32_package``); on a GPU each computes in bf16,
    loaded straight onto it, and the host holds the mapped checkpoint (4.9 GB for 4.0 GB of weights, measured)."""
    loads = 2 * math.ceil(logits_bytes / REFERENCE_LOGITS_BYTES)
    if device == "cuda":
        seconds = loads * size.weight_bytes / DISK_BYTES_PER_S + 2 * 2 * size.parameters * tokens / GPU_FLOPS
        return request(CUDA_RUNTIME_BYTES + 1.1 * size.weight_bytes, seconds, attempt, GPU_THREADS)
    threads = size.compute_threads
    seconds = loads * size.weight_bytes / DISK_BYTES_PER_S + forward_seconds(size, tokens, threads, passes=2)
    held = (2.1 if float32_package else 1.05) * size.weight_bytes
    return request(2 * GB + REFERENCE_LOGITS_BYTES + held, seconds, attempt, threads)


def serve_benchmark(size, attempt, tokens, device):
    """A server holding the variant (a float32 package or an eager float32 model at most: twice the bf16 weights)
    and the benchmark client beside it. Decode steps are bound by reading the weights, not by their products:
    four times the FLOPs estimate, which ran 8 s where SmolLM2's int8 package measured 8.3 s at batch 1. Under
    vastgenx (``vacc``) the model is on the VACC dies: the host runs the client, at 50 tokens/s or more."""
    if device == "vacc":
        return request(2 * GB, 600 + tokens / 50, attempt, threads=2)
    if device == "cuda":
        seconds = 60 + 4 * size.weight_bytes / DISK_BYTES_PER_S + 4 * 2 * size.parameters * tokens / GPU_FLOPS
        return request(CUDA_RUNTIME_BYTES + GB + 1.1 * size.weight_bytes, seconds, attempt, GPU_THREADS)
    threads = size.compute_threads
    seconds = 60 + 2 * size.weight_bytes / DISK_BYTES_PER_S + 4 * forward_seconds(size, tokens, threads)
    return request(2 * GB + 2.1 * size.weight_bytes, seconds, attempt, threads)


def tokenize(attempt, tokens):
    """A tokenizer (Tekken's is the largest), the raw records and the token ids."""
    return request(2 * GB + 16 * tokens, tokens / TOKENS_PER_S, attempt, threads=2)


def small(attempt):
    """Jobs that read and write JSON: configs, gates, plots, the summary."""
    return request(GB, 0, attempt)


def gptq_memory_bytes(config, samples, seqlen, device):
    """``{"host": bytes, "gpu": bytes}`` at GPTQ's peak: the formula of docs/gptq.md, "Memory".

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
    attention = 3 * GPTQ_BATCH * config["num_attention_heads"] * seqlen**2 * 4
    rounding = 4 * inter**2 * hessian + 3 * 4 * 2 * inter * hidden
    compute = activations + parameters * value + (3 * hidden**2 + inter**2) * hessian + max(attention, rounding)
    if on_cpu:
        return {"host": RUNTIME_BYTES + compute, "gpu": 0}
    # the samples are embedded on the host from the mapped embedding table; a layer is read there in bf16 and
    # its int8 weights come back (4.1 GB measured for a 7B shape on an H200: docs/figures.md, "Real size")
    embedded = samples * seqlen * hidden * value + 2 * config["vocab_size"] * hidden
    return {"host": CUDA_RUNTIME_BYTES + embedded + 3 * parameters, "gpu": compute}
