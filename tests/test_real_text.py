"""python-docs: real English from Python's own documentation, in c4's (and alpaca's) formats, and datasets by id."""

import gzip
import hashlib
import json
import sys

import pytest
from safetensors.numpy import load_file
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate
from test_config import SCHEMA, validated
from tokenizers import Tokenizer

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import sha256_file
from workflow_scripts.data import demo_datasets as dataset_demo
from workflow_scripts.data import python_docs as dataset_python_docs
from workflow_scripts.data.assemble import assemble_dataset
from workflow_scripts.data.calibration import CalibrationSettings, build_shard
from workflow_scripts.data.datasets import DATASET_FILES
from workflow_scripts.data.provenance import read_provenance
from workflow_scripts.data.readers import C4Lines, read_alpaca

from conftest import TINY_SHAPES, embedded_default, run_stage
from workflow_copy import Workflow

TRAIN, VALIDATION = (DATASET_FILES["c4"][1][role] for role in ("train", "validation"))
SHARED_RUN = 64


def make(folder, data_format="c4", dataset="python-docs"):
    return assemble_dataset(dataset, {"python_docs": True}, folder, dataset_python_docs.generate, data_format)


@pytest.fixture(scope="module")
def python_docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("datasets") / "python-docs"
    make(folder)
    return folder


def records(path):
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def test_manifest_records_the_interpreter_and_regenerating_gives_the_same_bytes(python_docs, tmp_path):
    manifest = json.loads((python_docs / "MANIFEST.json").read_text())
    origin = manifest["origin"]
    assert origin["python_docs"] is True and origin["python"] == sys.version
    assert origin["documents"] == {
        "train": len(records(python_docs / TRAIN)),
        "validation": len(records(python_docs / VALIDATION)),
    }
    assert manifest["roles"] == DATASET_FILES["c4"][1]
    for path, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(python_docs / path)
    make(tmp_path / "again")
    for name in (TRAIN, VALIDATION, "MANIFEST.json"):
        assert (tmp_path / "again" / name).read_bytes() == (python_docs / name).read_bytes(), name


def test_files_are_c4_json_lines_read_by_the_c4_reader(python_docs):
    for path in (python_docs / TRAIN, python_docs / VALIDATION):
        assert path.read_bytes()[4:8] == b"\0\0\0\0"  # gzip mtime 0: the bytes do not depend on when
        lines = records(path)
        assert all(set(line) == {"text", "timestamp", "url"} for line in lines)
        assert all(line["url"].startswith(("python-docs://topics/", "python-docs://stdlib/")) for line in lines)
        assert [text for _, text in C4Lines(path)] == [line["text"] for line in lines]
        assert all(len(line["text"]) >= dataset_python_docs.MIN_CHARS for line in lines)
    urls = {line["url"] for line in records(python_docs / TRAIN)}
    assert {"python-docs://topics/for", "python-docs://stdlib/json"} & urls  # both kinds of document


def test_validation_is_disjoint_from_train(python_docs):
    train, validation = records(python_docs / TRAIN), records(python_docs / VALIDATION)
    assert len(validation) >= 20 and len(train) >= 200
    assert not {line["url"] for line in train} & {line["url"] for line in validation}
    train_text = "\0".join(line["text"] for line in train)
    # no validation run of 64 characters occurs in the train file: every one of them, against every train run
    runs = {line["text"][i : i + SHARED_RUN] for line in validation for i in range(len(line["text"]) - SHARED_RUN + 1)}
    shared = [
        train_text[i : i + SHARED_RUN]
        for i in range(len(train_text) - SHARED_RUN + 1)
        if train_text[i : i + SHARED_RUN] in runs
    ]
    assert shared == []
    assert len({line["text"] for line in train}) == len(train)  # and no text twice


def test_split_is_by_name_and_drops_validation_paragraphs_seen_in_train():
    shared = "Return the approximate size of the queue, which is not reliable across threads."
    names = [f"stdlib/m{i}" for i in range(200)]
    held = [name for name in names if dataset_python_docs.in_validation(name)]
    assert 5 < len(held) < 40  # about 10%
    own = {name: " ".join(hashlib.sha256(f"{name} {i}".encode()).hexdigest() for i in range(10)) for name in names}
    found = {name: own[name] + "\n\n" + shared for name in names}
    train, validation = dataset_python_docs.split(found)
    assert sorted(validation) == sorted(held) and not set(train) & set(validation)
    assert validation == {name: own[name] for name in validation}
    assert train == {name: found[name] for name in train}


