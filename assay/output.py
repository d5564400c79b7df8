"""The event stream writer: never blocks the monitor for long, never dies of its reader.

The workload may share the terminal or pipe the events go to. The writer opens its own file
description where it can (so O_NONBLOCK set by the workload does not reach it), waits a bounded time
on a full pipe, and counts what it cannot write instead of raising: a monitor that died of EAGAIN,
ENOSPC or EPIPE would take enforcement with it while the workload runs on.
"""
from __future__ import annotations

import collections
import errno
import os
import select
import stat
import time
from typing import Deque, Dict

MAX_PENDING = 16 << 20      # bytes held for a slow or full output before new events are dropped
BATCH = 64 << 10            # bytes gathered before a write is attempted


def own_description(fd: int) -> int:
    """A new open file description for what fd points to, where that is possible (pipes, FIFOs,
    terminals); otherwise a plain duplicate (a regular file, where O_NONBLOCK means nothing, or a
    socket)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return os.dup(fd)
    if stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        try:
            return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            pass
    new = os.dup(fd)
    os.set_inheritable(new, False)
    return new


class EventWriter:
    """Line-oriented, batched writes to a file descriptor it owns."""

    def __init__(self, fd: int, path: "str | None" = None):
        self.fd = fd
        self.path = path            # a file given by --output: reopened on request (logrotate)
        self.reopened = 0
        self._lines: Deque[bytes] = collections.deque()
        self._size = 0
        self._offset = 0            # bytes of the first pending line already written
        self.lost = 0               # lines that never reached the output
        self.errors: Dict[str, int] = collections.Counter()
        self.closed = False         # the reader is gone (EPIPE): later lines are counted as lost

    @classmethod
    def to_path(cls, path: str, append: bool = False) -> "EventWriter":
        how = os.O_APPEND if append else os.O_TRUNC
        return cls(os.open(path, os.O_WRONLY | os.O_CREAT | how | os.O_CLOEXEC, 0o644), path)

    def reopen(self, wait_s: float = 1.0) -> "str | None":
        """Opens the --output path again (appending; logrotate has moved the old file away) and
        writes to it from now on. Lines pending are flushed to the old file first, as far as it
        takes them in wait_s; what it does not take goes to the new one, so no line is lost (a line
        the old file took only part of is written whole to the new one). Returns an error, or None."""
        if self.path is None:
            return None
        self.flush(wait_s)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self.errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
            return f"cannot reopen {self.path}: {e.strerror}; still writing to the file it had open"
        old, self.fd = self.fd, fd
        self._offset = 0
        self.reopened += 1
        try:
            os.close(old)
        except OSError:
            pass
        return None

    @classmethod
    def to_stdout(cls) -> "EventWriter":
        return cls(own_description(1))

    def write(self, line: str) -> None:
        if self.closed or self._size > MAX_PENDING:
            self.lost += 1
            return
        data = line.encode("utf-8", "backslashreplace") + b"\n"  # whatever the locale says
        self._lines.append(data)
        self._size += len(data)
        if self._size >= BATCH:
            self.flush(0)

    def flush(self, wait_s: float = 0.0) -> None:
        """Writes what is pending; waits up to wait_s for a full pipe to drain."""
        deadline = None
        while self._lines and not self.closed:
            first = self._lines[0]
            chunk = first[self._offset:] if self._offset else first
            # join a few lines per write without copying everything every time
            if len(self._lines) > 1 and len(chunk) < BATCH:
                parts = [chunk]
                n = len(chunk)
                for line in list(self._lines)[1:64]:
                    parts.append(line)
                    n += len(line)
                    if n >= BATCH:
                        break
                chunk = b"".join(parts)
            try:
                written = os.write(self.fd, chunk)
            except BlockingIOError:
                if deadline is None:
                    deadline = _now() + wait_s
                left = deadline - _now()
                if left <= 0:
                    return
                _wait_writable(self.fd, left)
                continue
            except InterruptedError:
                continue
            except BrokenPipeError:
                self.errors["EPIPE"] += 1
                self._drop_all()
                self.closed = True
                return
            except OSError as e:  # ENOSPC, EIO, EFBIG, EDQUOT...: keep the lines, try again later
                self.errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
                return
            self._consume(written)

    def _consume(self, n: int) -> None:
        while n and self._lines:
            first = self._lines[0]
            rest = len(first) - self._offset
            if n >= rest:
                n -= rest
                self._lines.popleft()
                self._size -= len(first)
                self._offset = 0
            else:
                self._offset += n
                n = 0

    def _drop_all(self) -> None:
        self.lost += len(self._lines)
        self._lines.clear()
        self._size = 0
        self._offset = 0

    def close(self, wait_s: float = 2.0) -> None:
        """Last flush (bounded), then whatever is left counts as lost."""
        self.flush(wait_s)
        self._drop_all()
        try:
            os.close(self.fd)
        except OSError:
            pass


def _now() -> float:
    return time.monotonic()


def _wait_writable(fd: int, timeout_s: float) -> None:
    p = select.poll()
    p.register(fd, select.POLLOUT)
    try:
        p.poll(max(1, int(timeout_s * 1000)))
    except InterruptedError:
        pass


def say(text: str, fd: int = 2) -> None:
    """A line for people on stderr that can never raise (stderr may be gone or non-blocking)."""
    data = (text + "\n").encode("utf-8", "backslashreplace")
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass
