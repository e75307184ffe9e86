"""Device and precision of the heavy stages, the memory-bounded float32 path, the shared weights of compiled
packages and the streamed demo checkpoints; the CUDA paths run where torch sees a GPU."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from workflow_scripts.checkpoint import demo_checkpoint
from workflow_scripts.checkpoint.safetensors_stream import SafetensorsFile
from workflow_scripts.checkpoint.vacc_code import load_vacc_model
from workflow_scripts.core.devices import float32_compute, load_computing_in, resolve_device, resolve_dtype
from workflow_scripts.core.errors import InputError
from workflow_scripts.runtime.decode import greedy_decode
from workflow_scripts.runtime.package import read_constants, write_constants

from conftest import AOTI, AOTI_STAGE, VERIFY

IDS = torch.tensor([[1, 415, 5565, 302, 4843, 349, 5465, 28723, 661, 349, 264, 1628]])
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_a_cuda_setting_without_a_gpu_is_refused_naming_the_key():
    assert resolve_device("auto", "models.m.verify.device") == "cpu"
    with pytest.raises(InputError, match=r"models\.m\.evaluate\.device is cuda, but torch sees no CUDA device"):
        resolve_device("cuda", "models.m.evaluate.device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_a_package_is_evaluated_on_the_device_it_was_compiled_for(tmp_path):
    from workflow_scripts.evaluation.evaluate import EvaluateSettings, evaluation_device

    settings = EvaluateSettings(
        device="cuda", dtype="auto", c4_windows=None, ceval_questions=None, prompts=("a",), generate_tokens=1
    )
    (tmp_path / "graphs.json").write_text(json.dumps({"device": "cpu"}))
    assert evaluation_device("m", settings, tmp_path) == "cpu"
    (tmp_path / "graphs.json").write_text(json.dumps({"device": "cuda"}))
    with pytest.raises(
        InputError, match=r"compiled for CUDA, but torch sees no CUDA device here \(models\.m\.evaluate"
    ):
        evaluation_device("m", settings, tmp_path)
    with pytest.raises(InputError, match=r"models\.m\.evaluate\.device is cuda"):
        evaluation_device("m", settings)


def test_auto_precision_is_float32_on_the_cpu_and_the_checkpoints_on_a_gpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cuda", torch.float16) == torch.float16
    assert resolve_dtype("float32", "cuda") == torch.float32


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_widening_as_it_runs_gives_the_bits_of_a_float32_load(patched, quantized, downloaded, preset):
    """Patched, int8 and upstream models held in their checkpoint's dtype compute what their float32 loads
    compute, bit for bit, and their weights stay in the checkpoint's dtype."""
    from transformers import MistralForCausalLM

    torch.set_grad_enabled(False)

    def upstream(dtype, device):
        return MistralForCausalLM.from_pretrained(
            downloaded[preset], dtype=dtype, device_map=device, sliding_window=None
        ).eval()

    loaders = [
        lambda dtype, device: load_vacc_model(patched[preset], dtype, device),
        lambda dtype, device: load_vacc_model(quantized[preset], dtype, device),
        upstream,
    ]
    for load in loaders:
        full = load(torch.float32, "cpu")
        held = float32_compute(load("auto", "cpu"))
        assert torch.equal(greedy_decode(full, IDS, 6)[0], greedy_decode(held, IDS, 6)[0])
        projection = held.model.layers[0].mlp.down_proj.weight
        assert projection.dtype in (torch.bfloat16, torch.int8)
        assert held.model.embed_tokens.weight.dtype == torch.bfloat16


def test_float32_on_the_cpu_is_held_in_bf16_only_where_a_float32_copy_would_not_fit(patched, monkeypatch):
    from workflow_scripts.core import devices

    def load(dtype, device):
        return load_vacc_model(patched["mistral"], dtype, device)

    weights = devices.stored_bytes(patched["mistral"])
    monkeypatch.setattr(devices, "available_memory_bytes", lambda: 4 * weights)
    assert load_computing_in(load, torch.float32, "cpu", weights).model.layers[0].mlp.down_proj.weight.dtype == (
        torch.float32
    )
    monkeypatch.setattr(devices, "available_memory_bytes", lambda: 4 * weights - 1)
    assert load_computing_in(load, torch.float32, "cpu", weights).model.layers[0].mlp.down_proj.weight.dtype == (
        torch.bfloat16
    )


