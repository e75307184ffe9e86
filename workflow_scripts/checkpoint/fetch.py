"""A model's checkpoint files, fetched from a hub repo at a pinned revision or a local folder into its folder
(stage 1, download).

A hub repo goes through ``huggingface_hub.snapshot_download`` into the hub cache (which resumes interrupted
downloads and serves ``HF_HUB_OFFLINE=1``), then is linked into place; a local folder is linked. Only weights,
metadata and tokenizer files are taken (pickled weights only with ``allow_pickle``). Both are fillers of
:func:`workflow_scripts.checkpoint.assemble.assemble_checkpoint`.
"""

import logging
from pathlib import Path

from workflow_scripts.checkpoint.folder import METADATA_PATTERNS, PICKLE_PATTERNS, WEIGHT_PATTERNS
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.fetch import local_origin
from workflow_scripts.core.files import link_file
from workflow_scripts.core.hub import hub_snapshot

LOG = logging.getLogger(__name__)


def fetch_patterns(allow_pickle):
    return list(WEIGHT_PATTERNS + METADATA_PATTERNS + (PICKLE_PATTERNS if allow_pickle else ()))


def link_matching(source_folder, patterns, staging):
    """Link the top-level files of ``source_folder`` that match ``patterns``; return the methods used."""
    from huggingface_hub.utils import filter_repo_objects

    names = [p.name for p in Path(source_folder).iterdir() if p.is_file()]
    return {
        link_file(Path(source_folder) / name, staging / name)
        for name in filter_repo_objects(names, allow_patterns=patterns)
    }


def fetch_hub(model, source, staging):
    repo, revision = source["hub"], source["revision"]
    patterns = fetch_patterns(source.get("allow_pickle", False))
    LOG.info("model %s: fetching %s@%s (files: %s)", model, repo, revision, ", ".join(patterns))
    snapshot, commit = hub_snapshot(
        repo, revision, patterns, f"model {model}: hub repo {repo}@{revision}", "source.hub/revision"
    )
    methods = link_matching(snapshot, patterns, staging)
    return {"hub": repo, "revision": revision, "commit": commit}, methods


def fetch_local(model, source, staging):
    folder = Path(source["local"])
    if not folder.is_dir():
        raise InputError(f"model {model}: source.local {folder} is not a folder")
    methods = link_matching(folder, fetch_patterns(source.get("allow_pickle", False)), staging)
    return local_origin(folder), methods