def test_a_calibration_shard_and_evaluation_windows_build_from_it(python_docs, tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints["mistral"]
    fingerprint = sha256_file(folder / "tokenizer.json")[:16]
    settings = CalibrationSettings(nsamples=144, seqlen=512, seed=0)
    tensors, record = build_shard("python-docs", python_docs, folder, fingerprint, settings, "c4")
    assert tensors["input_ids"].shape == (144, 512) and tensors["attention_mask"].all()
    assert record["dataset"] == "python-docs" and record["format"] == "raw text window"
    assert record["source_origin"]["python"] == sys.version
    assert record["stats"]["records_eligible"] >= 144

    windows, window_record = tmp_path / "w.safetensors", tmp_path / "w.json"
    run_stage(
        "c4_evaluation_windows",
        "--files",
        python_docs / "MANIFEST.json",
        "--tokenizer",
        folder / "tokenizer.json",
        "--fingerprint",
        fingerprint,
        "--settings",
        json.dumps({"nsamples": 32, "seqlen": 512}),
        "--output",
        windows,
        "--record",
        window_record,
    )
    ids = load_file(windows)["input_ids"]
    assert ids.shape == (32, 512)
    assert read_provenance(windows) == {"dataset": "python-docs", "tokenizer_fingerprint": fingerprint}
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    used = json.loads(window_record.read_text())["documents_used"]
    texts = [line["text"] for line in records(python_docs / VALIDATION)][:used]
    stream = [token for text in texts for token in tokenizer.encode(text).ids]
    assert ids.reshape(-1).tolist() == stream[: 32 * 512]


def test_alpaca_format_from_train_documents_only(tmp_path, python_docs, tiny_checkpoints):
    make(tmp_path / "python-docs-alpaca", "alpaca", "python-docs-alpaca")
    path = tmp_path / "python-docs-alpaca" / DATASET_FILES["alpaca"][1]["train"]
    entries = read_alpaca(path)
    train = "\0".join(line["text"] for line in records(python_docs / TRAIN))
    validation = {line["text"] for line in records(python_docs / VALIDATION)}
    assert len(entries) == len(records(python_docs / TRAIN))
    assert all(entry["output"] in train for entry in entries)
    assert not any(entry["output"] in text for entry in entries for text in validation)
    folder = tiny_checkpoints["mistral"]
    tensors, record = build_shard(
        "python-docs-alpaca",
        tmp_path / "python-docs-alpaca",
        folder,
        sha256_file(folder / "tokenizer.json")[:16],
        CalibrationSettings(nsamples=16, seqlen=128, seed=0),
        "alpaca",
    )
    assert tensors["input_ids"].shape == (16, 128) and record["format"] == "Alpaca prompt with response"


def test_python_docs_gives_no_ceval_files(tmp_path):
    with pytest.raises(InputError, match="dataset x: a python_docs source gives c4 or alpaca files, not ceval"):
        make(tmp_path / "x", "ceval", "x")
    assert not (tmp_path / "x").exists()


def test_demo_text_is_keyed_by_id_and_format(tmp_path):
    """A second c4-format demo dataset has c4's paths and a text of its own; c4 itself is unchanged."""
    assemble_dataset("c4", {"demo": True}, tmp_path / "c4", dataset_demo.generate)
    assemble_dataset("other", {"demo": True}, tmp_path / "other", dataset_demo.generate, "c4")
    mine, other = (records(tmp_path / name / TRAIN) for name in ("c4", "other"))
    assert len(mine) == len(other) == 320 and mine != other
    with pytest.raises(InputError, match="dataset other: unknown format 'other'"):
        assemble_dataset("other", {"demo": True}, tmp_path / "none", dataset_demo.generate)


# ---- config ------------------------------------------------------------------------------------------------------


def smollm2_like(config):
    """A model that uses python-docs everywhere a dataset is named (the shipped config defines python-docs)."""
    config["models"]["small"] = {
        "source": {"demo": "mistral"},
        "quantize": {"gptq-int8": {"datasets": ["python-docs"]}},
        "vamc": {"dataset": "python-docs"},
        "evaluate": {"dataset": "python-docs"},
    }
    return config


def test_shipped_python_docs_dataset_and_a_model_using_it_validate():
    config = validated(smollm2_like(embedded_default()))
    docs = config["datasets"]["python-docs"]
    assert docs == {
        "format": "c4",
        "source": {"python_docs": True},
        "split": "train",
        "nsamples": 144,
        "seqlen": 512,
        "seed": 0,
        "evaluation": {"nsamples": 16, "seqlen": 512},
    }
    assert [config["datasets"][d]["format"] for d in ("c4", "alpaca", "ceval")] == ["c4", "alpaca", "ceval"]
    assert config["models"]["demo-mistral"]["evaluate"]["dataset"] == "c4"
    # a new id takes its format's defaults
    config = validated(
        {"targets": [], "models": {"m": {"source": {"demo": "mistral"}}}, "datasets": {"mine": {"format": "ceval"}}}
    )
    assert config["datasets"]["mine"] == {
        "format": "ceval",
        "source": {"demo": True},
        "split": "dev",
        "nsamples": 128,
        "seqlen": 128,
        "seed": 0,
    }


@pytest.mark.parametrize(
    "datasets, named",
    [
        ({"mine": {"source": {"demo": True}}}, "'format' is a required property"),
        ({"mine": {"format": "jsonl"}}, "'jsonl' is not one of ['c4', 'alpaca', 'ceval']"),
        ({"mine": {"format": "c4", "split": "validation"}}, "['datasets']['mine']['split']"),
        ({"mine": {"format": "ceval", "split": "train"}}, "['datasets']['mine']['split']"),
        ({"c4": {"format": "alpaca"}}, "['datasets']['c4']['format']"),
        ({"My_Data": {"format": "c4"}}, "'My_Data' does not match"),
    ],
)
def test_schema_refuses_a_bad_dataset_naming_it(datasets, named):
    config = embedded_default()
    config["datasets"] = datasets
    with pytest.raises(WorkflowError) as error:
        validate(config, SCHEMA)
    assert named in str(error.value)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["models"]["demo-mistral"].update(quantize={"gptq-int8": {"datasets": ["c4", "wiki"]}}),
            r"models\.demo-mistral\.quantize\.gptq-int8\.datasets\[1\] = wiki"
            r" is not under datasets \(known: alpaca, c4, ",
        ),
        (
            lambda c: c["models"]["demo-mistral"].update(vamc={"dataset": "wiki"}),
            r"models\.demo-mistral\.vamc\.dataset = wiki is not under datasets",
        ),
        (
            lambda c: c["models"]["demo-mistral"]["evaluate"].update(dataset="ceval"),
            r"models\.demo-mistral\.evaluate\.dataset = ceval has format ceval, but perplexity windows come from the "
            r"validation file of a dataset of format c4",
        ),
        (
            lambda c: c["datasets"].update(mine={"format": "ceval", "source": {"python_docs": True}}),
            r"datasets\.mine\.source\.python_docs gives c4 or alpaca files,"
            r" not the ceval format of datasets\.mine\.format",
        ),
        (
            lambda c: c["datasets"].update(mine={"format": "alpaca", "evaluation": {"seqlen": 256}}),
            r"datasets\.mine\.evaluation applies to a c4-format dataset only",
        ),
        (
            lambda c: c["datasets"]["python-docs"].update(evaluation={"nsamples": 65536, "seqlen": 131072}),
            r"datasets\.python-docs\.evaluation: nsamples x seqlen = 65536 x 131072 exceeds",
        ),
        (
            lambda c: c["datasets"].update(mine={"format": "c4", "source": {"python_docs": True, "seed": 1}}),
            r"datasets\.mine\.source\.seed does not apply to a python_docs source",
        ),
    ],
)
def test_dataset_relations_are_checked_naming_the_key(change, message):
    config = embedded_default()
    change(config)
    with pytest.raises(InputError, match=message):
        validated(config)


