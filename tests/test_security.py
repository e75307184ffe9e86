"""Nothing runs that the workflow did not write; the HF token stays out of every file; no path escapes."""

import ast
import json
import re
import shutil

import pytest
import torch
from test_config import validated

from workflow_scripts.checkpoint.folder import read_weight_map
from workflow_scripts.checkpoint.patch import patch_checkpoint
from workflow_scripts.checkpoint.vacc_code import AUTO_MAP, check_own_code, load_vacc_model
from workflow_scripts.core.errors import InputError

from conftest import (
    FAKE_HF_TOKEN,
    PATCH_SETTINGS,
    REPO,
    add_to_hub_cache,
    files_containing,
    run_stage,
    stage_env,
)

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def planting(marker):
    """Python that leaves ``marker`` behind if anything ever runs it."""
    return f"open({str(marker)!r}, 'w').write('ran')\n"


@pytest.fixture()
def patched_copy(patched, tmp_path):
    folder = tmp_path / "patched"
    shutil.copytree(patched["mistral"], folder)
    return folder


def test_own_code_loads(patched_copy):
    check_own_code(patched_copy)
    assert load_vacc_model(patched_copy, torch.float32).config.architectures == ["MistralForCausalLM"]


@pytest.mark.parametrize("tamper", ["extra module", "edited modeling", "auto_map elsewhere", "auto_map on the hub"])
def test_foreign_code_in_a_checkpoint_is_refused_before_it_can_run(patched_copy, tmp_path, tamper):
    marker = tmp_path / "ran"
    config_path = patched_copy / "config.json"
    config = json.loads(config_path.read_text())
    if tamper == "extra module":
        (patched_copy / "helpers.py").write_text(planting(marker))
        expected = "helpers.py: this workflow did not write this code"
    elif tamper == "edited modeling":
        with open(patched_copy / "modeling_mistral_vacc.py", "a") as modeling:
            modeling.write(planting(marker))
        expected = "modeling_mistral_vacc.py: differs from workflow_scripts/checkpoint/vacc_files"
    elif tamper == "auto_map elsewhere":
        config["auto_map"]["AutoModelForCausalLM"] = "evil.EvilModel"
        config_path.write_text(json.dumps(config))
        (patched_copy / "evil.py").write_text(planting(marker))
        expected = "evil.py: this workflow did not write this code"
    else:
        config["auto_map"]["AutoModelForCausalLM"] = "someone/repo--modeling_mistral_vacc.MistralForCausalLM"
        config_path.write_text(json.dumps(config))
        expected = "auto_map.AutoModelForCausalLM = 'someone/repo--modeling_mistral_vacc.MistralForCausalLM' names code"
    with pytest.raises(InputError, match=re.escape(expected)):
        load_vacc_model(patched_copy, torch.float32)
    assert not marker.exists()


def test_a_downloaded_repos_code_and_auto_map_never_reach_the_patched_checkpoint(tiny_checkpoints, tmp_path):
    """A hub repo with its own modeling code: the download does not fetch it, the patch replaces its auto_map."""
    marker = tmp_path / "ran"
    source = tmp_path / "repo"
    shutil.copytree(tiny_checkpoints["mistral"], source)
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM", "AutoTokenizer": "tok_evil.T"}
    (source / "config.json").write_text(json.dumps(config))
    (source / "modeling_evil.py").write_text(planting(marker))
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "test-org/WithCode", {p.name: p for p in source.iterdir()}, COMMIT)
    manifest = tmp_path / "resources" / "models" / "tiny" / "MANIFEST.json"
    run_stage(
        "download",
        "--model",
        "tiny",
        "--source",
        json.dumps({"hub": "test-org/WithCode", "revision": "main"}),
        "--manifest",
        manifest,
        env=stage_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1"),
    )
    assert not list(manifest.parent.glob("*.py"))
    patched = tmp_path / "patched"
    patch_checkpoint("tiny", manifest.parent, patched, PATCH_SETTINGS)
    assert json.loads((patched / "config.json").read_text())["auto_map"] == AUTO_MAP
    load_vacc_model(patched, torch.float32)
    assert not marker.exists()


