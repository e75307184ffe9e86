"""Shared fixtures: tiny checkpoints, a hub-format cache, and running the stages' entry points."""

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from workflow_scripts.checkpoint.demo_checkpoint import write_demo_checkpoint  # noqa: E402
from workflow_scripts.checkpoint.patch import PatchSettings, patch_checkpoint  # noqa: E402
from workflow_scripts.compilation.aoti_build import AotiSettings, compile_variant  # noqa: E402
from workflow_scripts.quantization.int8_checkpoint import PROJECTIONS, QuantizeSettings  # noqa: E402
from workflow_scripts.quantization.rtn import quantize_checkpoint  # noqa: E402
from workflow_scripts.runtime.decode import VerifyPrompts  # noqa: E402

from workflow_copy import Workflow  # noqa: E402

# The README's test command runs three pytest-xdist workers. The tests of a file that shares a module-scoped
# fixture (a Snakemake run, the SLURM cluster, compiled packages, a second virtual environment) run on one worker,
# so that it is built once; so do the tests on copies of the reference run, since some of them edit its code
# folder while they plan. The longest groups come first, so that the workers start on them at once and the
# short tests fill in around them; every other test goes to whichever worker is free. (Files, not xdist_group
# marks: pytest-xdist 3.8's loadgroup does not group under pytest 9.)
SHARED_FIXTURE_FILES = {
    "test_real_model.py": "real model run",
    "test_slurm.py": "SLURM cluster",
    "test_faults.py": "reference run's code",
    "test_workflow.py": "reference run's code",
    "test_disk_full.py": "reference run's code",
    "test_compile.py": "compiled packages",
    "test_serving.py": "compiled packages",
    "test_transformers445.py": "transformers 4.45 venv",
    "test_gguf_import.py": "SmolLM2 import",
    "test_quantize_gptq.py": "GPTQ model",
    "test_real_text.py": "python-docs dataset",
    "test_docs.py": "schema and docs",
    "test_stock_loading.py": "compressed-tensors export",
}
LONGEST_FIRST = ("real model run", "SLURM cluster", "reference run's code", "compiled packages")


def shared_fixture_group(nodeid):
    return SHARED_FIXTURE_FILES.get(nodeid.split("::")[0].rsplit("/", 1)[-1])


def pytest_collection_modifyitems(items):
    order = {group: rank for rank, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(shared_fixture_group(item.nodeid), len(order)))


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        """Work units in collection order (``--no-loadscope-reorder``): a group per shared-fixture file, one
        test for any other."""

        def _split_scope(self, nodeid):
            return shared_fixture_group(nodeid) or nodeid

    return SharedFixtureScheduling(config, log)


# Several test workers each run Snakemake with two cores on this two-core machine, and the jobs' torch threads
# would spin-wait for each other at every parallel region while another worker's job needs the core (three 2-thread
# evaluate jobs at once: 52 s, 31 s with passive waiting; one alone: the same either way). Jobs inherit this.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Small enough for fast tests, with the presets' ratios (GQA 4:1; explicit
# head_dim unequal to hidden/heads for the Ministral-like one).
TINY_SHAPES = {
    "mistral": {
        "hidden_size": 64,
        "intermediate_size": 224,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "sliding_window": 8,
    },
    "ministral": {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 32,
    },
}


PATCH_SETTINGS = PatchSettings(insert_slice=True, iter_num=0)
QUANTIZE_SETTINGS = QuantizeSettings(bits=8, modules=PROJECTIONS)
# a library called directly fingerprints its code as the stage that calls it would
QUANTIZE_STAGE = "workflow_scripts.stages.quantize"
AOTI_STAGE = "workflow_scripts.stages.aoti_compile"


def stage_env(**extra):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_stage(module, *args, env=None, check=True):
    """Run ``python -m workflow_scripts.stages.<module>`` as the rules do (or a module by its full name, such as
    ``workflow_scripts.run_compiled``); return the completed process."""
    module = module if module.startswith("workflow_scripts.") else f"workflow_scripts.stages.{module}"
    result = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        env=env or stage_env(),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"{module} failed ({result.returncode}):\n{result.stderr}")
    return result