def test_float32_compute_keeps_int8_weights_int8_and_widens_the_small_parameters():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    model.to(torch.bfloat16)
    model[2].register_buffer("codes", torch.ones(3, dtype=torch.int8))
    float32_compute(model)
    assert model[1].weight.dtype == torch.float32 and model[2].codes.dtype == torch.int8
    output = model(torch.tensor([1, 2]))
    assert output.dtype == torch.float32 and model[2].weight.dtype == torch.bfloat16


def test_constants_are_stored_once_and_in_the_fewest_bytes_that_keep_their_values(tmp_path):
    shared = torch.randn(8, 4).to(torch.bfloat16).float()
    constants = {
        "embed.weight": shared,
        "head.weight": shared,  # tied: the same tensor under two names
        "rotary.table": torch.randn(3, 4),  # float32 values that bfloat16 cannot hold
        "proj.weight": torch.randint(-127, 128, (4, 4), dtype=torch.int8),
    }
    write_constants(tmp_path / "weights.safetensors", constants)
    stored = SafetensorsFile(tmp_path / "weights.safetensors")
    assert {name: entry["dtype"] for name, entry in stored.entries.items()} == {
        "embed.weight": "BF16",
        "proj.weight": "I8",
        "rotary.table": "F32",
    }
    loaded = read_constants(tmp_path / "weights.safetensors", "cpu")
    assert set(loaded) == set(constants)
    assert all(
        torch.equal(loaded[name], tensor) and loaded[name].dtype == tensor.dtype for name, tensor in constants.items()
    )
    assert loaded["head.weight"] is loaded["embed.weight"]


def test_a_demo_checkpoint_is_the_same_model_however_many_shards_it_is_written_in(tmp_path, monkeypatch):
    shape = {
        "hidden_size": 64,
        "intermediate_size": 224,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
    }
    (tmp_path / "two").mkdir()
    (tmp_path / "many").mkdir()
    demo_checkpoint.write_demo_checkpoint("mistral", tmp_path / "two", seed=3, overrides=shape)
    monkeypatch.setattr(demo_checkpoint, "SHARD_BYTES", 100_000)
    demo_checkpoint.write_demo_checkpoint("mistral", tmp_path / "many", seed=3, overrides=shape)

    def tensors(folder):
        files = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
        return len(files), {name: t for file in files for name, t in load_file(folder / file).items()}

    (two, first), (many, second) = tensors(tmp_path / "two"), tensors(tmp_path / "many")
    assert two == 2 and many > 2
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


@CUDA
def test_on_a_gpu_the_stages_models_compute_on_it(patched):
    torch.set_grad_enabled(False)
    on_cpu = load_vacc_model(patched["mistral"], torch.float32, "cpu")
    on_gpu = load_computing_in(
        lambda dtype, device: load_vacc_model(patched["mistral"], dtype, device), torch.float32, "cuda", 0
    )
    assert on_gpu.device.type == "cuda"
    cpu_logits, cpu_tokens = greedy_decode(on_cpu, IDS, 6)
    gpu_logits, gpu_tokens = greedy_decode(on_gpu, IDS, 6)
    assert gpu_tokens == cpu_tokens and float((gpu_logits - cpu_logits).abs().max()) < 1e-3