def test_a_pickle_that_holds_code_is_refused_even_when_pickles_are_allowed(tiny_checkpoints, tmp_path):
    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (exec, (planting(marker),))

    source = tmp_path / "pickled"
    source.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_checkpoints["mistral"] / name, source / name)
    torch.save({"model.embed_tokens.weight": Planted()}, source / "pytorch_model.bin")
    manifest = tmp_path / "resources" / "models" / "tiny" / "MANIFEST.json"
    result = run_stage(
        "download",
        "--model",
        "tiny",
        "--source",
        json.dumps({"local": str(source), "allow_pickle": True}),
        "--manifest",
        manifest,
        check=False,
    )
    assert result.returncode == 1
    assert "pytorch_model.bin holds more than tensors; it is refused" in result.stderr
    assert not marker.exists() and not manifest.parent.exists()


def python_sources():
    for path in sorted((REPO / "workflow_scripts").rglob("*.py")):
        yield path, ast.parse(path.read_text())


def test_only_the_checked_loader_passes_trust_remote_code_and_torch_load_is_weights_only():
    trusting, loads = [], []
    for path, tree in python_sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                trusting.append(path.name)
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "attr", None) == "load"
                and getattr(node.func.value, "id", None) == "torch"
            ):
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                loads.append((path.name, bool(weights_only) and weights_only[0].value.value is True))
            assert not (
                isinstance(node, ast.Import)
                and any(a.name in ("pickle", "dill") for a in node.names)
                and path.name != "assemble.py"  # catches UnpicklingError of a refused torch.load
            ), path
    assert trusting == ["vacc_code.py"]
    assert loads and all(weights_only for _, weights_only in loads), loads
    loader = (REPO / "workflow_scripts" / "checkpoint" / "vacc_code.py").read_text()
    body = loader[loader.index("def load_vacc_model") :]
    assert body.index("check_own_code(folder)") < body.index("from_pretrained(")


@pytest.mark.parametrize("model_id", ["..", ".", ".hidden", "../escape", "a/b"])
def test_model_ids_cannot_name_a_folder_outside_the_workflows(model_id):
    with pytest.raises(Exception, match="does not match"):
        validated({"targets": [], "models": {model_id: {"source": {"demo": "mistral"}}}})


@pytest.mark.parametrize("repo", ["org/..", "../x", "org/../x", "org/.x"])
def test_hub_repo_ids_cannot_climb_out_of_the_cache(repo):
    with pytest.raises(Exception, match="does not match"):
        validated({"targets": [], "models": {"m": {"source": {"hub": repo, "revision": "main"}}}})


@pytest.mark.parametrize(
    "shard", ["../../outside.safetensors", "/tmp/model-1.safetensors", "sub/model.safetensors", "model.bin"]
)
def test_an_index_cannot_point_a_stage_outside_the_checkpoint(tmp_path, shard):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    with pytest.raises(InputError, match=r"is not a model\*\.safetensors file name in the checkpoint's folder"):
        read_weight_map(index)


@pytest.mark.slow
def test_the_hf_token_reaches_no_file_of_a_run(reference_run):
    """Logs, benchmarks, manifests, the report and Snakemake's own records (.snakemake/) of a whole run."""
    assert (reference_run.work / ".snakemake").is_dir() and (reference_run.work / "results" / "report").is_dir()
    assert files_containing(reference_run.work, FAKE_HF_TOKEN) == []


def test_the_hf_token_reaches_no_file_of_a_hub_download_nor_its_errors(tmp_path, tiny_checkpoints):
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "test-org/Gated", {p.name: p for p in tiny_checkpoints["mistral"].iterdir()}, COMMIT)
    env = stage_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_TOKEN=FAKE_HF_TOKEN)
    outputs = []
    for repo in ("test-org/Gated", "test-org/Missing"):
        manifest = tmp_path / "resources" / "models" / repo.split("/")[1].lower() / "MANIFEST.json"
        result = run_stage(
            "download",
            "--model",
            "tiny",
            "--source",
            json.dumps({"hub": repo, "revision": "main"}),
            "--manifest",
            manifest,
            env=env,
            check=False,
        )
        outputs.append(result.stdout + result.stderr)
    assert (tmp_path / "resources" / "models" / "gated" / "MANIFEST.json").exists(), outputs[0]
    assert "is not in the local hub cache" in outputs[1]
    assert all(FAKE_HF_TOKEN not in output for output in outputs)
    assert files_containing(tmp_path / "resources", FAKE_HF_TOKEN) == []
