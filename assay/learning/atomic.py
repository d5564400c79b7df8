"""Atomic I/O: write by rename, and the exclusive lock file that serialises profile updates."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from typing import Iterator


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive flock on PATH.lock. The lock file is left in place: unlinking it would race."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)        # closing drops the lock
