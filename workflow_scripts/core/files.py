"""Pieces every stage shares: clear errors, logging, atomic files, hashing, links."""

import contextlib
import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from workflow_scripts.core.errors import DiskFull, InputError, StageError

LOG = logging.getLogger(__name__)

# The errors of a write that found its file system full, and how a message says each.
FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# Below this much free space, an output's write that failed with an error that names no cause (torch's archive
# writer gives no errno: "enforce fail at inline_container.cc ... unexpected pos") is taken to have found the disk
# full.
LOW_SPACE_BYTES = 1 << 20


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


def disk_free(path):
    """The bytes an unprivileged writer may still use on the file system of ``path`` (or of its nearest existing
    folder), or None where that cannot be read."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def full_reason(error):
    """How a message says the full disk that ``error`` (or an error it was raised from) reports, or None.

    An ``OSError`` carries its errno; the safetensors writer (Rust) reports one as text, ``No space left on
    device (os error 28)``. A :class:`StageError` is a message of its own, kept as it is."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull):
            return error.reason
        if isinstance(error, StageError):
            return None
        if isinstance(error, OSError) and error.errno in FULL:
            return FULL[error.errno]
        text = str(error)
        for number, reason in FULL.items():
            if os.strerror(number) in text or f"os error {number})" in text:
                return reason
        error = error.__cause__ or error.__context__
    return None


def disk_full(error, path, needed=None, written=None):
    """``error`` as a :class:`DiskFull` said of ``path`` when it reports a full disk, else None; one already
    said of a path (by an inner :func:`writing`) is kept. ``needed``: the bytes the write needed, when known;
    else ``written``, the bytes its file held when it failed, is a lower bound.

    An error that names no file (a failed ``write()``, a library's message) while ``path``'s file system still
    reports room may have come from another file system (the hub cache, the compiler's temporary files): it is
    said so."""
    if isinstance(error, DiskFull):
        return error
    reason = full_reason(error)
    if reason is None:
        return None
    free = disk_free(path)
    named = isinstance(error, OSError) and error.filename is not None
    elsewhere = not named and reason == FULL[errno.ENOSPC] and free is not None and free >= LOW_SPACE_BYTES
    if needed is None and written:
        return DiskFull(path, free, written, at_least=True, elsewhere=elsewhere, reason=reason)
    return DiskFull(path, free, needed, elsewhere=elsewhere, reason=reason)


def _full_or_low(error, path, written=None):
    """:func:`disk_full`, or, for an error that names no cause (torch's C++ archive writer gives no errno) on a
    file system with less than ``LOW_SPACE_BYTES`` free, a :class:`DiskFull` too; the original error then goes to
    the log with its traceback. A :class:`StageError` is a deliberate message and is kept."""
    full = disk_full(error, path, written=written)
    if full is not None or isinstance(error, StageError) or not isinstance(error, Exception):
        return full
    free = disk_free(path)
    if free is None or free >= LOW_SPACE_BYTES:
        return None
    LOG.error(
        "writing %s failed with %d bytes free on its file system: taken as a full disk",
        path,
        free,
        exc_info=error,
    )
    return DiskFull(path, free, written or None, at_least=bool(written))


def check_free_space(folder, needed):
    """Refuse to write ``folder`` (:class:`DiskFull`, before anything is written) unless its file system has
    ``needed`` bytes free: for a stage that knows its output's size in advance."""
    free = disk_free(folder)
    LOG.info("%s: %d bytes to write, %s bytes free on its file system", folder, needed, free)
    if free is not None and needed > free:
        raise DiskFull(folder, free, needed, early=True)


@contextlib.contextmanager
def writing(path, needed=None, at_least=False):
    """Say a full disk met in the block as a :class:`DiskFull` of ``path`` (``needed``: its size, when known;
    ``at_least``: a lower bound of it).

    A failed ``write()`` names no file; this names the one being written. Around :func:`atomic_path`, it adds
    the size to what that says of a temporary file it could not make or fill."""
    try:
        yield
    except Exception as error:
        full = disk_full(error, path, needed)
        if full is None:
            raise
        if needed is not None and (full.needed is None or (full.at_least and full.needed < needed)):
            full = full.but(needed=needed, at_least=at_least)
        elif full is error:
            raise
        raise full from error


def _size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary name beside ``path``; it becomes ``path`` only when the block succeeds.

    On any error the temporary file is removed; a full disk is said as a :class:`DiskFull` of ``path``."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path, ".{name}.*.tmp")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as error:
        full = _full_or_low(error, path, _size(tmp) if tmp else None)
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if full is None:
            raise
        raise full from error


def atomic_write_text(path, text):
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    data = text.encode("utf-8")
    with writing(path, len(data)), atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
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
    leave the previous result looking current. A full disk met in the block is said as a :class:`DiskFull` of
    the file in ``final`` that was being written (or of ``final`` itself), never of the staging folder, which is
    gone when the message is read.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final, ".{name}.staging-*", ".{name}.retired-*")
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    os.chmod(staging, 0o777 & ~_umask())
    try:
        yield staging
    except BaseException as error:
        named = getattr(error, "path" if isinstance(error, DiskFull) else "filename", None)
        full = _full_or_low(error, staging if named is None or isinstance(named, int) else Path(os.fsdecode(named)))
        if full is not None:
            full = full.but(path=_in_final(full.path, staging, final))
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        if full is None:
            raise
        raise full from error
    retired = final.parent / f".{final.name}.retired-{os.getpid()}"
    if final.exists() or final.is_symlink():
        os.replace(final, retired)
    os.replace(staging, final)
    shutil.rmtree(retired, ignore_errors=True)


def _in_final(path, staging, final):
    """``path`` with the staging folder's part of it replaced by ``final`` (the staging folder itself becomes
    ``final``); a path outside it is kept."""
    path = Path(path)
    try:
        return final / Path(os.path.abspath(path)).relative_to(os.path.abspath(staging))
    except ValueError:
        return path


def link_file(source, target):
    """Hardlink ``source`` to ``target`` (same file system), else symlink; return the method used."""
    source = Path(source).resolve()
    try:
        os.link(source, target)
        return "hardlink"
    except OSError:
        os.symlink(source, target)
        return "symlink"
