#!/usr/bin/env python3
"""Fetches what the matrix boots: kernels (vmlinuz only) and guest root filesystems (newc cpio).

Kernels come from the Debian mirror named by this machine's own apt sources, through a private
apt state under .cache/kernel-matrix/apt/ (the system's apt configuration is never changed).
Every artifact is built in a scratch directory and renamed into place, under a lock, so a killed
fetch leaves no half-written cache entry. Once cached, nothing is downloaded again; --refresh
re-resolves the newest kernel packages.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import fnmatch
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple
from urllib.parse import urlsplit

import matrix
from matrix import ARCHES, CACHE, HOST_ARCH, KernelSpec, Row, Userland, cache_dir, locked, scratch_dir, write_atomic

KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Bump when the rootfs recipe below changes, so cached roots are rebuilt.
ROOTFS_RECIPE = 3
# Not needed in a guest that only runs Python tests; dropping them halves the initramfs.
STRIP_PATHS = [
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
    "usr/share/zoneinfo", "var/cache/apt/archives", "var/lib/apt/lists", "var/cache/debconf",
    "var/log",
]


class FetchError(Exception):
    pass


def log(msg: str) -> None:
    matrix.say("fetch", msg)


def run(argv: List[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    return subprocess.run(argv, **kw)


# --- mirrors -------------------------------------------------------------------------------

def _apt_source_uris() -> List[str]:
    """URIs of enabled `deb` entries in the machine's apt sources (deb822 and one-line)."""
    uris: List[str] = []
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", Path(path).read_text()):
            fields: Dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                key, _, value = line.partition(":")
                fields[key.strip().lower()] = value.strip()
            if fields.get("enabled", "yes").lower() == "no" or "deb" not in fields.get("types", "").split():
                continue
            uris += fields.get("uris", "").split()
    for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
        if not os.path.exists(path):
            continue
        for line in Path(path).read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", " ", line.split("#", 1)[0]).split()
            if len(words) >= 2 and words[0] == "deb":
                uris.append(words[1])
    return uris


@functools.lru_cache(maxsize=None)
def debian_mirrors() -> Tuple[str, str]:
    """(archive URI, security URI). ASSAY_DEBIAN_MIRROR / ASSAY_DEBIAN_SECURITY_MIRROR override."""
    archive = os.environ.get("ASSAY_DEBIAN_MIRROR", "")
    security = os.environ.get("ASSAY_DEBIAN_SECURITY_MIRROR", "")
    uris = _apt_source_uris()
    if not archive:
        archive = next((u for u in uris if urlsplit(u).path.rstrip("/").endswith("/debian")), "")
    if not security:
        security = next((u for u in uris if urlsplit(u).path.rstrip("/").endswith("/debian-security")), "")
    if not archive:
        raise FetchError(
            "no Debian archive in this machine's apt sources (/etc/apt/sources.list.d/*.sources); "
            "run on Debian or set ASSAY_DEBIAN_MIRROR to a Debian mirror URI")
    if not security:
        # Official mirrors serve the security archive beside the main one.
        parts = urlsplit(archive)
        security = parts._replace(path=parts.path.rstrip("/") + "-security").geturl()
    return archive.rstrip("/"), security.rstrip("/")


def suite_uri(suite: str) -> str:
    archive, security = debian_mirrors()
    return security if suite.endswith("-security") else archive


# --- private apt ---------------------------------------------------------------------------

