"""What the runner puts into a guest on top of the cached root: the built wheel, its pure-Python
dependencies installed for the guest's Python, the repo's tests, and the guest's /init.

Dependencies are installed on the host with pip for the guest's Python version. pip filters
Requires-Python by --python-version but evaluates environment markers against the host
interpreter, so backports such as `tomli; python_version < "3.11"` would be missed for a 3.9
guest; the closure is therefore re-checked against the guest's marker environment and pip is
run again with whatever was missing, until nothing is.
"""
from __future__ import annotations

import email.parser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Set, Tuple, Sequence

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import matrix
from matrix import CACHE, GUEST_DIR, REPO, Row, cache_dir, locked, scratch_dir, write_atomic

DEPS_RECIPE = 2
TEST_EXTRA = "test"
# ruamel.yaml's C extension is optional (it falls back to pure Python) and has no pure wheel.
SKIP = {"ruamel-yaml-clib"}
NO_DEPS = {"ruamel-yaml"}
GUEST_PYTHON = "/usr/bin/python3"
GUEST_SRC = "/opt/assay/src"
# Only tests/vm by default: host tests may import repo files that are not in the payload, and
# collecting them under TCG costs time for tests that `-m vm` deselects anyway.
DEFAULT_TESTS = "tests/vm"


class PayloadError(Exception):
    pass


def log(msg: str) -> None:
    matrix.say("payload", msg)


# --- the wheel -----------------------------------------------------------------------------

