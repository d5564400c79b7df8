"""The recorder: decoded monitor events in, one deduplicated and counted run record out."""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, Mapping, Optional, Tuple

from assay import __version__
from assay.learning.atomic import atomic_write
from assay.learning.constants import AT_FDCWD, FILE_OPEN, NET_CONNECT, PROC_EXEC
from assay.learning.generalisation import generalise
from assay.learning.run import (Run, RunHeader, RunItem, dump_run, format_dest, format_name_dest, new_run_id,
                                normalise_path)
from assay.learning.times import canonical_time, now_utc


def _proc_cwd(pid: int) -> Optional[str]:
    return _proc_link(f"/proc/{pid}/cwd")


def _proc_fd_path(pid: int, fd: int) -> Optional[str]:
    return _proc_link(f"/proc/{pid}/fd/{fd}")


def _proc_link(link: str) -> Optional[str]:
    try:
        target = os.readlink(link)
    except OSError:
        return None
    # A gone or unreachable directory reads back decorated or not absolute: unknown, not guessed.
    if not target.startswith("/") or target.endswith(" (deleted)"):
        return None
    return target


class RunRecorder:
    """Collects decoded monitor events into one run record; dedups and counts, writes atomically.

    Events are the decoder's dicts: open (path, ret, pid, dfd), connect (family, addr, port), exec (filename).
    Failed opens are not recorded: they never reach the LSM file_open hook, so a policy need not allow them.
    Connects are recorded whatever their result: the LSM connect hook runs before the result is known.
    """

    def __init__(self, path: str, fingerprint: str, *, run_id: Optional[str] = None,
                 started: Optional[str] = None, assay_version: str = __version__,
                 cwd_of: Callable[[int], Optional[str]] = _proc_cwd,
                 fd_path_of: Callable[[int, int], Optional[str]] = _proc_fd_path):
        self.path = path
        started = canonical_time(started) if started else now_utc()
        self.header = RunHeader(run_id or new_run_id(started), started, assay_version, fingerprint)
        self._cwd_of, self._fd_path_of = cwd_of, fd_path_of
        self._hits: Dict[Tuple[str, str, bool], int] = {}
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self.header.run_id

    def _resolve(self, path: str, pid: Optional[int], dfd: int = AT_FDCWD) -> Tuple[str, bool]:
        if path.startswith("/"):
            return normalise_path(path), False
        base = None
        if pid is not None:
            base = self._cwd_of(pid) if dfd == AT_FDCWD else self._fd_path_of(pid, dfd)
        if base is None:
            return path, True
        return normalise_path(os.path.join(base, path)), False

    def feed(self, ev: Mapping) -> Optional[RunItem]:
        """Count one event; returns the item it counted as, or None if it is not learned."""
        t = ev.get("type")
        if t == "open":
            path, ret = ev.get("path"), ev.get("ret", 0)
            if not path or (isinstance(ret, int) and ret < 0):
                return None
            dfd = ev.get("dfd", AT_FDCWD)
            value, rel = self._resolve(_text(path), ev.get("pid"), AT_FDCWD if dfd is None else dfd)
            return self._count(FILE_OPEN, value, rel)
        if t == "exec":
            path = ev.get("filename")
            if not path:
                return None
            value, rel = self._resolve(_text(path), ev.get("pid"))
            return self._count(PROC_EXEC, _program_behind(value), rel)
        if t == "connect":
            if ev.get("family") not in ("inet", "inet6") or ev.get("addr") is None:
                return None
            try:
                if ev.get("name"):   # the DNS proxy saw a name lead to this address: learn the name
                    value = format_name_dest(str(ev["name"]), int(ev.get("port", 0)))
                else:
                    value = format_dest(str(ev["addr"]), int(ev.get("port", 0)))
            except ValueError:
                return None
            return self._count(NET_CONNECT, value, False)
        return None

    def _count(self, kind: str, value: str, relative: bool) -> RunItem:
        key = (kind, value, relative)
        with self._lock:
            self._hits[key] = n = self._hits.get(key, 0) + 1
        return RunItem(kind, value, n, relative)

    def run(self) -> Run:
        with self._lock:
            items = [RunItem(k, v, n, r) for (k, v, r), n in self._hits.items()]
        return Run(self.header, tuple(sorted(items)))

    def write(self) -> Run:
        run = self.run()
        atomic_write(self.path, dump_run(run).encode("ascii"))
        return run


def _text(s: "str | bytes") -> str:
    return s.decode("utf-8", "surrogateescape") if isinstance(s, bytes) else s


def _program_behind(path: str) -> str:
    """A program run through a symbolic link in a scratch directory is learned by what it runs:
    the /tmp/** the link's own path generalises to says nothing of where it points (exec rules
    follow links to their target, which may lie anywhere)."""
    if generalise(PROC_EXEC, path) == path or not os.path.islink(path):
        return path
    target = os.path.realpath(path)
    return target if generalise(PROC_EXEC, target) == target else path