class PrivateApt:
    """apt-get/apt-cache on a private state dir holding only the given suites."""

    def __init__(self, name: str, suites: Iterable[str], arch: str = "amd64"):
        self.suites = list(suites)
        self.arch = arch
        self.root = cache_dir("apt", name if arch == "amd64" else f"{name}-{arch}")
        self.sources = self.root / "sources.list"
        lines = [f"deb [arch={arch} signed-by={KEYRING}] {suite_uri(s)} {s} main" for s in self.suites]
        text = "\n".join(lines) + "\n"
        if not self.sources.exists() or self.sources.read_text() != text:
            write_atomic(self.sources, text.encode())
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()

    def options(self) -> List[str]:
        opts = {
            "Dir::Etc::SourceList": str(self.sources),
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::Etc::Preferences": "/dev/null",
            "Dir::Etc::PreferencesParts": "/dev/null",
            "Dir::State::Lists": str(self.root / "lists"),
            "Dir::State::Status": str(self.root / "status"),
            "Dir::Cache": str(self.root / "cache"),
            "APT::Architecture": self.arch,
            "APT::Architectures": self.arch,
            # Downloads land in our own scratch dirs, which the _apt user cannot write to.
            "APT::Sandbox::User": "root",
            # testing/unstable Release files expire within days; mirrors that are snapshots lag.
            "Acquire::Check-Valid-Until": "false",
            "Acquire::Languages": "none",
        }
        out: List[str] = []
        for k, v in opts.items():
            out += ["-o", f"{k}={v}"]
        return out

    def update(self) -> None:
        log(f"apt-get update ({' '.join(self.suites)})")
        proc = run(["apt-get", *self.options(), "-q", "update"], capture_output=True, text=True, check=False)
        problems = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith(("E:", "W:", "Err:"))]
        if proc.returncode != 0 or any("NO_PUBKEY" in l or l.startswith(("E:", "Err:")) for l in problems):
            raise FetchError("apt-get update failed for %s:\n%s" % (" ".join(self.suites), "\n".join(problems)))

    def pkgnames(self) -> List[str]:
        out = run(["apt-cache", *self.options(), "pkgnames"], capture_output=True, text=True).stdout
        return out.split()

    def madison(self, names: List[str]) -> List[Tuple[str, str]]:
        out = run(["apt-cache", *self.options(), "madison", *names], capture_output=True, text=True).stdout
        rows = []
        for line in out.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3:
                rows.append((parts[0], parts[1]))
        return rows

    def download(self, name: str, version: str, dest: Path) -> Path:
        run(["apt-get", *self.options(), "-q", "download", f"{name}={version}"], cwd=dest,
            stdout=subprocess.DEVNULL)
        debs = list(dest.glob("*.deb"))
        if len(debs) != 1:
            raise FetchError(f"apt-get download {name}={version} produced {debs}")
        return debs[0]


def _dpkg_newer(a: str, b: str) -> bool:
    return run(["dpkg", "--compare-versions", a, "gt", b], check=False).returncode == 0


def newest(candidates: List[Tuple[str, str]]) -> Tuple[str, str]:
    best = candidates[0]
    for cand in candidates[1:]:
        if _dpkg_newer(cand[1], best[1]):
            best = cand
    return best


# --- kernels -------------------------------------------------------------------------------

def kernel_record_path(spec: KernelSpec) -> Path:
    return cache_dir("kernels") / f"{spec.id}.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# Kernel modules the guest tests load themselves (the guest has no modprobe): SCTP and what it
# needs, and loop (a real ext4 for the disconnected-dentry test). Extracted once per kernel with the image; a kernel record without them is fetched again.
MODULES = ("sctp", "libcrc32c", "udp_tunnel", "ip6_udp_tunnel", "crc32c_generic", "crc32c_intel",
           "crc32c_cryptoapi", "loop")


def _module_name(member: str) -> Optional[str]:
    base = os.path.basename(member)
    for ext in (".ko", ".ko.xz", ".ko.zst", ".ko.gz"):
        if base.endswith(ext):
            return base[: -len(ext)].replace("-", "_")
    return None


def cached_kernel(spec: KernelSpec) -> Optional[dict]:
    path = kernel_record_path(spec)
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    image = CACHE / rec["vmlinuz"]
    if not image.is_file() or image.stat().st_size != rec.get("size"):
        return None
    if rec.get("modules_wanted") != list(MODULES) or \
            not all((CACHE / m).is_file() for m in rec.get("modules", [])):
        return None
    rec["path"] = str(image)
    return rec