def find_wheel(dist: Path = REPO / "dist") -> Path:
    wheels = sorted(dist.glob("assay_monitor-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise PayloadError(f"no assay_monitor wheel in {dist}; run `make wheel` first")
    return wheels[-1]


def _metadata(text: str) -> email.message.Message:
    return email.parser.Parser().parsestr(text)


def wheel_requirements(wheel: Path) -> List[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = _metadata(zf.read(name).decode())
    return meta.get_all("Requires-Dist") or []


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_wheel(wheel: Path) -> Path:
    """The project itself, installed by pip from the wheel (no deps, no index)."""
    key = f"wheel-{_sha(wheel)[:16]}"
    final = cache_dir("payload") / key
    with locked(key):
        if (final / ".complete").exists():
            return final
        scratch = scratch_dir(key)
        try:
            target = scratch / "pkg"
            _pip(["install", "--no-deps", "--no-index", "--no-compile", "--target", str(target), str(wheel)])
            for script in (target / "bin").glob("*") if (target / "bin").is_dir() else []:
                _fix_shebang(script)
            (target / ".complete").touch()
            matrix.rmtree(final)
            os.replace(target, final)
        finally:
            matrix.rmtree(scratch)
    return final


def _fix_shebang(script: Path) -> None:
    # pip writes the host interpreter's path; the guest runs its own python3.
    data = script.read_bytes()
    if data.startswith(b"#!"):
        script.write_bytes(b"#!" + GUEST_PYTHON.encode() + data[data.index(b"\n"):])
        script.chmod(0o755)


# --- byte-compiling for the guest's Python ------------------------------------------------

def compile_for_guest(rootfs: dict, dirs: List[Path]) -> None:
    """Byte-compiles `dirs` with the guest's own python3, chrooted into its extracted root.

    Every guest boots from a fresh initramfs, so without this each boot would compile pytest,
    hypothesis and the project again under TCG (tens of seconds per row). Unchecked-hash pycs
    are used because they never go stale: every directory here is keyed by its content.
    """
    if os.geteuid() != 0:
        log("not root: cannot chroot to byte-compile for the guest; guests will compile at import")
        return
    scratch = scratch_dir("pyc")
    try:
        root = scratch / "root"
        root.mkdir()
        with open(rootfs["path"], "rb") as src:
            subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], stdin=src, cwd=root,
                           check=True)
        for i, d in enumerate(dirs):
            inside = root / "mnt" / f"pyc{i}"
            shutil.copytree(d, inside, symlinks=True)
            proc = subprocess.run(["chroot", str(root), "/usr/bin/python3", "-I", "-m", "compileall", "-q",
                                   "--invalidation-mode", "unchecked-hash", f"/mnt/pyc{i}"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. a module written for a newer Python than the guest's
                log(f"compileall for Python {rootfs['python_full']} reported problems in {d.name}: "
                    f"{(proc.stdout + proc.stderr).strip()[-400:]}")
            for pyc in inside.rglob("*.pyc"):
                dest = d / pyc.relative_to(inside)
                dest.parent.mkdir(exist_ok=True)
                shutil.copy2(pyc, dest)
    finally:
        matrix.rmtree(scratch)


def compile_wheel(wheel_dir: Path, rootfs: dict) -> None:
    marker = wheel_dir / f".pyc-{rootfs['python_full']}"
    with locked(wheel_dir.name):
        if not marker.exists():
            compile_for_guest(rootfs, [wheel_dir])
            marker.touch()


# --- dependencies for one guest Python -----------------------------------------------------

def marker_env(python_full: str, machine: str = "x86_64") -> Dict[str, str]:
    return {
        "python_version": ".".join(python_full.split(".")[:2]),
        "python_full_version": python_full,
        "implementation_name": "cpython",
        "implementation_version": python_full,
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "platform_machine": machine,
        "platform_release": "",
        "platform_version": "",
        "os_name": "posix",
        "sys_platform": "linux",
        "extra": "",
    }


def _applies(req: Requirement, env: Dict[str, str], extras: Iterable[str]) -> bool:
    if req.marker is None:
        return True
    return any(req.marker.evaluate(dict(env, extra=e)) for e in [""] + sorted(extras))


def root_requirements(wheel: Path, python_full: str, machine: str = "x86_64") -> List[Requirement]:
    env = marker_env(python_full, machine)
    return [r for r in map(Requirement, wheel_requirements(wheel))
            if canonicalize_name(r.name) not in SKIP and _applies(r, env, [TEST_EXTRA])]


def _pip(args: List[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise PayloadError(f"pip {' '.join(args)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def _installed(target: Path) -> Dict[str, email.message.Message]:
    out = {}
    for md in target.glob("*.dist-info/METADATA"):
        meta = _metadata(md.read_text(errors="replace"))
        out[canonicalize_name(meta["Name"])] = meta
    return out


def _strip_marker(req: Requirement) -> str:
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"


def _problems(target: Path, roots: List[Requirement], python_full: str,
              machine: str = "x86_64") -> Tuple[List[str], List[str]]:
    """(requirements to add, constraints to add) for the guest's marker environment."""
    env = marker_env(python_full, machine)
    dists = _installed(target)
    wanted: List[Requirement] = list(roots)
    extras: Dict[str, Set[str]] = {}
    for r in roots:
        extras.setdefault(canonicalize_name(r.name), set()).update(r.extras)
    # Walk the dependency graph as the guest would see it.
    seen: Set[str] = set()
    queue = [canonicalize_name(r.name) for r in roots]
    while queue:
        name = queue.pop()
        if name in seen or name not in dists or name in NO_DEPS:
            continue
        seen.add(name)
        for spec in dists[name].get_all("Requires-Dist") or []:
            req = Requirement(spec)
            dep = canonicalize_name(req.name)
            if dep in SKIP or not _applies(req, env, extras.get(name, ())):
                continue
            wanted.append(req)
            extras.setdefault(dep, set()).update(req.extras)
            queue.append(dep)
    add: List[str] = []
    for req in wanted:
        dist = dists.get(canonicalize_name(req.name))
        if dist is None or not req.specifier.contains(dist["Version"], prereleases=True):
            add.append(_strip_marker(req))
    constraints = []
    for name, dist in dists.items():
        rp = dist.get("Requires-Python")
        if rp and not SpecifierSet(rp).contains(python_full, prereleases=True):
            constraints.append(f"{name}!={dist['Version']}")
    return sorted(set(add)), constraints


def ensure_deps(wheel: Path, rootfs: dict) -> Path:
    python_full = rootfs["python_full"]
    machine = matrix.ARCHES[rootfs.get("arch", "amd64")].uname
    roots = root_requirements(wheel, python_full, machine)
    recipe = [DEPS_RECIPE, python_full, sorted(str(r) for r in roots)]
    if machine != "x86_64":  # only pure-Python wheels are used, but markers may differ
        recipe.append(machine)
    key = f"deps-py{python_full}-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]}"
    final = cache_dir("payload") / key
    with locked(key):
        if (final / ".complete").exists():
            return final
        log(f"resolving {', '.join(str(r) for r in roots)} for Python {python_full}")
        scratch = scratch_dir(key)
        try:
            extra: List[str] = []
            constraints: List[str] = []
            for _ in range(8):
                target = scratch / "deps"
                matrix.rmtree(target)
                cfile = scratch / "constraints.txt"
                cfile.write_text("\n".join(constraints) + "\n")
                common = ["install", "--quiet", "--target", str(target), "--no-compile",
                          "--only-binary=:all:", "--platform", "any", "--python-version", python_full,
                          "-c", str(cfile)]
                normal = [_strip_marker(r) for r in roots if canonicalize_name(r.name) not in NO_DEPS]
                _pip(common + sorted(set(normal + extra)))
                nodeps = [_strip_marker(r) for r in roots if canonicalize_name(r.name) in NO_DEPS]
                if nodeps:
                    _pip(common + ["--no-deps", "--upgrade"] + nodeps)
                add, cons = _problems(target, roots, python_full, machine)
                add = [a for a in add if a not in extra]
                cons = [c for c in cons if c not in constraints]
                if not add and not cons:
                    break
                log(f"Python {python_full}: adding {add + cons} for the guest's markers")
                extra += add
                constraints += cons
            else:
                raise PayloadError(f"could not settle the dependencies for Python {python_full}")
            matrix.rmtree(target / "bin")  # console scripts with host shebangs; the guest uses -m
            pins = sorted(f"{m['Name']}=={m['Version']}" for m in _installed(target).values())
            (target / "PINS.txt").write_text("\n".join(pins) + "\n")
            compile_for_guest(rootfs, [target])
            (target / ".complete").touch()
            matrix.rmtree(final)
            os.replace(target, final)
        finally:
            matrix.rmtree(scratch)
        log(f"Python {python_full}: {' '.join(pins)}")
    return final


def warm(rows: List[Row], roots: Dict[str, dict]) -> None:
    """Pre-installs deps for every guest Python, if a wheel is already built."""
    try:
        wheel = find_wheel()
    except PayloadError as e:
        log(f"{e}; dependencies will be installed by the runner")
        return
    for ul in sorted({r.userland.id for r in rows}):
        ensure_deps(wheel, roots[ul])


# --- the archive ---------------------------------------------------------------------------

def _not_marker(path: Path) -> bool:
    return not (path.name == ".complete" or path.name.startswith(".pyc-"))


def tests_filter(path: Path) -> bool:
    return not (path.name in ("__pycache__", ".pytest_cache", ".hypothesis") or path.suffix == ".pyc")


GUEST_MODULES = "opt/assay/modules"


def write_payload(cpio, row_info: dict, wheel_dir: Path, deps_dir: Path, modules: Sequence[Path] = ()) -> None:
    """Adds the payload to a qemu.Cpio archive that is appended after the cached root, with the
    kernel modules the guest tests may load (tests/vm/kmod.py)."""
    cpio.add_file("init", (GUEST_DIR / "init").read_bytes(), 0o755)
    for m in modules:
        cpio.add_file(f"{GUEST_MODULES}/{m.name}", m.read_bytes(), 0o644)
    for name in ("guest.py", "assay_vm_report.py"):
        cpio.add_file(f"opt/assay/guest/{name}", (GUEST_DIR / name).read_bytes(), 0o644)
    cpio.add_tree("opt/assay/pkg", wheel_dir, _not_marker)
    cpio.add_tree("opt/assay/deps", deps_dir, _not_marker)
    # The test tree, without the source package: tests import the installed wheel.
    src = GUEST_SRC.lstrip("/")
    cpio.add_file(f"{src}/pyproject.toml", (REPO / "pyproject.toml").read_bytes(), 0o644)
    cpio.add_tree(f"{src}/tests", REPO / "tests", tests_filter)
    # Scripts the guest tests run (the verify_enforcement gate) and the demo's policy and workload.
    cpio.add_tree(f"{src}/scripts", REPO / "scripts", tests_filter)
    cpio.add_tree(f"{src}/examples", REPO / "examples", tests_filter)
    cpio.add_tree(f"{src}/bench", REPO / "bench", lambda p: tests_filter(p) and p.name != "results")
    cpio.add_file("etc/assay-vm/row.json", json.dumps(row_info, indent=2).encode(), 0o644)
