"""Calibration datasets on disk: the files of each format (c4, ceval, alpaca), their folder and manifest."""

from pathlib import Path

from workflow_scripts.core.errors import InputError

# format -> (the vendor recipe's hub repo, {role: file path in the repo}); a dataset of that format has these files
DATASET_FILES = {
    "c4": (
        "allenai/c4",
        {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
    "ceval": ("ceval/ceval-exam", {"archive": "ceval-exam.zip"}),
    "alpaca": ("yahma/alpaca-cleaned", {"train": "alpaca_data_cleaned.json"}),
}


FORMATS = tuple(DATASET_FILES)


def dataset_file(folder, data_format, role):
    """Path of one of a fetched dataset's files by its format, e.g. ``dataset_file(folder, "c4", "train")``."""
    return Path(folder) / DATASET_FILES[data_format][1][role]


def dataset_format(dataset, data_format=None):
    """``data_format``, or for the datasets named after their format (c4, alpaca, ceval) that name."""
    data_format = data_format or dataset
    if data_format not in DATASET_FILES:
        raise InputError(f"dataset {dataset}: unknown format {data_format!r} (known: {', '.join(FORMATS)})")
    return data_format