@CUDA
def test_on_a_gpu_the_compiled_packages_are_cuda_packages_that_match_eager(patched, tmp_path):
    from workflow_scripts.compilation.aoti_build import compile_variant
    from workflow_scripts.runtime.package import load_compiled

    settings = dataclasses.replace(AOTI, device="cuda", batch=1)
    verify = dataclasses.replace(VERIFY, prompts=VERIFY.prompts[:1], greedy_tokens=8)
    compile_variant(
        "mistral", "float", patched["mistral"], patched["mistral"], settings, verify, tmp_path / "aoti", AOTI_STAGE
    )
    graphs = json.loads((tmp_path / "aoti" / "graphs.json").read_text())
    assert graphs["device"] == "cuda" and graphs["dtype"] == "bfloat16"
    generator, tokenizer, _ = load_compiled(tmp_path / "aoti")
    tokens, logits = generator.generate(tokenizer.encode("The capital of France is").ids, 4)
    assert logits.device.type == "cuda" and len(tokens) == 4


def test_the_variant_and_its_reference_are_never_resident_together_and_groups_change_no_figure():
    import weakref

    from workflow_scripts.evaluation import evaluate

    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 50, (5, 9), generator=generator)
    table = {name: torch.randn(50, 50, generator=generator) for name in ("reference", "candidate")}
    alive, loads = [], []

    class Model:
        def __init__(self, name):
            loads.append(name)
            assert not any(ref() is not None for ref in alive), "both models resident"
            alive.append(weakref.ref(self))
            self.name = name

    def logits(model, window):
        return table[model.name][window[:-1]]

    def figures(logits_bytes):
        scoring = evaluate.Scoring(lambda: Model("candidate"), lambda: Model("reference"), logits, logits)
        alive.clear()
        loads.clear()
        return evaluate.score_windows(scoring, windows, 50, logits_bytes)[0], list(loads)

    whole, whole_loads = figures(10**9)
    grouped, grouped_loads = figures(2 * 4 * 8 * 50)  # two windows' logits
    assert whole == grouped and whole["kl_divergence"] > 0
    assert whole_loads == ["reference", "candidate"]
    assert grouped_loads == ["reference", "candidate"] * 3


def test_a_cpu_compile_that_cannot_fit_is_refused_before_it_starts(patched, tmp_path, monkeypatch):
    from workflow_scripts.compilation.aoti_build import AotiSettings, compile_variant
    from workflow_scripts.core import devices
    from workflow_scripts.runtime.decode import VerifyPrompts

    monkeypatch.setattr(devices, "available_memory_bytes", lambda: 10**8)
    settings = AotiSettings(device="cpu", batch=1, context=48, dtype="auto", max_abs_logit_diff={"float32": 1e-4})
    with pytest.raises(
        InputError,
        match=r"models\.mistral\.aoti: compiling float for the CPU in float32 needs about \d+\.\d GB of memory, "
        r"and 0\.1 GB is available here; compile for CUDA \(aoti\.device: cuda\)",
    ):
        compile_variant(
            "mistral",
            "float",
            patched["mistral"],
            patched["mistral"],
            settings,
            VerifyPrompts(prompts=("a",), greedy_tokens=1),
            tmp_path / "aoti",
            AOTI_STAGE,
        )
    assert not any(tmp_path.iterdir())


def test_a_cgroup_limit_below_the_machines_memory_is_what_is_available(tmp_path, monkeypatch):
    """A SLURM job's cgroup (v2) two levels down: its limit, less what it uses, plus its reclaimable cache."""
    from workflow_scripts.core import devices

    job = tmp_path / "slurm" / "job_7"
    job.mkdir(parents=True)
    (job / "memory.max").write_text("3000000000\n")
    (job / "memory.current").write_text("1000000000\n")
    (job / "memory.stat").write_text("anon 500000000\ninactive_file 400000000\n")
    (tmp_path / "self").write_text("0::/slurm/job_7\n")
    monkeypatch.setattr(devices, "CGROUP_SELF", tmp_path / "self")
    monkeypatch.setattr(devices, "CGROUP_ROOT", tmp_path)
    assert devices.available_memory_bytes() == 2_400_000_000
    (job / "memory.max").write_text("max\n")
    assert devices.available_memory_bytes() > 2_400_000_000
