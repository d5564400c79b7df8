"""Processes by /proc: the runner's worker among our ancestors, and whether a pid is still the same process."""
from __future__ import annotations

import os
from typing import Optional, Tuple

WORKER_COMM = "Runner.Worker"


def stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(comm, ppid, start time in clock ticks) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may hold spaces and parentheses: it ends at the last ')'
    comm = data[data.index(b"(") + 1:data.rindex(b")")].decode("utf-8", "replace")
    rest = data[data.rindex(b")") + 2:].split()
    return comm, int(rest[1]), int(rest[19])


def find_ancestor(comm: str = WORKER_COMM, start: Optional[int] = None) -> Optional[int]:
    """The nearest ancestor of start (default: this process) whose comm is `comm`."""
    me = pid = start if start is not None else os.getpid()
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        st = stat(pid)
        if st is None:
            return None
        if st[0] == comm and pid != me:
            return pid
        pid = st[1]
    return None


def alive(pid: int, start_time: int) -> bool:
    """Is pid the process that started at start_time (not a later one that reused the pid)?"""
    st = stat(pid)
    return st is not None and st[2] == start_time and not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2:].split()[0] in (b"Z", b"X")
