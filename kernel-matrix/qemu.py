"""Booting one matrix guest under QEMU (TCG), shared by run.py and demo.py.

The guest's root is an initramfs: the cached rootfs cpio with a small payload cpio appended
(the kernel unpacks concatenated archives in order, later files win). The first serial line is
the console (QEMU's stdout, logged and optionally echoed). On amd64 a second one (ttyS1) is a
file that carries only the JSON result written by guest/guest.py; arm64's virt board has one
UART, so there the result comes framed on the console.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Union

import matrix
import payload
from matrix import ARCHES, Arch, Row, cache_dir

BEGIN, END = "ASSAY-VM-RESULT-BEGIN", "ASSAY-VM-RESULT-END"
# KVM hangs on the machines this project runs on (see shared/ENVIRONMENT.md): always TCG.
QEMU_ARGS = ["-m", "2048", "-smp", "2", "-nographic", "-no-reboot", "-monitor", "none", "-nic", "none"]
TCG_THREAD = "single"
GUEST_TIMEOUT_MARGIN = 45
# SeaBIOS clears the screen and the serial line adds \r: keep the echoed console plain.
TERMINAL_CONTROL = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r")
# Each TCG guest keeps about one core busy and the machines have two: a machine-wide limit,
# shared by concurrent runs (run.py, demo.py) through lock files.
MAX_VMS = 2  # the guest stops its tests this much before the host kills it


class Cpio:
    """Minimal newc writer: files are root-owned; parents are emitted before their children."""

    def __init__(self, fh):
        self.fh = fh
        self.ino = 1 << 20  # away from the inode numbers of the rootfs archive
        self.dirs = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", mtime: int = 0) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, mtime, len(data),
                  0, 0, 0, 0, len(encoded), 0]
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + encoded
        self.fh.write(head + b"\0" * (-len(head) % 4))
        self.fh.write(data + b"\0" * (-len(data) % 4))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def add_dir(self, name: str, mode: int = 0o755) -> None:
        self._parents(name)
        if name not in self.dirs:
            self.dirs.add(name)
            self._entry(name, stat.S_IFDIR | mode)

    def add_file(self, name: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        self._parents(name)
        self._entry(name, stat.S_IFREG | mode, data, mtime)

    def add_tree(self, dest: str, src: Path, keep: Callable[[Path], bool] = lambda p: True) -> None:
        self.add_dir(dest)
        for entry in sorted(src.iterdir()):
            if not keep(entry):
                continue
            name = f"{dest}/{entry.name}"
            st = entry.lstat()
            if stat.S_ISLNK(st.st_mode):
                self._parents(name)
                self._entry(name, stat.S_IFLNK | 0o777, os.readlink(entry).encode(), int(st.st_mtime))
            elif stat.S_ISDIR(st.st_mode):
                self.add_tree(name, entry, keep)
            elif stat.S_ISREG(st.st_mode):
                self.add_file(name, entry.read_bytes(), stat.S_IMODE(st.st_mode), int(st.st_mtime))

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self.fh.write(b"\0" * (-self.fh.tell() % 512))


def make_initrd(rootfs_cpio: Path, out: Path, add_payload: Callable[[Cpio], None]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with open(rootfs_cpio, "rb") as src, open(tmp, "wb") as fh:
        shutil.copyfileobj(src, fh, 1 << 20)
        fh.write(b"\0" * (-fh.tell() % 4))  # each archive header must start 4-byte aligned
        archive = Cpio(fh)
        add_payload(archive)
        archive.close()
    os.replace(tmp, out)


@dataclass
class Boot:
    returncode: Optional[int]
    timed_out: bool
    seconds: float
    console_log: Path
    result: Optional[dict]
    error: str = ""


def read_result(path: Path) -> Union[dict, str]:
    """The guest's JSON result from the result line's capture, or a reason why there is none."""
    try:
        text = path.read_bytes().decode("utf-8", "replace").replace("\r", "")
    except OSError as e:
        return f"no result file: {e}"
    if BEGIN not in text:
        return "the guest sent no result"
    body = text.rsplit(BEGIN, 1)[1]  # the last one: on a shared console, test output came first
    if END not in body:
        return "the guest's result is truncated"
    try:
        return json.loads(body.split(END, 1)[0])
    except ValueError as e:
        return f"the guest's result is not JSON: {e}"


@contextlib.contextmanager
def vm_slot() -> Iterator[None]:
    # In the temp dir, not the cache: runs with different caches still share the machine's cores.
    paths = [Path(tempfile.gettempdir()) / f"assay-kernel-matrix-vm-slot-{i}.lock" for i in range(MAX_VMS)]
    waited = False
    while True:
        for path in paths:
            fh = open(path, "w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
                fh.close()
            return
        if not waited:
            waited = True
            matrix.say("qemu", f"{MAX_VMS} VMs already running on this machine; waiting for one to end")
        time.sleep(0.5)


def qemu_argv(arch: Arch, kernel: Path, initrd: Path, lsm: str, result_file: Path) -> List[str]:
    # ASSAY_VM_APPEND is for debugging a guest, e.g. ignore_loglevel to see every kernel message.
    append = " ".join([f"console={arch.console} panic=-1 quiet rdinit=/init lsm={lsm} random.trust_cpu=on",
                       *os.environ.get("ASSAY_VM_APPEND", "").split()])
    qemu = os.environ.get(f"QEMU_{arch.name.upper()}", arch.qemu)
    tcg = os.environ.get("ASSAY_VM_TCG_THREAD", TCG_THREAD)
    argv = [qemu, "-accel", f"tcg,thread={tcg}", *QEMU_ARGS, *arch.qemu_args, "-kernel", str(kernel), "-initrd", str(initrd),
            "-append", append, "-serial", "stdio"]
    if arch.result_tty:
        argv += ["-serial", f"file:{result_file}"]
    return argv


def boot(kernel: Path, initrd: Path, lsm: str, console_log: Path, result_file: Path,
         timeout: float, echo: bool = False, arch: Arch = ARCHES["amd64"]) -> Boot:
    """Boots one VM to power-off; kills it after `timeout` seconds. Never raises on guest failure."""
    argv = qemu_argv(arch, kernel, initrd, lsm, result_file)
    if not arch.result_tty:
        result_file = console_log
    result_file.unlink(missing_ok=True)
    with vm_slot():
        return _boot(argv, console_log, result_file, timeout, echo)


# A guest kernel that says one of these is stuck for good under TCG (none was ever seen in a
# guest that went on to pass): stop it soon, so the row's second boot need not wait for the timeout.
HANG_SIGNS = ("soft lockup - CPU", "detected stall")
HANG_GRACE = 20  # seconds to let the kernel print its traces first


def _boot(argv: List[str], console_log: Path, result_file: Path, timeout: float, echo: bool) -> Boot:
    started = time.monotonic()
    hang: List[str] = []
    with open(console_log, "wb") as logf:
        logf.write(("$ " + " ".join(argv) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

        def pump() -> None:
            # Console bytes go to the log (and the terminal for the demo) as they arrive.
            line = b""
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                logf.write(chunk)
                logf.flush()
                if echo:
                    sys.stdout.buffer.write(TERMINAL_CONTROL.sub(b"", chunk))
                    sys.stdout.buffer.flush()
                if not hang:
                    *done, line = (line + chunk).split(b"\n")
                    line = line[-4096:]
                    for d in done:
                        if any(sign.encode() in d for sign in HANG_SIGNS):
                            hang.append(d.decode("utf-8", "replace").strip())
                            break

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            deadline, graced = started + timeout, False
            while proc.poll() is None:
                now = time.monotonic()
                if hang and not graced:
                    graced, deadline = True, min(deadline, now + HANG_GRACE)
                if now >= deadline:
                    timed_out = not hang
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.2)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            reader.join(timeout=10)
    seconds = time.monotonic() - started
    res = read_result(result_file)
    if isinstance(res, dict):
        return Boot(proc.returncode, timed_out, seconds, console_log, res)
    if hang:
        why = f"guest kernel hung ({hang[0]}), stopped after {seconds:.0f} s"
    else:
        why = f"killed after {timeout:.0f} s" if timed_out else res
    return Boot(proc.returncode, timed_out, seconds, console_log, None, why)


KERNEL_PROBLEMS = ("Oops", "BUG:", "Kernel panic", "hung_task", "blocked for more than", *HANG_SIGNS)
TEST_START = "assay-vm: test start "  # written to /dev/kmsg by guest/assay_vm_report.py


def kernel_problem(text: str, context: int = 30) -> dict:
    """Where a guest that gave no result went wrong: the test that was running, and the
    first kernel problem with the lines after it (its call trace)."""
    lines = text.replace("\r", "").splitlines()
    first = next((i for i, l in enumerate(lines) if any(k in l for k in KERNEL_PROBLEMS)), None)
    upto = lines if first is None else lines[:first + 1]
    started = [l.split(TEST_START, 1)[1].strip() for l in upto if TEST_START in l]
    return {
        "last_test_started": started[-1] if started else None,
        "kernel_messages": [l.strip() for l in lines if any(k in l for k in KERNEL_PROBLEMS)][:8],
        "first_problem": [] if first is None else [l.rstrip() for l in lines[first:first + context]],
    }


def console_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def console_tail(path: Path, lines: int = 40) -> str:
    text = console_text(path).replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


# --- logs of this run --------------------------------------------------------------------

KEEP_RUN_LOGS = 20
_run_dir: Optional[Path] = None
_run_dir_lock = threading.Lock()


def _pid_alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def run_log_dir() -> Path:
    """logs/<time>-<pid>/ for this process: concurrent runs must not share console or result files."""
    global _run_dir
    with _run_dir_lock:
        return _make_run_dir()


def _make_run_dir() -> Path:
    global _run_dir
    if _run_dir is None:
        for initrd in cache_dir("run").glob("*.initrd*"):  # left by killed runs: 100+ MiB each
            if not _pid_alive(initrd.name.split(".initrd")[0].rsplit(".", 1)[-1]):
                initrd.unlink(missing_ok=True)
        base = cache_dir("logs")
        old = sorted(p for p in base.iterdir() if p.is_dir())
        for stale in old[:max(0, len(old) - KEEP_RUN_LOGS + 1)]:
            shutil.rmtree(stale, ignore_errors=True)
        _run_dir = base / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        _run_dir.mkdir(parents=True, exist_ok=True)
    return _run_dir


# --- one row, end to end ------------------------------------------------------------------

def row_info(row: Row, kernel: dict, rootfs: dict, mode: str, pytest_args: List[str], cmd: str,
             tests: str, timeout: float) -> dict:
    """Everything the guest and its tests need to know about the row (/etc/assay-vm/row.json)."""
    return {
        "id": row.id, "expect": row.expect, "reason": row.reason,
        "kernel_series": re.match(r"[0-9.]+", row.kernel.id).group(0).rstrip("."), "kernel_release": kernel["release"],
        "kernel_package": kernel["package"], "kernel_version": kernel["version"],
        "userland": row.userland.id, "suite": row.userland.suite,
        "python": row.userland.python, "python_full": rootfs["python_full"],
        "libbpf_package": row.userland.libbpf_package, "libbpf_soname": row.userland.libbpf_soname,
        "libbpf_version": row.userland.libbpf_version, "libbpf_version_full": rootfs["libbpf_version"],
        "lsm": row.lsm, "enforcer": row.enforcer, "arch": row.arch.name, "machine": row.arch.uname,
        "result_tty": row.arch.result_tty or f"/dev/{row.arch.console}", "mode": mode, "pytest_args": pytest_args, "cmd": cmd,
        "guest_timeout": max(timeout / 2, timeout - GUEST_TIMEOUT_MARGIN),
        "tests_dir": f"{payload.GUEST_SRC}/{tests}",
    }


def boot_row(row: Row, kernel: dict, rootfs: dict, wheel_dir: Path, deps_dir: Path, *,
             mode: str = "pytest", pytest_args: Optional[List[str]] = None, cmd: str = "",
             tests: str = payload.DEFAULT_TESTS, timeout: Optional[float] = None, echo: bool = False) -> Boot:
    timeout = timeout or row.timeout
    info = row_info(row, kernel, rootfs, mode, pytest_args or [], cmd, tests, timeout)
    logs = run_log_dir()
    safe = row.id.replace("/", "_")
    initrd = cache_dir("run") / f"{safe}.{os.getpid()}.initrd"
    try:
        make_initrd(Path(rootfs["path"]), initrd,
                    lambda cpio: payload.write_payload(cpio, info, wheel_dir, deps_dir,
                                                       [matrix.CACHE / m for m in kernel.get("modules", [])]))
        return boot(Path(kernel["path"]), initrd, row.lsm, logs / f"{safe}.console.log",
                    logs / f"{safe}.result", timeout, echo, row.arch)
    finally:
        initrd.unlink(missing_ok=True)