def _extract_vmlinuz(deb: Path, pattern: str, dest: Path) -> Tuple[Path, str]:
    """Streams the .deb's data tar and writes only the member matching `pattern` (and the
    wanted modules, if this package has them, into dest/modules)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    found = None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isfile() and fnmatch.fnmatch(name, pattern):
                    src = tar.extractfile(member)
                    out = dest / "vmlinuz"
                    with open(out, "wb") as fh:
                        shutil.copyfileobj(src, fh)
                    found = (out, name)
                elif member.isfile() and _module_name(name) in MODULES:
                    _save_module(tar, member, dest)
    finally:
        proc.stdout.close()
        if proc.wait() != 0 and found is None:
            raise FetchError(f"dpkg-deb --fsys-tarfile {deb.name} failed")
    if found is None:
        raise FetchError(f"{deb.name} has no file matching {pattern}")
    return found


def _save_module(tar, member, dest: Path) -> None:
    (dest / "modules").mkdir(exist_ok=True)
    with open(dest / "modules" / os.path.basename(member.name), "wb") as fh:
        shutil.copyfileobj(tar.extractfile(member), fh)


def _extract_modules(deb: Path, dest: Path) -> None:
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and _module_name(member.name) in MODULES:
                    _save_module(tar, member, dest)
    finally:
        proc.stdout.close()
        if proc.wait() != 0:
            raise FetchError(f"dpkg-deb --fsys-tarfile {deb.name} failed")


def _release_from_path(member: str) -> str:
    base = os.path.basename(member)
    if base.startswith("vmlinuz-"):
        return base[len("vmlinuz-"):]
    return os.path.basename(os.path.dirname(member))  # usr/lib/modules/<release>/vmlinuz


def ensure_kernel(spec: KernelSpec, refresh: bool = False) -> dict:
    with locked(f"kernel-{spec.id}"):
        rec = cached_kernel(spec)
        if rec and not refresh:
            return rec
        apt = PrivateApt("-".join(spec.suites), spec.suites, spec.arch)
        apt.update()
        rx = re.compile(spec.package)
        names = [n for n in apt.pkgnames() if rx.match(n)]
        if not names:
            raise FetchError(f"kernel {spec.id}: no package matches {spec.package} in {spec.suites}")
        name, version = newest(apt.madison(names))
        if rec and (rec["package"], rec["version"]) == (name, version) and cached_kernel(spec):
            log(f"kernel {spec.id}: {name} {version} is still the newest")
            return rec
        log(f"kernel {spec.id}: downloading {name} {version}")
        scratch = scratch_dir(f"kernel-{spec.id}")
        try:
            deb = apt.download(name, version, scratch)
            image, member = _extract_vmlinuz(deb, spec.vmlinuz, scratch)
            if spec.modules_package:
                mod_dir = scratch / "modules-deb"
                mod_dir.mkdir()
                mdeb = apt.download(spec.modules_package.format(release=_release_from_path(member)), version, mod_dir)
                _extract_modules(mdeb, scratch)
            final_dir = cache_dir("kernels") / f"{name}_{version}"
            matrix.rmtree(final_dir)
            final_dir.mkdir()
            os.replace(image, final_dir / "vmlinuz")
            modules = []
            if (scratch / "modules").is_dir():
                os.replace(scratch / "modules", final_dir / "modules")
                modules = sorted(str(p.relative_to(CACHE)) for p in (final_dir / "modules").iterdir())
        finally:
            matrix.rmtree(scratch)
        previous, rec = rec, {
            "id": spec.id, "package": name, "version": version, "release": _release_from_path(member),
            "suites": spec.suites, "arch": spec.arch, "vmlinuz": str((final_dir / "vmlinuz").relative_to(CACHE)),
            "size": (final_dir / "vmlinuz").stat().st_size, "sha256": _sha256(final_dir / "vmlinuz"),
            "modules": modules, "modules_wanted": list(MODULES),
            "resolved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_atomic(kernel_record_path(spec), json.dumps(rec, indent=2).encode())
        if previous:  # a refresh found a newer package: the old image is no longer referenced
            matrix.rmtree((CACHE / previous["vmlinuz"]).parent)
        rec["path"] = str(CACHE / rec["vmlinuz"])
        return rec


# --- guest root filesystems ----------------------------------------------------------------

def rootfs_key(ul: Userland) -> str:
    parts = [ROOTFS_RECIPE, ul.suite, sorted(ul.packages), STRIP_PATHS]
    if ul.arch != "amd64":  # amd64 keys predate arm64 rows; keep them so caches stay valid
        parts.append(ul.arch)
    recipe = json.dumps(parts, sort_keys=True)
    # Content, not the userland's name: userlands with the same recipe share one root.
    name = ul.suite if ul.arch == "amd64" else f"{ul.suite}-{ul.arch}"
    return f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"


def cached_rootfs(ul: Userland) -> Optional[dict]:
    base = cache_dir("rootfs") / rootfs_key(ul)
    try:
        man = json.loads(base.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    cpio = base.with_suffix(".cpio")
    if not cpio.is_file() or cpio.stat().st_size != man.get("size"):
        return None
    man["path"] = str(cpio)
    return man


def _dpkg_status(root: Path) -> Dict[str, str]:
    versions = {}
    for stanza in (root / "var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(l.split(": ", 1) for l in stanza.splitlines() if ": " in l and not l[:1].isspace())
        if "installed" in fields.get("Status", "") and "Package" in fields:
            versions[fields["Package"]] = fields.get("Version", "")
    return versions


def upstream_version(debian_version: str) -> str:
    """1:1.1.2-0+deb12u1 -> 1.1.2"""
    v = debian_version.split(":", 1)[-1]
    return v.rsplit("-", 1)[0] if "-" in v else v


def _mounts_below(path: Path) -> List[str]:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mountinfo") as fh:
        points = [line.split()[4] for line in fh]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def _processes_inside(path: Path) -> List[int]:
    """Pids whose root, cwd or command line is inside path: a killed fetch's debootstrap/dpkg."""
    prefix = str(path.resolve())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/{l}") for l in ("root", "cwd")]
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().decode(errors="replace")
        except OSError:
            continue
        if any(l == prefix or l.startswith(prefix + "/") for l in links) or prefix in cmdline:
            pids.append(int(entry))
    return pids


