"""A dataset's folder under ``resources/datasets/``, assembled from what a fetch stage fills in, with its manifest.

The fetch_dataset, fetch_dataset_demo and fetch_dataset_python_docs stages
differ only in how they fill the folder (workflow_scripts/data/fetch.py,
demo_datasets.py, python_docs.py); this module checks and records the result.
"""

import gzip
import io
import json

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.fetch import assemble, fetch_arguments
from workflow_scripts.data.datasets import DATASET_FILES, FORMATS, dataset_format


def gzip_json_lines(records):
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as handle:
        for record in records:
            handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return buffer.getvalue()


def assemble_dataset(dataset, source, folder, fill, data_format=None):
    """Build ``folder`` with ``fill(dataset, format, source, staging) -> (origin, link methods)``, then the manifest.

    ``data_format`` defaults to the dataset's id, for c4, alpaca and ceval.
    """
    data_format = dataset_format(dataset, data_format)
    roles = DATASET_FILES[data_format][1]

    def check(staging, origin):
        for path in roles.values():
            if (staging / path).stat().st_size == 0:
                raise InputError(f"dataset {dataset}: {path} is empty")
        return {}

    return assemble(
        "dataset", dataset, folder, lambda staging: fill(dataset, data_format, source, staging), check, {"roles": roles}
    )


def dataset_arguments(argv, doc):
    """The fetch arguments of a dataset stage, its format resolved (default: the dataset's id)."""
    args = fetch_arguments(argv, doc, "dataset", formats=FORMATS)
    args.format = dataset_format(args.dataset, args.format)
    return args
