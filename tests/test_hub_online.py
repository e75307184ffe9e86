"""The download and dataset-fetch stages online, through the real ``huggingface_hub`` client, against a local
server that speaks the hub's protocol (``hub_server.py``): the same folders as the offline path, and each
network fault named, retried or refused, with nothing left that looks complete."""

import json
import time

import pytest
from hub_server import HubServer, Repo, folder_files

import workflow_scripts.data.demo_datasets as dataset_demo
from workflow_scripts.checkpoint.demo_checkpoint import write_demo_checkpoint
from workflow_scripts.data.assemble import assemble_dataset
from workflow_scripts.data.datasets import DATASET_FILES

from conftest import TINY_SHAPES, add_to_hub_cache, run_stage, stage_env

COMMIT = "0123456789abcdef0123456789abcdef01234567"
MODEL = "test-org/Tiny-Mistral"
DATASET = "allenai/c4"
TOKEN = "hf_testTokenWithAccess"
SHARD = "model-00001-of-00002.safetensors"


@pytest.fixture(scope="session")
def c4_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("c4")
    assemble_dataset("c4", {"demo": True}, folder, dataset_demo.generate)
    return {path: (folder / path).read_bytes() for path in DATASET_FILES["c4"][1].values()}


@pytest.fixture()
def hub(tiny_checkpoints, c4_files):
    with HubServer() as server:
        files = folder_files(tiny_checkpoints["mistral"])
        files["consolidated.safetensors"] = b"mistral-format weights: not fetched"
        server.add(Repo("models", MODEL, COMMIT, files))
        server.add(Repo("datasets", DATASET, COMMIT, {**c4_files, "README.md": b"# c4\n"}))
        yield server


def fetch(tmp_path, hub, kind="model", source=None, name="tiny", check=True, **env):
    """Run the download (``kind`` model) or fetch_dataset stage online against ``hub``; return the manifest
    path and the finished process."""
    stage, subject, repo = ("download", "model", MODEL) if kind == "model" else ("fetch_dataset", "dataset", DATASET)
    manifest = tmp_path / "resources" / f"{subject}s" / name / "MANIFEST.json"
    settings = {
        "HF_HUB_CACHE": str(tmp_path / "hub-cache"),
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.url if hub else "http://hub.invalid",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        **env,
    }
    env = stage_env(**settings)
    if "HF_TOKEN" not in settings:
        env.pop("HF_TOKEN", None)
    source = source or {"hub": repo, "revision": "main"}
    args = [f"--{subject}", name, "--source", json.dumps(source), "--manifest", manifest]
    if kind != "model":
        args += ["--format", "c4"]
    return manifest, run_stage(stage, *args, env=env, check=check)