def safe_rmtree(path: Path) -> None:
    """rmtree for a debootstrap target: a killed fetch can leave its debootstrap running and
    /proc or /sys mounted inside."""
    if not path.exists():
        return
    for _ in range(10):
        pids = _processes_inside(path)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    for mp in _mounts_below(path):
        run(["umount", "-l", mp], check=False)
    if _mounts_below(path):
        raise FetchError(f"refusing to delete {path}: still has mounts inside")
    matrix.rmtree(path)


def pack_cpio(root: Path, out: Path) -> None:
    """newc archive of root, parents before children (the kernel does not create missing dirs)."""
    names = subprocess.run(["find", ".", "-mindepth", "1", "-print0"], cwd=root, check=True,
                           capture_output=True).stdout.split(b"\0")
    names = sorted(n for n in names if n)
    with open(out, "wb") as fh:
        subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=root, check=True,
                       input=b"\0".join(names) + b"\0", stdout=fh)


# debootstrap runs most of its work in subshells. In its own PID namespace, all of them die with
# the namespace's first process, which unshare kills when it dies, which happens when this process
# dies (PR_SET_PDEATHSIG): a killed fetch leaves nothing running in its scratch dir.
_CONTAINED = ["unshare", "--pid", "--fork", "--kill-child=SIGKILL"]


