"""``MANIFEST.json``: what a finished output folder holds (size and sha256 of each file), written last."""

from pathlib import Path

from workflow_scripts.core.files import atomic_write_json, sha256_file
from workflow_scripts.core.progress import Progress

MANIFEST_NAME = "MANIFEST.json"
LARGE_FOLDER_BYTES = 1 << 30  # hashing a folder this large takes seconds: its progress is logged


def describe_files(folder, names):
    """``{name: {size, sha256}}`` for files in ``folder``, logging progress on large sets."""
    folder = Path(folder)
    entries = {}
    total = sum((folder / name).stat().st_size for name in names)
    progress = Progress(f"hashing {folder.name}", total, " GB", 1e9)
    for name in sorted(names):
        path = folder / name
        entries[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        if total > LARGE_FOLDER_BYTES:
            progress.advance(entries[name]["size"])
    return entries


def write_folder_manifest(folder, header):
    """Write ``MANIFEST.json``: ``header`` plus the size and sha256 of every file below ``folder``."""
    folder = Path(folder)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    manifest = {**header, "files": describe_files(folder, names)}
    atomic_write_json(folder / MANIFEST_NAME, manifest)
    return manifest
