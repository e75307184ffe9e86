"""A dataset's named files, fetched from a hub dataset repo or a local folder into its folder (stage 3, fetch).

A dataset's format (c4, alpaca or ceval) names its files: exactly the files the
vendor recipe names are fetched, with ``snapshot_download`` (repo type dataset,
only those files) into the hub cache as the model download does, then linked
into place, keeping their paths in the repo; a local folder holding the same
paths works the same way. Both are fillers of
:func:`workflow_scripts.data.assemble.assemble_dataset`.
"""

import logging
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.fetch import local_origin
from workflow_scripts.core.files import link_file
from workflow_scripts.core.hub import hub_snapshot
from workflow_scripts.data.datasets import DATASET_FILES

LOG = logging.getLogger(__name__)


def link_named_files(paths, folder, staging):
    """Link each of ``paths`` from ``folder`` to the same path in ``staging``; return the methods used."""
    methods = set()
    for path in paths:
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        methods.add(link_file(folder / path, staging / path))
    return methods


def fetch_hub(dataset, data_format, source, staging):
    repo, revision = source["hub"], source["revision"]
    paths = list(DATASET_FILES[data_format][1].values())
    LOG.info("dataset %s: fetching %s from %s@%s", dataset, ", ".join(paths), repo, revision)
    what = f"dataset {dataset}: {', '.join(paths)} of {repo}@{revision}"
    snapshot, commit = hub_snapshot(repo, revision, paths, what, f"datasets.{dataset}.source", repo_type="dataset")
    # the hub skips a named file the repo lacks; offline, a snapshot may lack a file never fetched
    missing = [path for path in paths if not (snapshot / path).is_file()]
    if missing:
        raise InputError(
            f"dataset {dataset}: {repo}@{revision} (commit {commit}) has no {', '.join(missing)}, or the local hub "
            f"cache lacks it: fetch it online, or fix datasets.{dataset}.source"
        )
    return {"hub": repo, "revision": revision, "commit": commit}, link_named_files(paths, snapshot, staging)


def fetch_local(dataset, data_format, source, staging):
    folder = Path(source["local"])
    paths = list(DATASET_FILES[data_format][1].values())
    for path in paths:
        if not (folder / path).is_file():
            raise InputError(f"dataset {dataset}: {folder / path} does not exist (datasets.{dataset}.source.local)")
    return local_origin(folder), link_named_files(paths, folder, staging)