def _die_with_parent() -> None:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


BINFMT = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF_DIRS = ["/usr/lib/binfmt.d", "/etc/binfmt.d"]


def ensure_binfmt(arch: str) -> None:
    """Lets this host run `arch` binaries (debootstrap's second stage, compileall in a chroot).

    Uses qemu-user-static's own binfmt entry; registers it when no service has (containers and
    CI machines run no systemd-binfmt). The F flag makes the kernel open the interpreter now,
    so it also works inside the chroot.
    """
    entry = ARCHES[arch].binfmt
    if not entry or arch == HOST_ARCH:
        return
    state = BINFMT / entry
    if state.exists() and state.read_text().splitlines()[0] == "enabled":
        return
    if os.geteuid() != 0:
        raise FetchError(f"running {arch} binaries needs binfmt_misc entry {entry}; run as root")
    if not (BINFMT / "register").exists():
        proc = run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=False,
                   capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(f"cannot mount binfmt_misc for {arch} guests: {proc.stderr.strip()}")
    conf = next((Path(d) / f"{entry}.conf" for d in BINFMT_CONF_DIRS if (Path(d) / f"{entry}.conf").exists()), None)
    if conf is None:
        raise FetchError(f"building the {arch} guest root needs qemu-user-static "
                         f"(no {entry}.conf in {' or '.join(BINFMT_CONF_DIRS)}): apt-get install qemu-user-static")
    line = next(l for l in conf.read_text().splitlines() if l.startswith(":"))
    if state.exists():  # registered but disabled
        state.write_text("1")
    else:
        (BINFMT / "register").write_text(line)
    log(f"binfmt_misc: registered {entry} from {conf}")


