"""Calibration shards and evaluation windows read as ``datasets.Dataset`` rows."""

import json

import pytest
import torch
from safetensors.torch import save_file

from workflow_scripts.core.errors import InputError
from workflow_scripts.data.provenance import write_token_tensors
from workflow_scripts.data.token_datasets import token_dataset


def test_a_calibration_shard_reads_as_input_ids_and_attention_mask(tmp_path):
    ids = torch.randint(0, 32000, (6, 16), dtype=torch.int32)
    mask = torch.ones(6, 16, dtype=torch.int8)
    mask[2, 10:] = 0
    provenance = json.dumps({"dataset": "c4", "tokenizer_fingerprint": "0123456789abcdef"})
    save_file({"input_ids": ids, "attention_mask": mask}, tmp_path / "c4.safetensors", {"provenance": provenance})
    rows = token_dataset(tmp_path / "c4.safetensors")
    assert rows.column_names == ["input_ids", "attention_mask"] and len(rows) == 6
    assert rows.info.description == provenance
    torch_rows = rows.with_format("torch")[:]
    assert torch.equal(torch_rows["input_ids"], ids.long()) and torch.equal(torch_rows["attention_mask"], mask.long())
    assert len(token_dataset(tmp_path / "c4.safetensors", limit=4)) == 4


def test_evaluation_windows_are_every_position_a_token(tmp_path):
    ids = torch.randint(0, 32000, (3, 8), dtype=torch.int32)
    made_by = {"dataset": "c4", "tokenizer_fingerprint": "0123456789abcdef"}
    record = {**made_by, "settings": {"nsamples": 3, "seqlen": 8}}
    write_token_tensors({"input_ids": ids.numpy()}, record, tmp_path / "windows.safetensors", tmp_path / "windows.json")
    dataset = token_dataset(tmp_path / "windows.safetensors")
    assert json.loads(dataset.info.description) == made_by  # the file's own provenance, not its whole record
    rows = dataset.with_format("torch")[:]
    assert torch.equal(rows["input_ids"], ids.long()) and bool(rows["attention_mask"].eq(1).all())


def test_a_file_without_token_ids_is_named(tmp_path):
    save_file({"weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors: has no input_ids"):
        token_dataset(tmp_path / "model.safetensors")
    save_file({"input_ids": torch.zeros(2, 4, dtype=torch.int32)}, tmp_path / "ids.safetensors")
    with pytest.raises(InputError, match=r"ids.safetensors: has no 'provenance' metadata naming the tokenizer"):
        token_dataset(tmp_path / "ids.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x01")
    with pytest.raises(InputError, match=r"broken.safetensors: not a readable safetensors file"):
        token_dataset(tmp_path / "broken.safetensors")
