"""The download stage against a hub-format cache built here, offline, through the real hub client."""

import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import add_to_hub_cache, run_stage, stage_env

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO_ID = "test-org/Tiny-Mistral"


def hub_files(checkpoint):
    return {p.name: p for p in checkpoint.iterdir()}


@pytest.fixture()
def hub_cache(tmp_path, tiny_checkpoints):
    cache = tmp_path / "hub"
    files = hub_files(tiny_checkpoints["mistral"])
    # What a Mistral repo also carries and the workflow must not fetch.
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "consolidated.safetensors").write_bytes(b"mistral-format weights")
    torch.save({"x": torch.zeros(2)}, extra / "pytorch_model.bin")
    files.update({name: extra / name for name in ("consolidated.safetensors", "pytorch_model.bin")})
    add_to_hub_cache(cache, REPO_ID, files, COMMIT)
    return cache


def fetch(tmp_path, cache, source, model="tiny", check=True, **env):
    manifest = tmp_path / "resources" / "models" / model / "MANIFEST.json"
    result = run_stage(
        "download",
        "--model",
        model,
        "--source",
        json.dumps(source),
        "--manifest",
        manifest,
        env=stage_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", **env),
        check=check,
    )
    return manifest, result


def test_offline_fetch_links_the_snapshot_and_writes_the_manifest(tmp_path, hub_cache, tiny_checkpoints):
    manifest_path, result = fetch(
        tmp_path, hub_cache, {"hub": REPO_ID, "revision": "main"}, HF_TOKEN="hf_secret_never_written"
    )
    manifest = json.loads(manifest_path.read_text())
    folder = manifest_path.parent
    assert manifest["origin"] == {"hub": REPO_ID, "revision": "main", "commit": COMMIT}
    assert manifest["link"] == ["hardlink"]
    expected = sorted(p.name for p in tiny_checkpoints["mistral"].iterdir())
    assert sorted(manifest["files"]) == expected
    assert not (folder / "consolidated.safetensors").exists()
    assert not (folder / "pytorch_model.bin").exists()
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    blob = (
        hub_cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT / "model-00001-of-00002.safetensors"
    ).resolve()
    assert os.path.samefile(blob, folder / "model-00001-of-00002.safetensors")
    for path in [*tmp_path.joinpath("resources").rglob("*")]:
        if path.is_file():
            assert b"hf_secret_never_written" not in path.read_bytes()
    assert "hf_secret_never_written" not in result.stderr


def test_revision_pinned_to_a_commit(tmp_path, hub_cache):
    manifest_path, _ = fetch(tmp_path, hub_cache, {"hub": REPO_ID, "revision": COMMIT})
    assert json.loads(manifest_path.read_text())["origin"]["commit"] == COMMIT


@pytest.mark.parametrize(
    "source, message",
    [
        (
            {"hub": "test-org/Missing", "revision": "main"},
            "model tiny: hub repo test-org/Missing@main is not in the local hub cache with HF_HUB_OFFLINE=1",
        ),
        ({"hub": REPO_ID, "revision": "f" * 40}, f"hub repo {REPO_ID}@{'f' * 40} is not in the local hub cache"),
    ],
)
def test_missing_repo_or_revision_is_named_and_leaves_nothing(tmp_path, hub_cache, source, message):
    manifest_path, result = fetch(tmp_path, hub_cache, source, check=False)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not manifest_path.parent.exists()


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path, tiny_checkpoints):
    cache = tmp_path / "hub"
    state = {}
    for shard in tiny_checkpoints["ministral"].glob("model-*.safetensors"):
        state.update(load_file(shard))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(state, pickled / "pytorch_model.bin")
    files = {
        name: path for name, path in hub_files(tiny_checkpoints["ministral"]).items() if not name.startswith("model")
    }
    files["pytorch_model.bin"] = pickled / "pytorch_model.bin"
    add_to_hub_cache(cache, "test-org/Pickled", files, COMMIT)

    manifest_path, result = fetch(tmp_path, cache, {"hub": "test-org/Pickled", "revision": "main"}, check=False)
    assert result.returncode == 1
    assert "model tiny:" in result.stderr and "has no model*.safetensors weights" in result.stderr
    assert not manifest_path.parent.exists()

    manifest_path, _ = fetch(tmp_path, cache, {"hub": "test-org/Pickled", "revision": "main", "allow_pickle": True})
    manifest = json.loads(manifest_path.read_text())
    assert "pytorch_model.bin" not in manifest["files"]
    converted = load_file(manifest_path.parent / "model-00001-of-00001.safetensors")
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[name], state[name]) for name in state)


def test_other_architectures_are_refused(tmp_path, tiny_checkpoints, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoints["mistral"])
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    cache = tmp_path / "hub"
    add_to_hub_cache(cache, "test-org/Llama", hub_files(folder), COMMIT)
    manifest_path, result = fetch(tmp_path, cache, {"hub": "test-org/Llama", "revision": "main"}, check=False)
    assert result.returncode == 1
    assert "['LlamaForCausalLM']" in result.stderr and "MistralForCausalLM checkpoints only" in result.stderr
    assert "config.json" in result.stderr
    assert not manifest_path.parent.exists()


def test_local_source_is_linked(tmp_path, tiny_checkpoints, copy_checkpoint):
    folder = copy_checkpoint(tiny_checkpoints["ministral"])
    manifest_path, _ = fetch(tmp_path, tmp_path / "unused", {"local": str(folder)})
    manifest = json.loads(manifest_path.read_text())
    assert manifest["origin"] == {"local": str(folder)}
    assert os.path.samefile(folder / "tekken.json", manifest_path.parent / "tekken.json")


def test_refetch_replaces_the_folder_whole(tmp_path, hub_cache):
    manifest_path, _ = fetch(tmp_path, hub_cache, {"hub": REPO_ID, "revision": "main"})
    stale = manifest_path.parent / "stale.json"
    stale.write_text("{}")
    manifest_path.unlink()
    fetch(tmp_path, hub_cache, {"hub": REPO_ID, "revision": "main"})
    assert not stale.exists() and manifest_path.exists()
    assert not [p for p in manifest_path.parent.parent.iterdir() if p.name.startswith(".")]
