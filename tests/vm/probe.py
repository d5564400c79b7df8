"""A workload for enforcement tests: runs file operations from a JSON plan, reports each result.

Usage: python3 probe.py PLAN.json RESULTS.json. Each step is {"name", "op", ...}; results map
name -> "ok" or the errno name. Kept dependency-free: it runs under the monitor inside guests.
"""
import ctypes
import errno
import json
import os
import signal
import subprocess
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


def _in_child(fn):
    """Runs fn() in a forked child; its OSError is raised here, by errno."""
    pid = os.fork()
    if pid == 0:
        try:
            fn()
            os._exit(0)
        except OSError as e:
            os._exit(100 + e.errno)
    _, st = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(st)
    if code:
        raise OSError(code - 100, os.strerror(code - 100))


def _as_user(uid, path):
    def drop_and_open():
        os.setgid(uid)
        os.setuid(uid)
        _open(path)
    _in_child(drop_and_open)


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


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]


def _by_handle(path):
    """name_to_handle_at, then open_by_handle_at through the filesystem's root: no path walk."""
    h = FileHandle(handle_bytes=128)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, os.fsencode(path), ctypes.byref(h), ctypes.byref(mount_id), 0) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    mfd = os.open(_mount_point(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = libc.open_by_handle_at(mfd, ctypes.byref(h), os.O_RDONLY)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        os.close(fd)
    finally:
        os.close(mfd)


def _mount_point(path):
    p = os.path.realpath(path)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def _uring_openat(path):
    """One IORING_OP_OPENAT through io_uring: the open runs in the kernel's own worker context."""
    NR_SETUP, NR_ENTER = 425, 426

    class Offsets(ctypes.Structure):
        _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                    ("ring_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("dropped", ctypes.c_uint32),
                    ("array", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("resv2", ctypes.c_uint64)]

    class CqOffsets(ctypes.Structure):
        _fields_ = [("head", ctypes.c_uint32), ("tail", ctypes.c_uint32), ("ring_mask", ctypes.c_uint32),
                    ("ring_entries", ctypes.c_uint32), ("overflow", ctypes.c_uint32), ("cqes", ctypes.c_uint32),
                    ("flags", ctypes.c_uint32), ("resv1", ctypes.c_uint32), ("resv2", ctypes.c_uint64)]

    class Params(ctypes.Structure):
        _fields_ = [("sq_entries", ctypes.c_uint32), ("cq_entries", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                    ("sq_thread_cpu", ctypes.c_uint32), ("sq_thread_idle", ctypes.c_uint32),
                    ("features", ctypes.c_uint32), ("wq_fd", ctypes.c_uint32), ("resv", ctypes.c_uint32 * 3),
                    ("sq_off", Offsets), ("cq_off", CqOffsets)]

    import mmap
    p = Params()
    ring = libc.syscall(NR_SETUP, 1, ctypes.byref(p))
    if ring < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    try:
        sq = mmap.mmap(ring, p.sq_off.array + p.sq_entries * 4, offset=0)
        sqes = mmap.mmap(ring, 64 * p.sq_entries, offset=0x10000000)
        cq = mmap.mmap(ring, p.cq_off.cqes + p.cq_entries * 16, offset=0x8000000)
        raw = ctypes.create_string_buffer(os.fsencode(path))
        sqe = bytearray(64)
        sqe[0] = 18                                   # IORING_OP_OPENAT
        sqe[4:8] = (-100 & 0xFFFFFFFF).to_bytes(4, "little")            # fd: AT_FDCWD
        sqe[16:24] = ctypes.addressof(raw).to_bytes(8, "little")        # addr: the path
        sqe[28:32] = (os.O_RDONLY).to_bytes(4, "little")                 # open_flags
        sqes[0:64] = bytes(sqe)
        tail = int.from_bytes(sq[p.sq_off.tail:p.sq_off.tail + 4], "little")
        mask = int.from_bytes(sq[p.sq_off.ring_mask:p.sq_off.ring_mask + 4], "little")
        sq[p.sq_off.array + (tail & mask) * 4:p.sq_off.array + (tail & mask) * 4 + 4] = (0).to_bytes(4, "little")
        sq[p.sq_off.tail:p.sq_off.tail + 4] = (tail + 1).to_bytes(4, "little")
        if libc.syscall(NR_ENTER, ring, 1, 1, 1, None, 0) < 0:     # IORING_ENTER_GETEVENTS
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        head = int.from_bytes(cq[p.cq_off.head:p.cq_off.head + 4], "little")
        cmask = int.from_bytes(cq[p.cq_off.ring_mask:p.cq_off.ring_mask + 4], "little")
        off = p.cq_off.cqes + (head & cmask) * 16
        res = int.from_bytes(cq[off + 8:off + 12], "little", signed=True)
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        os.close(res)
    finally:
        os.close(ring)


def _in_chroot(root, path):
    def enter_and_open():
        os.chroot(root)
        os.chdir("/")
        _open(path)
    _in_child(enter_and_open)


def _run(argv, exe=None):
    """Runs a program; its exec failing is this step's error (its own exit status is not)."""
    pid = os.fork()
    if pid == 0:
        try:
            os.execv(exe or argv[0], argv)
        except OSError as e:
            os._exit(100 + e.errno)
    _, st = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(st) if os.WIFEXITED(st) else 0
    if code >= 100:
        raise OSError(code - 100, os.strerror(code - 100))
    if code:
        raise OSError(errno.EPERM, f"exited {code}")


def _execveat(path):
    fd = os.open(path, os.O_PATH)
    pid = os.fork()
    if pid == 0:
        ret = libc.syscall(322, fd, b"", (ctypes.c_char_p * 2)(os.fsencode(path), None),
                           (ctypes.c_char_p * 1)(None), 0x1000)   # execveat(fd, "", AT_EMPTY_PATH)
        os._exit(100 + ctypes.get_errno() if ret < 0 else 0)
    os.close(fd)
    _, st = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(st)
    if code >= 100:
        raise OSError(code - 100, os.strerror(code - 100))


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
    elif op == "link":
        os.link(step["src"], path)
    elif op == "symlink":
        os.symlink(step["src"], path)
    elif op == "mkdir":
        os.makedirs(path, exist_ok=True)
    elif op == "bind":
        subprocess.run(["mount", "--bind", step["src"], path], check=True)
    elif op == "umount":
        subprocess.run(["umount", "-l", path], check=True)
    elif op == "handle":
        _by_handle(path)
    elif op == "uring":
        _uring_openat(path)
    elif op == "chroot":
        _in_chroot(step["root"], path)
    elif op == "run":
        _run(step["argv"], step.get("exe"))
    elif op == "execveat":
        _execveat(path)
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
