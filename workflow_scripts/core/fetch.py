"""What the fetch stages of models and datasets share: their arguments and assembling a folder (the hub client's
use is :mod:`workflow_scripts.core.hub`)."""

import argparse
import json
import logging
from pathlib import Path

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
