"""Calibration data: fetching, reading, sampling and tokenizing, and every kind of bad input."""

import gzip
import io
import json
import zipfile

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import sha256_file
from workflow_scripts.data import demo_datasets as dataset_demo
from workflow_scripts.data.assemble import assemble_dataset
from workflow_scripts.data.calibration import CalibrationSettings, build_shard
from workflow_scripts.data.datasets import DATASET_FILES
from workflow_scripts.data.provenance import read_provenance, write_token_tensors
from workflow_scripts.data.readers import C4Lines, read_alpaca, read_ceval
from workflow_scripts.data.tokenizers import load_tokenizer

from conftest import add_to_hub_cache, run_stage, stage_env

SMALL = {
    "c4": {"split": "train", "nsamples": 16, "seqlen": 256, "seed": 0},
    "alpaca": {"split": "train", "nsamples": 16, "seqlen": 128, "seed": 0},
    "ceval": {"split": "dev", "nsamples": 16, "seqlen": 96, "seed": 0},
}


@pytest.fixture(scope="session")
def demo_datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    for dataset in DATASET_FILES:
        assemble_dataset(dataset, {"demo": True}, root / dataset, dataset_demo.generate)
    return root


def fingerprint(folder):
    return sha256_file(folder / "tokenizer.json")[:16]


@pytest.fixture(scope="session")
def tokenizers(tiny_checkpoints):
    return {preset: (folder, fingerprint(folder)) for preset, folder in tiny_checkpoints.items()}


def shard(demo_datasets, tokenizers, dataset, preset="mistral", **overrides):
    folder, print_ = tokenizers[preset]
    return build_shard(
        dataset, demo_datasets / dataset, folder, print_, CalibrationSettings.of({**SMALL[dataset], **overrides})
    )


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_c4_windows_follow_the_gptq_recipe(demo_datasets, tokenizers, preset):
    tensors, record = shard(demo_datasets, tokenizers, "c4", preset)
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    assert ids.shape == mask.shape == (16, 256) and ids.dtype == np.int32 and mask.dtype == np.int8
    assert mask.all()
    tokenizer = Tokenizer.from_file(str(tokenizers[preset][0] / "tokenizer.json"))
    documents = dict(C4Lines(demo_datasets / "c4" / DATASET_FILES["c4"][1]["train"]))
    for row, sample in zip(ids, record["samples"], strict=True):
        full = tokenizer.encode(documents[sample["record"]]).ids
        assert len(full) == sample["tokens"] > 256
        assert 0 <= sample["offset"] < len(full) - 256
        assert row.tolist() == full[sample["offset"] : sample["offset"] + 256]
    assert len({sample["record"] for sample in record["samples"]}) == 16
    stats = record["stats"]
    assert stats["records_total"] == 320 and 16 <= stats["records_eligible"] < 320
    assert record["tokenizer_fingerprint"] == tokenizers[preset][1]
    assert set(record["source_files"]) == set(DATASET_FILES["c4"][1].values())


def test_record_datasets_are_formatted_truncated_and_padded(demo_datasets, tokenizers):
    tensors, record = shard(demo_datasets, tokenizers, "alpaca", seqlen=128)
    tokenizer = Tokenizer.from_file(str(tokenizers["mistral"][0] / "tokenizer.json"))
    records = read_alpaca(demo_datasets / "alpaca" / "alpaca_data_cleaned.json")
    for row, mask, sample in zip(tensors["input_ids"], tensors["attention_mask"], record["samples"], strict=True):
        kept = min(sample["tokens"], 128)
        assert mask[:kept].all() and not mask[kept:].any()
        assert (row[kept:] == record["stats"]["pad_token_id"]).all()
        text = tokenizer.decode(row[:kept].tolist())
        assert text.startswith("Below is an instruction that describes a task")
        assert records[sample["record"]]["instruction"] in text
    stats = record["stats"]
    assert stats["longer_than_seqlen"] + stats["shorter_than_seqlen"] <= 16
    assert stats["longer_than_seqlen"] > 0 and stats["shorter_than_seqlen"] > 0

    tensors, record = shard(demo_datasets, tokenizers, "ceval", "ministral")
    ministral = Tokenizer.from_file(str(tokenizers["ministral"][0] / "tokenizer.json"))
    first = ministral.decode(tensors["input_ids"][0][tensors["attention_mask"][0] == 1].tolist())
    assert "\nA. " in first and "\nD. " in first and "答案：" in first and first[-1] in "ABCD"
    assert all("/" in sample["record"] for sample in record["samples"])