def ensure_rootfs(ul: Userland) -> dict:
    with locked(f"rootfs-{rootfs_key(ul)}"):
        man = cached_rootfs(ul)
        if man:
            return man
        if os.geteuid() != 0:
            raise FetchError("building a guest root needs root (debootstrap); run as root or with sudo")
        key = rootfs_key(ul)
        ensure_binfmt(ul.arch)
        scratch = scratch_dir(f"rootfs-{ul.id}")
        root = scratch / "root"
        started = time.monotonic()
        log(f"rootfs {ul.id}: debootstrap {ul.suite} {ul.arch} (+{','.join(ul.packages)})")
        try:
            with open(scratch / "debootstrap.log", "w") as dlog:
                proc = run([*_CONTAINED, "debootstrap", f"--arch={ul.arch}", "--variant=minbase", "--components=main",
                            f"--include={','.join(ul.packages)}", f"--keyring={KEYRING}",
                            ul.suite, str(root), suite_uri(ul.suite)],
                           stdout=dlog, stderr=subprocess.STDOUT, check=False, preexec_fn=_die_with_parent)
            if proc.returncode != 0:
                tail = (scratch / "debootstrap.log").read_text().splitlines()[-25:]
                raise FetchError(f"debootstrap {ul.suite} failed:\n" + "\n".join(tail))
            for mp in _mounts_below(root):
                run(["umount", "-l", mp], check=False)
            for rel in STRIP_PATHS:
                target = root / rel
                if target.is_dir() and not target.is_symlink():
                    for child in target.iterdir():
                        if child.is_dir() and not child.is_symlink():
                            safe_rmtree(child)
                        else:
                            child.unlink()
            status = _dpkg_status(root)
            python_pkg = status.get("python3", "")
            man = {
                "userland": ul.id, "suite": ul.suite, "arch": ul.arch, "packages": ul.packages, "key": key,
                "python": ".".join(upstream_version(python_pkg).split(".")[:2]),
                "python_full": upstream_version(python_pkg),
                "libbpf_package": ul.libbpf_package,
                "libbpf_version": upstream_version(status.get(ul.libbpf_package, "")),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            if not man["libbpf_version"]:
                raise FetchError(f"rootfs {ul.id}: {ul.libbpf_package} is not installed")
            if man["python"] != ul.python or not man["libbpf_version"].startswith(ul.libbpf_version):
                log(f"WARNING rootfs {ul.id}: matrix.yaml expects Python {ul.python} + libbpf "
                    f"{ul.libbpf_version}, {ul.suite} now has {man['python']} + {man['libbpf_version']}")
            tmp_cpio = scratch / "rootfs.cpio"
            pack_cpio(root, tmp_cpio)
            man["size"] = tmp_cpio.stat().st_size
            final = cache_dir("rootfs") / f"{key}.cpio"
            os.replace(tmp_cpio, final)
            write_atomic(final.with_suffix(".json"), json.dumps(man, indent=2).encode())
        finally:
            safe_rmtree(scratch)
        log(f"rootfs {ul.id}: {man['size'] >> 20} MiB, Python {man['python_full']}, "
            f"{ul.libbpf_package} {man['libbpf_version']} ({time.monotonic() - started:.0f} s)")
        man["path"] = str(final)
        return man


# --- everything ----------------------------------------------------------------------------

def sweep_scratch() -> None:
    """Removes scratch dirs left by killed fetches and runs."""
    for entry in cache_dir("tmp").iterdir():
        if not matrix.scratch_owner_alive(entry):
            safe_rmtree(entry)


def fetch(rows: List[Row], refresh: bool = False, jobs: int = 3) -> Tuple[Dict[str, dict], Dict[str, dict]]:
    """Makes sure every kernel and root the rows need is cached; returns (kernels, rootfs) by id."""
    kspecs = {r.kernel.id: r.kernel for r in rows}
    userlands = {r.userland.id: r.userland for r in rows}
    todo = [k for k in kspecs.values() if refresh or not cached_kernel(k)]
    todo_ul = [u for u in userlands.values() if not cached_rootfs(u)]
    sweep_scratch()
    if todo or todo_ul:
        log("mirror: from this machine's apt sources" if not os.environ.get("ASSAY_DEBIAN_MIRROR")
            else "mirror: from ASSAY_DEBIAN_MIRROR")
        debian_mirrors()
    # Separate pools: debootstrap is CPU-bound and the long pole, kernel downloads are not.
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as ul_pool, ThreadPoolExecutor(max_workers=2) as k_pool:
        ul_futs = {u.id: ul_pool.submit(ensure_rootfs, u) for u in userlands.values()}
        k_futs = {k.id: k_pool.submit(ensure_kernel, k, refresh) for k in kspecs.values()}
        kernels = {k: f.result() for k, f in k_futs.items()}
        roots = {u: f.result() for u, f in ul_futs.items()}
    return kernels, roots


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", help="comma separated row ids (default: all rows)")
    ap.add_argument("--refresh", action="store_true", help="re-resolve the newest kernel packages")
    ap.add_argument("--jobs", type=int, default=3, help="parallel fetches (default 3)")
    args = ap.parse_args(argv)
    try:
        rows = matrix.select(matrix.load(), args.kernels)
        started = time.monotonic()
        kernels, roots = fetch(rows, refresh=args.refresh, jobs=args.jobs)
        import payload  # the wheel may not be built yet; deps are then resolved by run.py
        payload.warm(rows, roots)
    except (FetchError, matrix.MatrixError, subprocess.CalledProcessError) as e:
        print(f"fetch failed: {e}", file=sys.stderr)
        return 1
    for k in kernels.values():
        log(f"kernel {k['id']:5} {k['package']} {k['version']} (release {k['release']})")
    for r in roots.values():
        log(f"rootfs {r['userland']:9} python {r['python_full']}, {r['libbpf_package']} {r['libbpf_version']}")
    log(f"done in {time.monotonic() - started:.0f} s; cache: {CACHE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
