"""Pieces every stage shares: clear errors, logging, atomic files, hashing, links."""

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from workflow_scripts.core.errors import InputError


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path, chunk_bytes=16 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def remove_leftovers(final, *patterns):
    """Remove what a killed run left beside ``final`` (``patterns`` name it from ``final``'s name).

    A SIGKILL skips every cleanup, so a rerun clears the temporary files and
    staging folders of the same output before making its own; they are never
    read. Snakemake's lock keeps two runs from sharing a folder.
    """
    for pattern in patterns:
        for leftover in Path(final).parent.glob(pattern.format(name=glob.escape(Path(final).name))):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside ``path``; it becomes ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path, ".{name}.*.tmp")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_json(path, data):
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path, what="JSON file"):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{what} {path} is not valid JSON: {error}") from None


@contextlib.contextmanager
def staged_directory(final):
    """Yield an empty staging folder beside ``final``; on success it replaces ``final`` whole.

    The swap is two renames, so at every instant ``final`` is either the old
    complete folder, absent, or the new complete folder. On error the staging
    folder is removed and ``final`` is left absent: a failed rebuild must not
    leave the previous result looking current.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final, ".{name}.staging-*", ".{name}.retired-*")
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    retired = final.parent / f".{final.name}.retired-{os.getpid()}"
    if final.exists() or final.is_symlink():
        os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def link_file(source, target):
    """Hardlink ``source`` to ``target`` (same file system), else symlink; return the method used."""
    source = Path(source).resolve()
    try:
        os.link(source, target)
        return "hardlink"
    except OSError:
        os.symlink(source, target)
        return "symlink"