@pytest.mark.parametrize("dataset", sorted(SMALL))
def test_same_seed_gives_byte_identical_shards_and_a_new_seed_does_not(demo_datasets, tokenizers, tmp_path, dataset):
    outputs = []
    for run, seed in enumerate((3, 3, 4)):
        tensors, record = shard(demo_datasets, tokenizers, dataset, seed=seed)
        write_token_tensors(tensors, record, tmp_path / f"{run}.safetensors", tmp_path / f"{run}.json")
        outputs.append(((tmp_path / f"{run}.safetensors").read_bytes(), (tmp_path / f"{run}.json").read_bytes()))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] == outputs[1][1]
    assert outputs[0][0] != outputs[2][0]


def test_demo_dataset_files_are_deterministic(tmp_path, demo_datasets):
    assemble_dataset("ceval", {"demo": True}, tmp_path / "ceval", dataset_demo.generate)
    assert (tmp_path / "ceval" / "ceval-exam.zip").read_bytes() == (
        demo_datasets / "ceval" / "ceval-exam.zip"
    ).read_bytes()


def test_evaluation_sets(demo_datasets, tokenizers, tmp_path):
    folder, print_ = tokenizers["ministral"]
    windows, record = tmp_path / "c4.safetensors", tmp_path / "c4.json"
    run_stage(
        "c4_evaluation_windows",
        "--files",
        demo_datasets / "c4" / "MANIFEST.json",
        "--tokenizer",
        folder / "tokenizer.json",
        "--fingerprint",
        print_,
        "--settings",
        json.dumps({"nsamples": 8, "seqlen": 512}),
        "--output",
        windows,
        "--record",
        record,
    )
    ids = load_file(windows)["input_ids"]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    documents = [text for _, text in C4Lines(demo_datasets / "c4" / DATASET_FILES["c4"][1]["validation"])]
    stream = [
        token
        for text in documents[: json.loads(record.read_text())["documents_used"]]
        for token in tokenizer.encode(text).ids
    ]
    assert ids.shape == (8, 512) and ids.reshape(-1).tolist() == stream[: 8 * 512]

    ceval = tmp_path / "ceval.json"
    run_stage(
        "ceval_evaluation_set",
        "--files",
        demo_datasets / "ceval" / "MANIFEST.json",
        "--tokenizer",
        folder / "tokenizer.json",
        "--fingerprint",
        print_,
        "--settings",
        json.dumps({"split": "val", "shots": 5}),
        "--output",
        ceval,
    )
    data = json.loads(ceval.read_text())
    # one provenance for every token file: in a safetensors file's metadata, at the top of a JSON one
    assert read_provenance(windows) == {"dataset": "c4", "tokenizer_fingerprint": print_}
    assert (data["dataset"], data["tokenizer_fingerprint"]) == ("ceval", print_)
    assert len(data["questions"]) == 30 * 8
    prompt = tokenizer.decode(data["questions"][0]["input_ids"])
    assert prompt.count("答案：") == 6 and prompt.endswith("答案：")
    letters = data["letter_token_ids"]
    assert [tokenizer.decode([letters[letter]]) for letter in "ABCD"] == list("ABCD")


def test_tokenizer_with_another_fingerprint_is_refused(tokenizers):
    folder, _ = tokenizers["mistral"]
    with pytest.raises(InputError, match="has fingerprint .* not the requested 0000000000000000"):
        load_tokenizer(folder, "0000000000000000")


def test_fetch_from_a_hub_cache_of_the_named_files(tmp_path, demo_datasets):
    cache = tmp_path / "hub"
    files = {path: demo_datasets / "c4" / path for path in DATASET_FILES["c4"][1].values()}
    commit = "c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4c4"
    add_to_hub_cache(cache, "allenai/c4", files, commit, kind="datasets")

    def fetch(dataset, repo):
        manifest = tmp_path / "resources" / dataset / "MANIFEST.json"
        source = json.dumps({"hub": repo, "revision": "main"})
        env = stage_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
        result = run_stage(
            "fetch_dataset", "--dataset", dataset, "--source", source, "--manifest", manifest, env=env, check=False
        )
        return manifest, result

    manifest, _ = fetch("c4", "allenai/c4")
    data = json.loads(manifest.read_text())
    assert data["origin"] == {"hub": "allenai/c4", "revision": "main", "commit": commit}
    assert sorted(data["files"]) == sorted(DATASET_FILES["c4"][1].values())
    for path, entry in data["files"].items():
        assert entry["sha256"] == sha256_file(files[path])

    manifest, missing = fetch("ceval", "ceval/ceval-exam")
    assert missing.returncode == 1
    assert "dataset ceval: ceval-exam.zip of ceval/ceval-exam@main is not in the local hub cache" in missing.stderr
    assert not manifest.parent.exists()

    # a snapshot without the named file (a repo that lacks it, or a file never fetched): named, nothing linked
    add_to_hub_cache(
        cache, "ceval/ceval-exam", {"README.md": files[DATASET_FILES["c4"][1]["train"]]}, commit, kind="datasets"
    )
    manifest, lacking = fetch("ceval", "ceval/ceval-exam")
    assert lacking.returncode == 1
    assert f"dataset ceval: ceval/ceval-exam@main (commit {commit}) has no ceval-exam.zip" in lacking.stderr
    assert not manifest.parent.exists()


