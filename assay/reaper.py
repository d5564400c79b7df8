"""Killing processes of the scope: the graceful kill switch, the end of scope, and the watchdog
that ends the scope if the monitor itself dies.

Every signal goes through a pidfd, so a pid recycled by an unrelated process is never signalled.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import structlog

log = structlog.get_logger("assay.reaper")

Emit = Callable[[dict], None]


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _signal(pidfd: int, sig: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except (ProcessLookupError, OSError):
        return False


def kill_now(pid: int) -> None:
    """SIGKILL through a pidfd (never a recycled pid): trigger_kill in immediate mode, sent by the
    monitor for a decision that could not signal (a cgroup program)."""
    fd = _pidfd(pid)
    if fd is not None:
        try:
            _signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)


def _is_live_process(pid: int) -> bool:
    """A thread-group leader that has not exited (zombies can do nothing any more)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            tgid = next(int(line.split()[1]) for line in f if line.startswith(b"Tgid:"))
    except (OSError, StopIteration, ValueError):
        return False
    state = stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3]
    return tgid == pid and state not in (b"Z", b"X")


def members(pids: Iterable[int], exclude: Iterable[int] = ()) -> List[int]:
    """The live processes among the scope map's keys (which also hold thread ids)."""
    skip = set(exclude)
    return sorted(p for p in set(pids) if p not in skip and _is_live_process(p))


def killed_event(ts: str, pid: int, sig: str, reason: str, rule: str = "", comm: str = "") -> dict:
    ev = {"type": "process_killed", "ts": ts, "pid": pid, "comm": comm or _comm(pid), "signal": sig,
          "reason": reason}
    if rule:
        ev["rule"] = rule
    return ev


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


class GracefulKills:
    """trigger_kill in graceful mode: SIGTERM now, SIGKILL when the rule's grace period ends."""

    def __init__(self, emit: Emit, ts: Callable[[], str]):
        self._emit, self._ts = emit, ts
        self._pending: Dict[int, Tuple[int, float, str]] = {}   # pid -> (pidfd, deadline, rule)
        self._done: set = set()

    def start(self, pid: int, rule: str, grace_s: float) -> None:
        if pid in self._pending or pid in self._done:
            return
        fd = _pidfd(pid)
        if fd is None or not _signal(fd, signal.SIGTERM):
            if fd is not None:
                os.close(fd)
            log.warning("graceful kill: process already gone", pid=pid)
            return
        self._pending[pid] = (fd, time.monotonic() + grace_s, rule)
        self._emit(killed_event(self._ts(), pid, "SIGTERM", "kill_switch", rule))

    def reap(self) -> None:
        now = time.monotonic()
        for pid, (fd, deadline, rule) in list(self._pending.items()):
            if now < deadline:
                continue
            del self._pending[pid]
            self._done.add(pid)
            try:
                if _signal(fd, signal.SIGKILL):
                    self._emit(killed_event(self._ts(), pid, "SIGKILL", "kill_switch", rule))
            finally:
                os.close(fd)

    def __bool__(self) -> bool:
        return bool(self._pending)


class ScopeEnd:
    """When the command exits, what is left in the scope gets SIGTERM, then SIGKILL after the
    grace period, until nothing is left (a process forking while it dies is caught by a rescan)."""

    def __init__(self, list_members: Callable[[], List[int]], emit: Emit, ts: Callable[[], str], grace_s: float):
        self._list, self._emit, self._ts, self.grace_s = list_members, emit, ts, grace_s
        self._termed: Dict[int, int] = {}   # pid -> pidfd
        self.deadline: Optional[float] = None
        self.survivors = 0

    def start(self) -> None:
        self.deadline = time.monotonic() + self.grace_s
        self._term_new(self._list())

    def _term_new(self, left: List[int]) -> None:
        for pid in left:
            if pid in self._termed:
                continue
            fd = _pidfd(pid)
            if fd is None:
                continue
            comm = _comm(pid)
            if _signal(fd, signal.SIGTERM):
                self._termed[pid] = fd
                self._emit(killed_event(self._ts(), pid, "SIGTERM", "scope_end", comm=comm))
            else:
                os.close(fd)

    def step(self) -> bool:
        """Called from the event loop; True once the scope is empty."""
        left = self._list()
        if not left:
            self._close()
            return True
        self._term_new(left)  # children forked since the last step
        if time.monotonic() < self.deadline:
            return False
        self.kill_all(left)
        return not self._list()

    def kill_all(self, left: List[int], rounds: int = 50) -> None:
        killed: set = set()   # a dying process can look alive for a moment: report it once
        for _ in range(rounds):
            for pid in left:
                fd = self._termed.pop(pid, None) or _pidfd(pid)
                if fd is None:
                    continue
                comm = _comm(pid)
                try:
                    if _signal(fd, signal.SIGKILL) and pid not in killed:
                        killed.add(pid)
                        self._emit(killed_event(self._ts(), pid, "SIGKILL", "scope_end", comm=comm))
                finally:
                    os.close(fd)
            time.sleep(0.01)
            left = self._list()
            if not left:
                break
        self.survivors = len(left)
        self._close()

    def _close(self) -> None:
        for fd in self._termed.values():
            os.close(fd)
        self._termed.clear()


class Watchdog:
    """A process forked from the monitor, outside the scope, that holds the scope map (and the
    monitor's other BPF descriptors, so enforcement stays on meanwhile). If the monitor dies
    without saying goodbye (kill -9, a crash), it SIGKILLs every process in the scope, then exits,
    and only then does the kernel detach the programs."""

    def __init__(self, list_members: Callable[[], List[int]]):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            _watch(r, list_members)
            os._exit(0)
        os.close(r)
        self.pid, self._w = pid, w

    def stand_down(self) -> None:
        """The monitor ends the scope itself: the watchdog exits without killing anything."""
        if self._w is None:
            return
        try:
            os.write(self._w, b"q")
        except OSError:
            pass
        os.close(self._w)
        self._w = None
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _watch(r: int, list_members: Callable[[], List[int]]) -> None:
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    try:
        ctypes.CDLL(None).prctl(15, b"assay-watchdog", 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass
    try:
        got = os.read(r, 1)
    except OSError:
        got = b""
    if got == b"q":
        return
    for _ in range(200):
        left = list_members()
        if not left:
            return
        for pid in left:
            fd = _pidfd(pid)
            if fd is not None:
                _signal(fd, signal.SIGKILL)
                os.close(fd)
        time.sleep(0.01)