def offline_manifest(tmp_path, kind, files):
    """The manifest the offline path writes from a hub cache holding ``files``."""
    cache = tmp_path / "offline-cache"
    name, repo = ("models", MODEL) if kind == "model" else ("datasets", DATASET)
    sources = tmp_path / "offline-sources"
    paths = {}
    for path, data in files.items():
        paths[path] = sources / path
        paths[path].parent.mkdir(parents=True, exist_ok=True)
        paths[path].write_bytes(data)
    add_to_hub_cache(cache, repo, paths, COMMIT, kind=name)
    manifest, _ = fetch(tmp_path / "offline", None, kind, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return json.loads(manifest.read_text())


def failed(result, manifest):
    """The error's line; the stage failed with it, without a traceback and without its folder."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not manifest.parent.exists()
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")][-1]


@pytest.mark.parametrize("kind", ["model", "dataset"])
def test_online_fetch_equals_the_offline_one(tmp_path, hub, kind):
    manifest, result = fetch(tmp_path, hub, kind)
    online = json.loads(manifest.read_text())
    repo = hub.repos[("models", MODEL) if kind == "model" else ("datasets", DATASET)]
    fetched = {path: repo.files[path] for path in online["files"]}
    assert online == offline_manifest(tmp_path, kind, fetched)
    assert online["origin"]["commit"] == COMMIT
    assert "consolidated.safetensors" not in online["files"] and "README.md" not in online["files"]
    # the snapshot came over HTTP: revision, tree, then the files
    assert hub.requests("GET", "/revision/main$") and hub.requests("GET", "/tree/")
    assert len(hub.requests("GET", "/resolve/")) == len(online["files"])


def test_gated_repo_without_access_says_how_to_get_it(tmp_path, hub):
    hub.repos[("models", MODEL)].tokens = (TOKEN,)
    manifest, result = fetch(tmp_path, hub, check=False)
    line = failed(result, manifest)
    assert f"model tiny: hub repo {MODEL}@main: the repo is gated and the hub refused access (HTTP 401)" in line
    assert "with no token set" in line and f"accept its terms on {hub.url}/{MODEL}" in line
    assert "hf auth login" in line and "HF_TOKEN" in line

    manifest, result = fetch(tmp_path, hub, check=False, HF_TOKEN="hf_tokenWithoutAccess")
    line = failed(result, manifest)
    assert "(HTTP 403) with a token (HF_TOKEN or `hf auth login`) that has no access" in line
    assert "hf_tokenWithoutAccess" not in result.stderr

    manifest, _ = fetch(tmp_path, hub, HF_TOKEN=TOKEN)
    assert json.loads(manifest.read_text())["origin"]["commit"] == COMMIT


@pytest.mark.parametrize(
    "source, message",
    [
        (
            {"hub": "test-org/Missing", "revision": "main"},
            "model tiny: hub repo test-org/Missing@main: no such repo at http://127.0.0.1:",
        ),
        (
            {"hub": MODEL, "revision": "v9"},
            f"model tiny: hub repo {MODEL}@v9: the repo has no revision v9 (HTTP 404); fix source.hub/revision",
        ),
    ],
)
def test_missing_repo_or_revision_is_named(tmp_path, hub, source, message):
    manifest, result = fetch(tmp_path, hub, source=source, check=False)
    assert message in failed(result, manifest)


def test_a_listed_file_the_hub_does_not_serve_is_named(tmp_path, hub):
    hub.fault("*", f"/resolve/{COMMIT}/config.json$", "status", times=99, status=404,
              headers={"X-Error-Code": "EntryNotFound"})  # fmt: skip
    manifest, result = fetch(tmp_path, hub, check=False)
    line = failed(result, manifest)
    assert "the hub lists a file it does not serve (HTTP 404" in line and "config.json" in line


def test_server_errors_and_rate_limits_are_retried_until_the_run_completes(tmp_path, hub):
    reference, _ = fetch(tmp_path / "reference", hub)
    hub.log.clear()
    hub.fault("GET", "/revision/main$", "status", times=2, status=503)
    hub.fault("GET", "/tree/", "status", times=1, status=500)
    hub.fault("GET", f"/resolve/{COMMIT}/{SHARD}$", "status", times=2, status=429, headers={"Retry-After": "1"})
    hub.fault("GET", f"/resolve/{COMMIT}/config.json$", "status", times=1, status=502)
    manifest, result = fetch(tmp_path / "faulty", hub)
    assert manifest.read_bytes() == reference.read_bytes()
    assert [r["status"] for r in hub.requests("GET", "/revision/main$")] == [503, 503, 200]
    assert [r["status"] for r in hub.requests("GET", f"/resolve/{COMMIT}/{SHARD}$")] == [429, 429, 200]
    # a 5xx on a file download ends the client's snapshot: this workflow tries it again, the complete files kept
    assert [r["status"] for r in hub.requests("GET", f"/resolve/{COMMIT}/config.json$")] == [502, 200]
    # the revision's retries are this workflow's (the client has none for it), logged as such
    assert "HTTP 503 from" in result.stderr and "trying again in" in result.stderr


def test_a_dropped_connection_resumes_and_the_file_is_byte_identical(tmp_path, hub):
    # the client resumes from whole 10 MiB chunks it has received: a shard of about 33 MB, dropped half way
    folder = tmp_path / "larger"
    folder.mkdir()
    write_demo_checkpoint("mistral", folder, seed=7, overrides={**TINY_SHAPES["mistral"], "hidden_size": 512})
    hub.add(Repo("models", MODEL, COMMIT, folder_files(folder)))
    reference, _ = fetch(tmp_path / "reference", hub)
    hub.log.clear()
    hub.fault("GET", f"/resolve/{COMMIT}/{SHARD}$", "drop")
    manifest, result = fetch(tmp_path / "dropped", hub)
    assert manifest.read_bytes() == reference.read_bytes()
    ranges = [r["range"] for r in hub.requests("GET", f"/resolve/{COMMIT}/{SHARD}$")]
    assert len(ranges) == 2 and ranges[0] is None, ranges
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at < len(hub.repos[("models", MODEL)].files[SHARD]) // 2 + 1
    assert "Trying to resume download" in result.stderr  # the client's own retry, not this workflow's


def test_altered_bytes_are_refused_removed_and_fetched_anew(tmp_path, hub):
    hub.fault("GET", f"/resolve/{COMMIT}/{SHARD}$", "alter")
    manifest, result = fetch(tmp_path, hub, check=False)
    line = failed(result, manifest)
    expected = hub.repos[("models", MODEL)].etag(SHARD)
    assert f"model tiny: hub repo {MODEL}@main (commit {COMMIT}): {SHARD} arrived with sha256 " in line
    assert f"but the hub gives {expected}: refused and removed from the hub cache" in line
    assert not list((tmp_path / "hub-cache").rglob(expected))

    manifest, _ = fetch(tmp_path, hub)
    assert json.loads(manifest.read_text())["files"][SHARD]["sha256"] == expected


def test_a_hub_that_stops_answering_times_out(tmp_path, hub):
    hub.fault("GET", "/revision/main$", "stall", times=99)
    started = time.monotonic()
    manifest, result = fetch(tmp_path, hub, check=False, VACC_HUB_RETRIES="1")
    line = failed(result, manifest)
    assert time.monotonic() - started < 30
    assert f"hub repo {MODEL}@main: the hub at {hub.url} could not be reached (ReadTimeout" in line
    assert "after 1 retries" in line


def test_no_network_says_the_hub_could_not_be_reached(tmp_path):
    manifest, result = fetch(tmp_path, None, "dataset", check=False, VACC_HUB_RETRIES="0")
    line = failed(result, manifest)
    assert "the hub at http://hub.invalid could not be reached (ConnectError:" in line
    assert "local hub cache" in line and "not in the local hub cache" not in line


# the dataset repo through fetch_dataset: a file checked by its git blob sha1 (not LFS), the retries, a gated repo
C4_TRAIN = DATASET_FILES["c4"][1]["train"]


def test_a_dataset_file_with_altered_bytes_is_refused_by_its_git_blob_sha1(tmp_path, hub):
    hub.fault("GET", f"/datasets/{DATASET}/resolve/{COMMIT}/{C4_TRAIN}$", "alter")
    manifest, result = fetch(tmp_path, hub, "dataset", check=False)
    line = failed(result, manifest)
    expected = hub.repos[("datasets", DATASET)].etag(C4_TRAIN)
    assert f"dataset tiny: {C4_TRAIN}" in line and f"{DATASET}@main (commit {COMMIT}): {C4_TRAIN} arrived" in line
    assert "with git blob sha1 " in line and f"but the hub gives {expected}" in line
    manifest, _ = fetch(tmp_path, hub, "dataset")
    assert manifest.exists()


def test_a_dataset_fetch_retries_and_equals_an_undisturbed_one(tmp_path, hub):
    reference, _ = fetch(tmp_path / "reference", hub, "dataset")
    hub.fault("GET", f"/api/datasets/{DATASET}/revision/main$", "status", times=1, status=500)
    hub.fault("GET", f"/datasets/{DATASET}/resolve/{COMMIT}/{C4_TRAIN}$", "status", times=1, status=503)
    manifest, _ = fetch(tmp_path / "faulty", hub, "dataset")
    assert manifest.read_bytes() == reference.read_bytes()
    assert [r["status"] for r in hub.requests("GET", f"/resolve/{COMMIT}/{C4_TRAIN}$")] == [200, 503, 200]


def test_a_gated_dataset_says_how_to_get_access(tmp_path, hub):
    hub.repos[("datasets", DATASET)].tokens = (TOKEN,)
    manifest, result = fetch(tmp_path, hub, "dataset", check=False)
    line = failed(result, manifest)
    assert "the repo is gated and the hub refused access (HTTP 401) with no token set" in line
    assert f"accept its terms on {hub.url}/datasets/{DATASET} with your account" in line