# ---- bad input -------------------------------------------------------------------------------------------------


def gz(lines):
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as handle:
        handle.write("".join(lines).encode())
    return buffer.getvalue()


def c4_error(tmp_path, data):
    path = tmp_path / "c4.json.gz"
    path.write_bytes(data)
    with pytest.raises(InputError) as error:
        list(C4Lines(path))
    return str(error.value)


def test_malformed_json_line_is_named_by_file_and_line(tmp_path):
    message = c4_error(tmp_path, gz(['{"text": "fine"}\n', '{"text": "fine"}\n', '{"text": broken\n']))
    assert "c4.json.gz: line 3 is not a JSON object" in message


def test_truncated_gzip_is_refused(tmp_path):
    data = gz([json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(200)])
    assert "not a complete gzip file" in c4_error(tmp_path, data[: len(data) // 2])


def test_empty_file_and_empty_text_are_refused(tmp_path):
    assert "contains no records" in c4_error(tmp_path, gz([]))
    assert "line 2 has an empty 'text'" in c4_error(tmp_path, gz(['{"text": "a"}\n', '{"text": "  "}\n']))
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "x", "input": "", "output": ""}]))
    with pytest.raises(InputError, match="record 0 has an empty instruction or output"):
        read_alpaca(path)
    path.write_text("")
    with pytest.raises(InputError, match="alpaca.json: not valid JSON"):
        read_alpaca(path)


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return path


def test_csv_without_the_expected_columns_is_refused(tmp_path):
    path = make_zip(tmp_path / "ceval-exam.zip", {"val/math_val.csv": "id,question,A,B,C\n0,q,1,2,3\n"})
    with pytest.raises(InputError, match="val/math_val.csv lacks the column\\(s\\) D, answer"):
        read_ceval(path, "val")


@pytest.mark.parametrize("member", ["../escape/val/x_val.csv", "/abs/val/x_val.csv", "val/../../x_val.csv"])
def test_zip_members_leaving_the_archive_root_are_refused(tmp_path, member):
    path = make_zip(tmp_path / "ceval-exam.zip", {member: "id,question,A,B,C,D,answer\n0,q,1,2,3,4,A\n"})
    with pytest.raises(InputError, match="points outside the archive root"):
        read_ceval(path, "val")
    assert sorted(p.name for p in tmp_path.parent.rglob("x_val.csv")) == []


def test_fewer_usable_documents_than_nsamples_gives_both_counts(demo_datasets, tokenizers):
    with pytest.raises(
        InputError,
        match=r"only \d+ of 320 documents are longer than seqlen=2048 tokens, "
        r"fewer than nsamples=300",
    ):
        shard(demo_datasets, tokenizers, "c4", nsamples=300, seqlen=2048)
    with pytest.raises(InputError, match="has 300 records, fewer than nsamples=301"):
        shard(demo_datasets, tokenizers, "alpaca", nsamples=301)


def test_non_positive_sizes_are_refused(demo_datasets, tokenizers):
    with pytest.raises(InputError, match=r"nsamples \(0\) and seqlen \(128\) must be positive"):
        shard(demo_datasets, tokenizers, "alpaca", nsamples=0)


def test_a_failed_shard_leaves_no_partial_output(demo_datasets, tokenizers, tmp_path):
    folder, print_ = tokenizers["mistral"]
    settings = {**SMALL["c4"], "nsamples": 300, "seqlen": 2048}
    result = run_stage(
        "calibration_shard",
        "--dataset",
        "c4",
        "--files",
        demo_datasets / "c4" / "MANIFEST.json",
        "--tokenizer",
        folder / "tokenizer.json",
        "--fingerprint",
        print_,
        "--settings",
        json.dumps(settings),
        "--shard",
        tmp_path / "c4.safetensors",
        "--record",
        tmp_path / "c4.json",
        check=False,
    )
    assert result.returncode == 1 and "error: " in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