def build_venv(folder, requirements):
    """A new virtual environment in ``folder`` with ``requirements`` installed by pip: ``(its python, None)``, or
    ``(None, why)`` when a step failed."""
    python = Path(folder) / "bin" / "python"
    steps = [
        [sys.executable, "-m", "venv", str(folder)],
        [str(python), "-m", "pip", "install", "-q", "-r", str(requirements)],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            return None, f"{' '.join(step[:5])} ... failed:\n{result.stderr[-2000:]}"
    return str(python), None


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Hub-layout checkpoints of both presets with tiny shapes: {preset: folder}."""
    root = tmp_path_factory.mktemp("checkpoints")
    folders = {}
    for preset, shape in TINY_SHAPES.items():
        folder = root / preset
        folder.mkdir()
        write_demo_checkpoint(preset, folder, seed=7, overrides=shape)
        folders[preset] = folder
    return folders


def add_to_hub_cache(cache, repo, files, commit, ref="main", kind="models"):
    """Lay ``files`` ({name: source path}) out as the hub cache does: blobs, a snapshot of links, a ref."""
    storage = Path(cache) / f"{kind}--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(os.path.relpath(blob, (snapshot / name).parent))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture()
def copy_checkpoint(tmp_path):
    """Copy a checkpoint folder so a test can alter it."""

    def copy(folder, name="altered"):
        target = tmp_path / name
        shutil.copytree(folder, target)
        return target

    return copy


@pytest.fixture(scope="session")
def downloaded(tiny_checkpoints, tmp_path_factory):
    """Both tiny presets fetched through the real local-source download: {preset: folder}."""
    root = tmp_path_factory.mktemp("resources")
    folders = {}
    for preset, checkpoint in tiny_checkpoints.items():
        manifest = root / preset / "MANIFEST.json"
        run_stage(
            "download", "--model", preset, "--source", json.dumps({"local": str(checkpoint)}), "--manifest", manifest
        )
        folders[preset] = manifest.parent
    return folders


@pytest.fixture(scope="session")
def patched(downloaded, tmp_path_factory):
    """Both tiny presets patched: {preset: folder}."""
    root = tmp_path_factory.mktemp("results")
    folders = {}
    for preset, source in downloaded.items():
        folders[preset] = root / preset / "patched"
        patch_checkpoint(preset, source, folders[preset], PATCH_SETTINGS)
    return folders


@pytest.fixture(scope="session")
def quantized(patched, tmp_path_factory):
    """Both tiny presets quantized with rtn-int8: {preset: folder}."""
    root = tmp_path_factory.mktemp("quantized")
    folders = {}
    for preset, folder in patched.items():
        folders[preset] = root / preset
        quantize_checkpoint(preset, "rtn-int8", folder, folders[preset], QUANTIZE_SETTINGS, QUANTIZE_STAGE)
    return folders


AOTI = AotiSettings(
    device="auto",
    batch=2,
    context=2048,
    dtype="auto",
    max_abs_logit_diff={"float32": 1e-4, "bfloat16": 0.05},
)
VERIFY = VerifyPrompts(prompts=("The capital of France is", "def fibonacci(n):"), greedy_tokens=16)


@pytest.fixture(scope="session")
def compiled(patched, tmp_path_factory):
    """The tiny Ministral-like model compiled as float and as rtn-int8 (tests/test_compile.py and
    tests/test_serving.py share it: the same worker runs both)."""
    root = tmp_path_factory.mktemp("aoti")
    quantize_checkpoint(
        "ministral", "rtn-int8", patched["ministral"], root / "rtn-int8", QUANTIZE_SETTINGS, QUANTIZE_STAGE
    )
    for variant, checkpoint in (("float", patched["ministral"]), ("rtn-int8", root / "rtn-int8")):
        output = root / "aoti" / variant
        compile_variant("ministral", variant, patched["ministral"], checkpoint, AOTI, VERIFY, output, AOTI_STAGE)
    return root


# What a fake vamc accepts: the documented keys (VAMC_KEYS mirrors vacc-reference.md) and their rules.
FAKE_VAMC = r"""#!{python}
import json, os, sys
import yaml

KEYS = json.loads({keys!r})


def check(document, known, where):
    for key, value in document.items():
        assert key in known, f"unknown key {{where}}{{key}}"
        if known[key] is not None:
            check(value, known[key], f"{{where}}{{key}}.")


assert sys.argv[1:2] == ["compile"] and len(sys.argv) == 3, sys.argv
document = yaml.safe_load(open(sys.argv[2]))
check(document, KEYS, "")
assert {{"name", "frontend", "backend", "workspace"}} <= set(document)
assert document["frontend"]["type"] == "huggingface" and os.path.isdir(document["frontend"]["checkpoint"])
assert document["backend"]["type"] == "tvm_vacc" and document["backend"]["dtype"] in ("fp16", "int8")
seq_in, seq_total = (lengths[0] for lengths in document["frontend"]["shape"]["input_ids"])
assert seq_in % 16 == 0 and seq_total % 16 == 0
if document["backend"]["dtype"] == "int8":
    assert document["frontend"]["quantize"]["type"] == "w8a16_gptq" and os.path.isdir(document["dataset"]["path"])
with open(os.environ["FAKE_VAMC_CALLS"], "a") as calls:
    calls.write(json.dumps({{"argv": sys.argv[1:], "stack": os.environ.get("VACC_STACK_SIZE")}}) + "\n")
print("fake vamc: compiling", document["name"])
if os.environ.get("FAKE_VAMC_FAIL"):
    os.makedirs(os.path.join(document["workspace"]["path"], document["name"]), exist_ok=True)
    sys.exit(3)
for rank in range(document["frontend"]["model_kwargs"]["tp"]):
    for stage in (f"prefill_{{seq_in}}", f"decode_{{seq_total}}"):
        folder = os.path.join(document["workspace"]["path"], document["name"], f"{{stage}}_rank{{rank}}")
        os.makedirs(folder)
        open(os.path.join(folder, "mod.so"), "wb").write(b"fake")
"""


@pytest.fixture()
def fake_vamc(tmp_path):
    """``(environment, calls file)``: a `vamc` on PATH that validates its build config against the documented
    keys and writes an artifact tree; each call is recorded."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vamc = bin_dir / "vamc"
    from workflow_scripts.compilation.vamc import VAMC_KEYS

    vamc.write_text(FAKE_VAMC.format(python=sys.executable, keys=json.dumps(VAMC_KEYS)))
    vamc.chmod(vamc.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "calls.jsonl"
    return stage_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_VAMC_CALLS=str(calls)), calls


# Recognisable, so that a grep over everything a run wrote finds any leak of it.
FAKE_HF_TOKEN = "hf_FAKEtokenVACCworkflowLEAKcheck0123"
OUTPUT_FOLDERS = ("resources", "results")
# records of the run itself: the plot of each stage's wall time and memory (from Snakemake's benchmarks), and
# the serving benchmark's timings and their plot
RUN_RECORDS = ("results/report/*/stages.png", "results/*/bench/*.json", "results/report/*/serving.png")


def output_digests(work):
    """``{path: sha256}`` of every file a run built (resources/ and results/; logs and benchmarks differ by nature).

    The working folder's absolute path reads as ``<work>``: vamc configs name their checkpoint by it, and
    compiled packages carry it in the compile commands of their C++ sources, so runs in two folders differ
    there and only there.
    """
    folder_path = str(Path(work).resolve()).encode()
    return {
        str(path.relative_to(work)): hashlib.sha256(path.read_bytes().replace(folder_path, b"<work>")).hexdigest()
        for folder in OUTPUT_FOLDERS
        for path in sorted((Path(work) / folder).rglob("*"))
        if path.is_file() and not any(path.relative_to(work).match(record) for record in RUN_RECORDS)
    }


def files_containing(root, secret):
    """Files under ``root`` (hidden ones too) whose bytes contain ``secret``."""
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.islink(path) and secret.encode() in open(path, "rb").read():
                found.append(os.path.relpath(path, root))
    return found


def embedded_default():
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def embedded_default_of(kind):
    """The embedded config targeting its ``demo`` models (random-weight models, built by name: every stage's
    plumbing) or its ``real`` default targets (trained models: the quality figures)."""
    config = embedded_default()
    if kind == "demo":
        config["targets"] = [model for model, settings in config["models"].items() if "demo" in settings["source"]]
    assert config["targets"], f"the embedded config has no {kind} target"
    assert all(("demo" in config["models"][model]["source"]) == (kind == "demo") for model in config["targets"])
    return config


def small_gptq(*aoti_variants, exports=("compressed-tensors",)):
    """Small GPTQ settings; AOTInductor compiles only the named variants (each takes about 30 s here)."""
    return {
        "quantize": {"gptq-int8": {"nsamples": 8, "holdout": 4, "device": "cpu"}, "exports": list(exports)},
        # room for the evaluation windows (256 tokens) the compiled variants are scored on
        "aoti": {"variants": list(aoti_variants), "context": 256},
        # the longest prompt and shortest output of the vendor's sweep, scaled to the context (127 and 32 tokens),
        # alone and two at once
        "bench": {"inputs": [2040], "outputs": [512], "concurrency": [1, 2], "requests": 2},
        # random weights: near-uniform distributions make top-1 agreement meaningless (config.yaml says why)
        "gates": {"min_top1_agreement": None},
    }


TIED = {**TINY_SHAPES["mistral"], "tie_word_embeddings": True}


def reference_config():
    """The smallest config that runs every stage: three tiny models, two of which (a, c) share a tokenizer;
    small calibration sizes. tiny-a ties its embeddings (no lm_head.weight), as Llama-style models do, and is
    the one compiled by AOTInductor and exported as compressed-tensors; tiny-b is Ministral-shaped with the Tekken
    tokenizer."""
    return {
        "targets": ["tiny-a", "tiny-b", "tiny-c"],
        "models": {
            "tiny-a": {"source": {"demo": "mistral", "seed": 1, "shape": TIED}, **small_gptq("rtn-int8")},
            "tiny-b": {
                "source": {"demo": "ministral", "seed": 2, "shape": TINY_SHAPES["ministral"]},
                "verify": {"greedy_tokens": 8},
                **small_gptq(exports=()),
            },
            "tiny-c": {
                "source": {"demo": "mistral", "seed": 3, "shape": TINY_SHAPES["mistral"]},
                "verify": {"greedy_tokens": 4},
                **small_gptq(exports=()),
            },
        },
        "datasets": {
            "c4": {"nsamples": 12, "seqlen": 256},
            "alpaca": {"nsamples": 8, "seqlen": 128},
            "ceval": {"nsamples": 8, "seqlen": 64},
        },
        "evaluation": {"c4": {"nsamples": 4, "seqlen": 256}},
    }


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """reference_config built locally from scratch, once per session, with a fake HF_TOKEN in the environment:
    what the workflow tests plan against (on copies), and what the SLURM run must reproduce byte for byte.

    Under pytest-xdist the session's workers share one: the first to ask builds it, the others wait for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    with open(root / "reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = root / "reference" / "snakemake-output.log"
        if built.exists():
            flow = Workflow.existing(built.parent)
            flow.output = built.read_text()
        else:
            flow = Workflow(built.parent, reference_config())
            flow.output = flow.run(env={**os.environ, "HF_TOKEN": FAKE_HF_TOKEN})
            built.write_text(flow.output)
    return flow
