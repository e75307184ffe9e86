"""Fault injection for the fault tests: loaded by every Python process that has this folder on PYTHONPATH.

With ``VACC_TEST_PAUSE_AT`` set to a glob, the first process that opens a
matching file for writing records its pid in the file ``VACC_TEST_PAUSED`` and
stops there, before the open: a test can then kill it at a known point of its
work, however fast the stage is. With ``VACC_TEST_RELEASE`` set, the process
goes on once that file exists.

With ``VACC_TEST_ENOSPC_AT`` set to globs (separated by ``os.pathsep``), each
process's first opening of a matching file for writing fails as on a full disk:
``OSError(ENOSPC)`` naming the file, before anything is created. A real full
disk fails a ``write()`` instead, with no file named and part of the file
written; so the stand-in checks what the stage says, what it removes and how
its rerun goes, while the tests that fill a small tmpfs (``test_disk_full.py``)
check a real ``write()``. Opens made by C++ or Rust code (torch's archive
writer, the safetensors writer) raise no audit event and are not seen here.

The product never sees any of this: without the variables the hook is not
installed.
"""

import errno
import fnmatch
import os
import sys
import time

PATTERN = os.environ.get("VACC_TEST_PAUSE_AT")
FULL_AT = [glob for glob in os.environ.get("VACC_TEST_ENOSPC_AT", "").split(os.pathsep) if glob]
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _written_path(args):
    """The path an ``open`` audit event writes to, or None (reads, file descriptors)."""
    path, mode, flags = args
    if path is None or isinstance(path, int):
        return None
    writes = any(c in mode for c in "wax+") if mode is not None else bool(flags & WRITE_FLAGS)
    return os.path.abspath(os.fsdecode(path)) if writes else None


def _pause():
    marker = os.environ["VACC_TEST_PAUSED"]
    with open(f"{marker}.tmp", "w") as handle:
        handle.write(str(os.getpid()))
    os.replace(f"{marker}.tmp", marker)
    release = os.environ.get("VACC_TEST_RELEASE")
    while not (release and os.path.exists(release)):
        time.sleep(0.05)


def _hook(event, args):
    if event != "open":
        return
    if PATTERN and not _paused:
        path = _written_path(args)
        if path is not None and fnmatch.fnmatch(path, PATTERN):
            _paused.append(path)
            _pause()
    if FULL_AT and not _filled:
        path = _written_path(args)
        if path is not None and any(fnmatch.fnmatch(path, glob) for glob in FULL_AT):
            _filled.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


if PATTERN or FULL_AT:
    _paused, _filled = [], []
    sys.addaudithook(_hook)
