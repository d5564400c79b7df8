"""The matrix declaration (matrix.yaml) and the cache layout, shared by fetch, run and demo."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

from ruamel.yaml import YAML

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MATRIX_FILE = HERE / "matrix.yaml"
GUEST_DIR = HERE / "guest"
CACHE = Path(os.environ.get("ASSAY_MATRIX_CACHE", str(REPO / ".cache" / "kernel-matrix")))


@dataclass(frozen=True)
class Arch:
    """How to boot and build for one Debian architecture."""
    name: str             # Debian's name: amd64, arm64
    uname: str            # what `uname -m` prints in the guest
    qemu: str
    qemu_args: List[str]
    console: str          # the kernel console device
    result_tty: str       # where guest.py writes its JSON result; "" means the console itself
    binfmt: str           # qemu-user binfmt entry debootstrap needs on a foreign host, "" if native


ARCHES: Dict[str, Arch] = {
    "amd64": Arch("amd64", "x86_64", "qemu-system-x86_64", ["-cpu", "max"], "ttyS0", "/dev/ttyS1", ""),
    # QEMU's virt board has one PL011 UART: the result shares the console, framed by markers.
    # pauth-impdef: the architected pointer-auth algorithm costs a lot of time under TCG.
    "arm64": Arch("arm64", "aarch64", "qemu-system-aarch64",
                  ["-machine", "virt", "-cpu", "max,pauth-impdef=on"], "ttyAMA0", "", "qemu-aarch64"),
}
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


@dataclass(frozen=True)
class KernelSpec:
    id: str
    suites: List[str]
    package: str
    vmlinuz: str
    arch: str = "amd64"
    # The package holding /lib/modules when the image's own does not ({release} is filled in).
    modules_package: str = ""


@dataclass(frozen=True)
class Userland:
    id: str
    suite: str
    packages: List[str]
    libbpf_package: str
    libbpf_soname: str
    libbpf_version: str
    python: str
    arch: str = "amd64"


@dataclass(frozen=True)
class Row:
    id: str
    kernel: KernelSpec
    userland: Userland
    expect: str
    reason: str
    lsm: str
    timeout: int
    default: bool = True  # part of a plain `make matrix` run; other rows run when named
    enforcer: str = "lsm"  # the backend `assay monitor --enforcer auto` must pick in this guest
    only: str = ""         # a pytest -k expression: the row runs only these guest tests
    extra: Dict[str, str] = field(default_factory=dict)

    @property
    def arch(self) -> Arch:
        return ARCHES[self.kernel.arch]


ENFORCERS = ("lsm", "fmod_ret")


class MatrixError(Exception):
    pass


_print_lock = threading.Lock()


def say(tag: str, msg: str) -> None:
    """One whole line per message, even from parallel threads."""
    with _print_lock:
        sys.stdout.write(f"[{tag}] {msg}\n")
        sys.stdout.flush()


def load(path: Path = MATRIX_FILE) -> List[Row]:
    doc = YAML(typ="safe", pure=True).load(path.read_text())
    defaults = doc.get("defaults") or {}
    def arch_of(kind: str, key: str, v: dict) -> str:
        arch = str(v.get("arch", "amd64"))
        if arch not in ARCHES:
            raise MatrixError(f"{kind} {key}: arch must be one of {', '.join(ARCHES)}, not {arch!r}")
        return arch

    kernels = {
        str(k): KernelSpec(str(k), [str(s) for s in v["suites"]], str(v["package"]), str(v["vmlinuz"]),
                           arch_of("kernel", k, v), str(v.get("modules_package", "")))
        for k, v in doc["kernels"].items()
    }
    userlands = {}
    for k, v in doc["userlands"].items():
        lib = v["libbpf"]
        userlands[str(k)] = Userland(
            str(k), str(v["suite"]), [str(p) for p in v["packages"]],
            str(lib["package"]), str(lib["soname"]), str(lib["version"]), str(v["python"]),
            arch_of("userland", k, v),
        )
    rows = []
    seen = set()
    for r in doc["rows"]:
        rid = str(r["id"])
        if rid in seen:
            raise MatrixError(f"duplicate row id {rid!r} in {path}")
        seen.add(rid)
        expect = str(r.get("expect", "pass"))
        if expect not in ("pass", "xfail"):
            raise MatrixError(f"row {rid}: expect must be pass or xfail, not {expect!r}")
        if expect == "xfail" and not r.get("reason"):
            raise MatrixError(f"row {rid}: an xfail row needs a reason")
        try:
            kernel, userland = kernels[str(r["kernel"])], userlands[str(r["userland"])]
        except KeyError as e:
            raise MatrixError(f"row {rid}: unknown kernel or userland {e}") from None
        if kernel.arch != userland.arch:
            raise MatrixError(f"row {rid}: kernel {kernel.id} is {kernel.arch} but userland "
                              f"{userland.id} is {userland.arch}")
        lsm = str(r.get("lsm", defaults.get("lsm", "lockdown,capability,landlock,bpf")))
        enforcer = str(r.get("enforcer", "lsm"))
        if enforcer not in ENFORCERS:
            raise MatrixError(f"row {rid}: enforcer must be one of {', '.join(ENFORCERS)}, not {enforcer!r}")
        # The LSM list decides which backend auto picks: the two must agree.
        if (enforcer == "lsm") != ("bpf" in lsm.split(",")):
            raise MatrixError(f"row {rid}: enforcer {enforcer} needs `bpf` {'in' if enforcer == 'lsm' else 'absent from'}"
                              f" its lsm list ({lsm})")
        rows.append(Row(
            id=rid, kernel=kernel, userland=userland, expect=expect, reason=str(r.get("reason", "")),
            lsm=lsm, timeout=int(r.get("timeout", defaults.get("timeout", 300))),
            default=bool(r.get("default", True)), enforcer=enforcer, only=str(r.get("only", "")),
        ))
    return rows


def select(rows: List[Row], wanted: Optional[str]) -> List[Row]:
    """`wanted` is a comma separated list of row ids; empty means the default rows, `all` all rows."""
    if not wanted:
        return [r for r in rows if r.default]
    if wanted.strip() == "all":
        return rows
    ids = [w.strip() for w in wanted.split(",") if w.strip()]
    by_id = {r.id: r for r in rows}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise MatrixError(f"unknown row(s) {', '.join(unknown)}; rows are: {', '.join(by_id)}")
    return [by_id[i] for i in ids]


# --- cache helpers -------------------------------------------------------------------------

def cache_dir(*parts: str) -> Path:
    p = CACHE.joinpath(*parts)
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialises builders of one cache entry, across threads and processes."""
    lock_path = cache_dir("locks") / f"{name}.lock"
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def scratch_dir(prefix: str) -> Path:
    # Inside the cache so the final os.replace() stays on one filesystem and is atomic; the pid
    # in the name lets a later run tell a killed builder's leftovers from a live one's.
    return Path(tempfile.mkdtemp(prefix=f"{prefix}@{os.getpid()}@", dir=cache_dir("tmp")))


def scratch_owner_alive(path: Path) -> bool:
    try:
        pid = int(path.name.split("@")[1])
        os.kill(pid, 0)
    except (IndexError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
