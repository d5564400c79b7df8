"""A workload for enforcement tests: runs file operations from a JSON plan, reports each result.

Usage: python3 probe.py PLAN.json RESULTS.json. Each step is {"name", "op", ...}; results map
name -> "ok" or the errno name. Kept dependency-free: it runs under the monitor inside guests.
"""
import ctypes
import errno
import json
import os
import signal
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437}[os.uname().machine]


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _open(path, flags=os.O_RDONLY):
    os.close(os.open(path, flags))


def _openat2(path):
    how = OpenHow(flags=os.O_RDONLY | os.O_CLOEXEC)
    fd = libc.syscall(SYS_OPENAT2, -100, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    os.close(fd)


def _procfd(path):
    # O_PATH skips security_file_open; the reopen through /proc/self/fd is a real open.
    fd = os.open(path, os.O_PATH)
    try:
        _open(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _as_user(uid, path):
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(uid)
            os.setuid(uid)
            _open(path)
            os._exit(0)
        except OSError as e:
            os._exit(100 + e.errno)
    _, st = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(st)
    if code:
        raise OSError(code - 100, os.strerror(code - 100))


def _in_grandchild(path):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        gpid = os.fork()
        if gpid == 0:
            try:
                _open(path)
                os.write(w, b"0")
            except OSError as e:
                os.write(w, str(e.errno).encode())
            os._exit(0)
        os.waitpid(gpid, 0)
        os._exit(0)
    os.waitpid(pid, 0)
    os.close(w)
    code = int(os.read(r, 16) or b"0")
    os.close(r)
    if code:
        raise OSError(code, os.strerror(code))


def run_step(step):
    op, path = step["op"], step.get("path")
    if op == "open":
        _open(path)
    elif op == "create":
        with open(path, "w") as f:
            f.write("new\n")
    elif op == "rename":
        os.rename(step["src"], path)
    elif op == "openat2":
        _openat2(path)
    elif op == "procfd":
        _procfd(path)
    elif op == "as_user":
        _as_user(step["uid"], path)
    elif op == "grandchild":
        _in_grandchild(path)
    elif op == "ignore_sigterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif op == "sleep":
        time.sleep(step["seconds"])
    else:
        raise ValueError(f"unknown op {op}")


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    results = {}
    for step in plan:
        try:
            run_step(step)
            results[step["name"]] = "ok"
        except OSError as e:
            results[step["name"]] = errno.errorcode.get(e.errno, str(e.errno))
        # written after every step: a killed probe still reports how far it got
        with open(sys.argv[2] + ".tmp", "w") as f:
            json.dump(results, f)
        os.replace(sys.argv[2] + ".tmp", sys.argv[2])


if __name__ == "__main__":
    main()