# ---- wiring ------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_model_on_python_docs_gets_its_shard_windows_and_vamc_dataset(tmp_path):
    """After its download, a model on python-docs plans python-docs' fetch, shard and windows; never alpaca's
    or ceval's shards, nor c4's files; its int8 build config names c4, the format vamc reads."""
    config = smollm2_like(embedded_default())
    config["models"]["small"]["source"]["shape"] = TINY_SHAPES["mistral"]
    config["targets"] = ["small"]
    config["models"] = {"small": config["models"]["small"]}
    flow = Workflow(tmp_path, config)
    flow.run("resources/models/small/MANIFEST.json")
    plan = flow.run("--dry-run", "--printshellcmds", "small")
    jobs = flow.planned("small")
    datasets = {wildcards.split("dataset=")[1] for rule, wildcards in jobs if "dataset=" in wildcards}
    assert datasets == {"python-docs", "ceval"}, jobs
    rules = {rule for rule, wildcards in jobs if "python-docs" in wildcards}
    assert rules == {"fetch_dataset", "calibration_shard", "c4_evaluation_windows"}
    assert ("fetch_dataset", "dataset=ceval") in jobs  # the ceval evaluation set
    assert "workflow_scripts.stages.fetch_dataset_python_docs --dataset python-docs --format c4" in plan
    assert "python-docs-validation.safetensors" in plan
    assert '--dataset resources/datasets/python-docs/MANIFEST.json --calibration \'{"name": "c4"' in plan
