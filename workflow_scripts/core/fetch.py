"""What the fetch stages of models and datasets share: their arguments, hub errors, and assembling a folder."""

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path

from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import staged_directory
from workflow_scripts.core.manifest import write_folder_manifest

LOG = logging.getLogger(__name__)


def fetch_arguments(argv, doc, subject, choices=None, formats=None):
    """``--<subject> NAME [--format F] --source JSON --manifest PATH``; ``--format`` where ``formats`` are given."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(f"--{subject}", required=True, choices=choices)
    if formats:
        parser.add_argument("--format", choices=formats, help="its files' format (default: the id)")
    parser.add_argument("--source", required=True, type=json.loads, help=f"the {subject}'s source settings as JSON")
    parser.add_argument("--manifest", required=True, type=Path, help=f"MANIFEST.json inside the {subject} folder")
    return parser.parse_args(argv)


def hub_token():
    """HF_TOKEN when set: private and gated repos. It is passed to the hub client, never written anywhere."""
    return os.environ.get("HF_TOKEN") or None


@contextlib.contextmanager
def hub_errors(what, fix):
    """Turn the hub client's errors about ``what`` into one-line input errors that say what to ``fix``."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionResolutionError

    try:
        yield
    except (LocalEntryNotFoundError, RevisionResolutionError) as error:
        offline = " with HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise InputError(
            f"{what} is not in the local hub cache{offline} ({error.__class__.__name__}); "
            f"fetch it online first or fix {fix}"
        ) from None
    except HfHubHTTPError as error:
        raise InputError(f"cannot fetch {what}: {error}") from None


def hub_snapshot(repo, revision, patterns, what, fix, repo_type="model"):
    """``(folder, commit)``: the snapshot folder in the hub cache of the files of hub repo ``repo`` at ``revision``
    that match ``patterns`` (``snapshot_download``: interrupted downloads resume, ``HF_HUB_OFFLINE=1`` reads the
    cache), and the commit the revision resolved to, as the hub answered it (offline: the cache's ``refs/``).
    Errors name ``what`` and the setting to ``fix`` (:func:`hub_errors`)."""
    from huggingface_hub import HfApi, snapshot_download

    token = hub_token()
    with hub_errors(what, fix):
        # resolved once, so the files and the recorded commit are the same commit whatever the branch does meanwhile
        resolved = HfApi(token=token).resolve_revision(repo, repo_type=repo_type, revision=revision)
        folder = snapshot_download(repo, repo_type=repo_type, revision=resolved, allow_patterns=patterns, token=token)
    return Path(folder), resolved.resolved


def local_origin(folder):
    return {"local": str(Path(folder).resolve())}


def assemble(subject, name, folder, fill, check, header=None):
    """Build ``folder`` in a staging folder swapped in whole: ``fill(staging) -> (origin, link methods)``, then
    ``check(staging, origin) -> extra header``, then ``MANIFEST.json`` (written last). Return the manifest."""
    with staged_directory(folder) as staging:
        origin, methods = fill(staging)
        checked = check(staging, origin)
        manifest = write_folder_manifest(
            staging, {subject: name, "origin": origin, "link": sorted(methods), **(header or {}), **checked}
        )
    LOG.info("%s %s: %d files in %s", subject, name, len(manifest["files"]), folder)
    return manifest
