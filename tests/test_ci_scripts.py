"""The CI scripts against real servers on 127.0.0.1 that these tests start and stop.

- apt_ports_failover.sh: real apt mirrors (a .deb built with dpkg-deb, indexes and Release by
  apt-ftparchive, `[trusted=yes]`) served by `python -m http.server`; one dead, some broken.
  Everything apt touches is in a private root under tmp; the host's apt state is checked untouched.
- publish_idempotent.sh: a real pypiserver (no auth, no --overwrite) and a tiny scripted HTTP
  server for 5xx / 403 / lying-409 answers. The dists are tiny wheels and sdists made here.
- check_release.sh: tag / version / CHANGELOG / dist gate, on temp files and on this repository.

No test here skips: a missing tool (shellcheck, apt-ftparchive, twine, pypiserver) is a failure,
since `make deps` installs all of them.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
CI = REPO / "scripts" / "ci"
FAILOVER = CI / "apt_ports_failover.sh"
PUBLISH = CI / "publish_idempotent.sh"
CHECK_RELEASE = CI / "check_release.sh"
PKG = "assay-ci-probe"


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path, f"{tool} is not installed; `make deps` installs it (Makefile APT_PKGS)"
    return path


def run(cmd: List[str], env: Optional[Dict[str, str]] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=full_env, timeout=timeout)


def free_port() -> int:
    """A port nothing listens on (bound, then closed): a dead server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- shellcheck

def test_ci_scripts_pass_shellcheck():
    shellcheck = need("shellcheck")
    scripts = sorted(CI.glob("*.sh"))
    assert {p.name for p in scripts} >= {"apt_ports_failover.sh", "publish_idempotent.sh", "check_release.sh"}
    res = run([shellcheck, "--severity=style", *scripts])
    assert res.returncode == 0, res.stdout + res.stderr
    for p in scripts:
        head = p.read_text().splitlines()
        assert head[0] == "#!/usr/bin/env bash", p
        assert "set -euo pipefail" in head, f"{p.name} lacks `set -euo pipefail`"
        assert os.access(p, os.X_OK), f"{p.name} is not executable"


# --------------------------------------------------------------------------- apt mirrors

class StaticServer:
    """`python -m http.server` on 127.0.0.1, port chosen by the kernel and read from its banner."""

    def __init__(self, directory: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory", str(directory)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 15)
        line = self.proc.stdout.readline() if ready else ""
        m = re.search(r"port (\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"http.server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()


def _arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def _build_deb(work: Path) -> Path:
    need("dpkg-deb")
    root = work / "pkgroot"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "usr/share/doc" / PKG).mkdir(parents=True)
    (root / "DEBIAN/control").write_text(
        f"Package: {PKG}\nVersion: 1.0\nArchitecture: all\nMaintainer: Assay CI <ci@invalid>\n"
        "Description: probe package for the apt mirror failover tests\n")
    (root / "usr/share/doc" / PKG / "README").write_text("probe\n")
    deb = work / f"{PKG}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def _make_mirror(base: Path, deb: Path, arch: str, breakage: str = "") -> Path:
    """A one-suite mirror (dists/stable/main) with a real Packages and Release.

    breakage: "" healthy; "hash" Packages changed after Release was made (hash mismatch);
    "release" Release is garbage; "nodeb" indexes fine but the .deb is gone from the pool.
    """
    ftparchive = need("apt-ftparchive")
    (base / "pool/main").mkdir(parents=True)
    shutil.copy(deb, base / "pool/main" / deb.name)
    bindir = base / "dists/stable/main" / f"binary-{arch}"
    bindir.mkdir(parents=True)
    packages = subprocess.run([ftparchive, "packages", "pool"], cwd=base, check=True,
                              capture_output=True, text=True).stdout
    assert f"Package: {PKG}" in packages
    (bindir / "Packages").write_text(packages)
    release = subprocess.run(
        [ftparchive, "-o", "APT::FTPArchive::Release::Suite=stable",
         "-o", "APT::FTPArchive::Release::Codename=stable",
         "-o", f"APT::FTPArchive::Release::Architectures={arch}",
         "-o", "APT::FTPArchive::Release::Components=main", "release", "dists/stable"],
        cwd=base, check=True, capture_output=True, text=True).stdout
    (base / "dists/stable/Release").write_text(release)
    if breakage == "hash":
        (bindir / "Packages").write_text(packages.replace("Version: 1.0", "Version: 1.9"))
    elif breakage == "release":
        (base / "dists/stable/Release").write_bytes(b"\x00\xffnot a release file\n")
    elif breakage == "nodeb":
        (base / "pool/main" / deb.name).unlink()
    return base


@pytest.fixture(scope="module")
def mirrors(tmp_path_factory):
    """Four mirrors on 127.0.0.1 plus a dead URL, and the .deb they serve."""
    work = tmp_path_factory.mktemp("apt")
    arch = _arch()
    deb = _build_deb(work)
    servers = {}
    try:
        for kind in ("good", "hash", "release", "nodeb"):
            servers[kind] = StaticServer(_make_mirror(work / kind, deb, arch, "" if kind == "good" else kind))
        urls = {k: s.url for k, s in servers.items()}
        urls["dead"] = f"http://127.0.0.1:{free_port()}"
        yield {"urls": urls, "deb": deb, "arch": arch}
    finally:
        for s in servers.values():
            s.stop()


def failover(root: Path, mirror_urls: List[str], arch: str, retries: Optional[str] = "1",
             extra: Optional[List[str]] = None) -> subprocess.CompletedProcess:
    cmd = [FAILOVER, "--root", root, "--suite", "stable", "--arch", arch, "--trusted"]
    for u in mirror_urls:
        cmd += ["--mirror", u]
    cmd += (extra or []) + [PKG]
    env = {"APT_FAILOVER_RETRIES": retries} if retries is not None else {}
    base_env = {k: v for k, v in os.environ.items() if k not in ("APT_FAILOVER_RETRIES", "APT_FAILOVER_MIRRORS")}
    base_env.update(env)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=base_env, timeout=120)


def _host_apt_snapshot():
    lists = Path("/var/lib/apt/lists")
    names = sorted(p.name for p in lists.iterdir()) if lists.is_dir() else []
    srcs = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    return names, {str(p): p.stat().st_mtime_ns for p in srcs if p.exists()}


def _fetched(root: Path) -> Path:
    return root / "var/cache/apt/archives" / f"{PKG}_1.0_all.deb"


def test_failover_skips_dead_and_corrupt_mirrors(mirrors, tmp_path):
    u, arch = mirrors["urls"], mirrors["arch"]
    host_before = _host_apt_snapshot()
    root = tmp_path / "root"
    res = failover(root, [u["dead"], u["hash"], u["good"]], arch)
    log = res.stderr + res.stdout
    assert res.returncode == 0, log
    assert f"chose mirror 3: {u['good']}" in log
    assert "Connection refused" in log and "mirror 1 gave incomplete indexes" in log
    assert "Hash Sum mismatch" in log and "mirror 2 failed at update" in log
    # The package really came from the healthy mirror, byte for byte.
    got = _fetched(root)
    assert got.read_bytes() == mirrors["deb"].read_bytes()
    # Every apt call carried the Acquire options; the private root kept them off the host.
    calls = [ln for ln in log.splitlines() if ln.startswith("apt_ports_failover: + apt-get")]
    assert len(calls) == 4, calls  # three updates, one install
    for c in calls:
        assert "-o Acquire::Retries=1 -o Acquire::http::Pipeline-Depth=0" in c
        assert f"Dir::Etc::SourceList={root}/etc/apt/sources.list" in c
    assert (root / "etc/apt/sources.list").read_text().strip() == f"deb [trusted=yes arch={arch}] {u['good']} stable main"
    assert _host_apt_snapshot() == host_before
    assert not any("127.0.0.1" in n for n in host_before[0])


def test_failover_past_invalid_release_and_missing_deb(mirrors, tmp_path):
    u, arch = mirrors["urls"], mirrors["arch"]
    root = tmp_path / "root"
    res = failover(root, [u["release"], u["nodeb"], u["good"]], arch)
    log = res.stderr + res.stdout
    assert res.returncode == 0, log
    assert "mirror 1 failed at update" in log
    assert "mirror 2 failed at install" in log  # its index was fine, its pool was not
    assert f"chose mirror 3: {u['good']}" in log
    assert _fetched(root).exists()


def test_install_first_needs_no_mirror_once_cached(mirrors, tmp_path):
    u, arch = mirrors["urls"], mirrors["arch"]
    root = tmp_path / "root"
    first = failover(root, [u["good"]], arch)
    assert first.returncode == 0, first.stderr
    assert "install-first" not in first.stderr  # fresh root: nothing cached yet
    # Second run: only a dead mirror is offered, and none is needed.
    second = failover(root, [u["dead"]], arch)
    assert second.returncode == 0, second.stderr
    assert "install-first: satisfied" in second.stderr
    assert "trying mirror" not in second.stderr
    assert " update" not in "".join(ln for ln in second.stderr.splitlines() if ln.startswith("apt_ports_failover: +"))


def test_install_first_falls_back_to_update_when_cache_misses(mirrors, tmp_path):
    u, arch = mirrors["urls"], mirrors["arch"]
    root = tmp_path / "root"
    assert failover(root, [u["good"]], arch).returncode == 0
    # Cached lists point at a mirror that has lost the .deb: install-first fails, update-fallback wins.
    (root / "etc/apt/sources.list").write_text(f"deb [trusted=yes arch={arch}] {u['nodeb']} stable main\n")
    shutil.rmtree(root / "var/lib/apt/lists")
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    _fetched(root).unlink()
    res = failover(root, [u["dead"], u["good"]], arch)
    assert res.returncode == 0, res.stderr
    assert "install-first failed" in res.stderr
    assert f"chose mirror 2: {u['good']}" in res.stderr
    assert _fetched(root).exists()


def test_all_mirrors_failing_exits_nonzero_with_reasons(mirrors, tmp_path):
    u, arch = mirrors["urls"], mirrors["arch"]
    res = failover(tmp_path / "root", [u["dead"], u["hash"], u["release"]], arch)
    assert res.returncode == 1, res.stderr
    summary = res.stderr[res.stderr.index("all 3 mirrors failed"):]
    assert f"{u['dead']}: update incomplete:" in summary and "Connection refused" in summary
    assert f"{u['hash']}: update failed:" in summary and "Hash Sum mismatch" in summary
    assert f"{u['release']}: update failed:" in summary
    assert not _fetched(tmp_path / "root").exists()


def test_default_acquire_options_reach_apt(mirrors, tmp_path):
    u, arch = mirrors["urls"], mirrors["arch"]
    root = tmp_path / "root"
    # apt's own view of the effective configuration, with the env override unset.
    dump = failover(root, [u["good"]], arch, retries=None, extra=["--print-config"])
    assert dump.returncode == 0, dump.stderr
    conf = dump.stdout
    assert 'Acquire::Retries "10";' in conf
    assert 'Acquire::http::Pipeline-Depth "0";' in conf
    assert f'Dir "{root}/";' in conf
    assert f'Dir::Etc::sourcelist "{root}/etc/apt/sources.list";' in conf
    assert f'Dir::Etc::parts "{root}/etc/apt/apt.conf.d";' in conf  # the host's apt.conf.d is not read
    assert 'Dir::Etc::main "/dev/null";' in conf
    assert f'Dir::State::status "{root}/var/lib/dpkg/status";' in conf
    # A real run with the default: a corrupt index fails fast (not retried), and the logged
    # command shows Retries=10.
    res = failover(root, [u["hash"]], arch, retries=None)
    assert res.returncode == 1
    assert "+ apt-get -o Acquire::Retries=10 -o Acquire::http::Pipeline-Depth=0" in res.stderr
    over = failover(root, [u["good"]], arch, retries="3", extra=["--print-config"])
    assert 'Acquire::Retries "3";' in over.stdout


def test_failover_usage_errors(tmp_path):
    res = run([FAILOVER, "--root", tmp_path, "--suite", "stable", PKG])
    assert res.returncode == 2 and "no mirror given" in res.stderr
    res = run([FAILOVER, "--root", tmp_path, "--mirror", "http://127.0.0.1:9", PKG])
    assert res.returncode == 2 and "no suite given" in res.stderr
    res = run([FAILOVER, "--mirror", "http://127.0.0.1:9", "--suite", "s", "--root", tmp_path],
              env={"APT_FAILOVER_RETRIES": "ten"})
    assert res.returncode == 2 and "must be a number" in res.stderr


# --------------------------------------------------------------------------- package index

def make_dists(outdir: Path, name: str, version: str, salt: str = "") -> List[Path]:
    """A minimal valid wheel and sdist (twine checks their metadata). `salt` changes the bytes."""
    outdir.mkdir(parents=True, exist_ok=True)
    mod = name.replace("-", "_")
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: publish test {salt}\n"
    files = {
        f"{mod}/__init__.py": f"# {salt}\n",
        f"{mod}-{version}.dist-info/METADATA": meta,
        f"{mod}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for n, c in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(c.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{n},sha256={digest},{len(c.encode())}")
    record.append(f"{mod}-{version}.dist-info/RECORD,,")
    files[f"{mod}-{version}.dist-info/RECORD"] = "\n".join(record) + "\n"
    whl = outdir / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for n, c in files.items():
            z.writestr(n, c)
    sdist = outdir / f"{mod}-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as t:
        for n, c in {f"{mod}-{version}/PKG-INFO": meta, f"{mod}-{version}/{mod}/__init__.py": f"# {salt}\n"}.items():
            data = c.encode()
            info = tarfile.TarInfo(n)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return [whl, sdist]


def publish(repo_url: str, files: List[Path], extra: Optional[List[str]] = None,
            env: Optional[Dict[str, str]] = None, simple_url: Optional[str] = None) -> subprocess.CompletedProcess:
    cmd: List = [PUBLISH, "--repository-url", repo_url]
    if simple_url:
        cmd += ["--simple-url", simple_url]
    cmd += (extra or []) + files
    base = {"PUBLISH_PYTHON": sys.executable, "PUBLISH_BACKOFF_BASE": "0.05", "PUBLISH_ATTEMPTS": "3"}
    base.update(env or {})
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TWINE_", "PUBLISH_"))}
    clean.update(base)
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=clean, timeout=120)


@pytest.fixture(scope="module")
def pypiserver(tmp_path_factory):
    """A real pypiserver on 127.0.0.1: no auth, --overwrite off (its default)."""
    pkgdir = tmp_path_factory.mktemp("index")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pypiserver", "run", "-i", "127.0.0.1", "-p", str(port),
         "-a", ".", "-P", ".", "--disable-fallback", str(pkgdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "pypiserver exited at start (is it installed? `make deps`)"
            try:
                with urllib.request.urlopen(url + "simple/", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "pypiserver did not answer within 20 s"
                time.sleep(0.2)
        yield {"url": url, "dir": pkgdir}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def test_publish_twice_second_run_is_a_noop(pypiserver, tmp_path):
    files = make_dists(tmp_path, "assay-twice", "1.0.0", salt="one")
    first = publish(pypiserver["url"], files)
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("publish_idempotent: uploaded ") == 2
    stored = {p.name: p.read_bytes() for p in pypiserver["dir"].iterdir() if p.name.startswith("assay_twice")}
    assert stored == {f.name: f.read_bytes() for f in files}
    assert "visible: assay_twice-1.0.0-py3-none-any.whl (sha256 matches)" in first.stderr

    second = publish(pypiserver["url"], files)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("already exists on the index; treating as success") == 2
    assert "publish_idempotent: uploaded " not in second.stderr
    assert "OK: 2 file(s) visible" in second.stderr and "(2 already existed)" in second.stderr
    after = {p.name: p.read_bytes() for p in pypiserver["dir"].iterdir() if p.name.startswith("assay_twice")}
    assert after == stored


def test_conflicting_file_same_version(pypiserver, tmp_path):
    a = make_dists(tmp_path / "a", "assay-conflict", "2.0.0", salt="a")
    b = make_dists(tmp_path / "b", "assay-conflict", "2.0.0", salt="b")
    assert a[0].read_bytes() != b[0].read_bytes()
    assert publish(pypiserver["url"], a).returncode == 0
    # The rule: "this exact version already exists" is success, whatever the file.
    res = publish(pypiserver["url"], b)
    assert res.returncode == 0, res.stderr
    assert "note: existing file differs" in res.stderr
    assert (pypiserver["dir"] / a[0].name).read_bytes() == a[0].read_bytes()  # nothing overwritten
    # Opt-in strictness: the same conflict fails.
    strict = publish(pypiserver["url"], b, extra=["--require-same-digest"])
    assert strict.returncode == 1
    assert "digest mismatch" in strict.stderr and "--require-same-digest" in strict.stderr
    # ...and identical files still pass in strict mode.
    assert publish(pypiserver["url"], a, extra=["--require-same-digest"]).returncode == 0


class ScriptedIndex:
    """A tiny upload endpoint on 127.0.0.1 answering POSTs from a script of status codes.

    GET /simple/<project>/ lists the files named in `listed` (with their sha256).
    """

    def __init__(self, statuses: List[int], bodies: Optional[Dict[int, str]] = None):
        self.statuses = list(statuses)
        self.bodies = bodies or {}
        self.posts: List[dict] = []
        self.listed: Dict[str, str] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: str):
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                self.rfile.read(n)
                code = outer.statuses.pop(0) if len(outer.statuses) > 1 else outer.statuses[0]
                outer.posts.append({"status": code, "auth": self.headers.get("Authorization", "")})
                self._send(code, outer.bodies.get(code, "scripted answer"))

            def do_GET(self):
                links = "".join(f'<a href="/p/{n}#sha256={h}">{n}</a>' for n, h in outer.listed.items())
                self._send(200, f"<html><body>{links}</body></html>")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def scripted():
    made = []

    def make(statuses, bodies=None):
        s = ScriptedIndex(statuses, bodies)
        made.append(s)
        return s
    yield make
    for s in made:
        s.stop()


def test_server_error_fails_after_bounded_retries_with_backoff(scripted, tmp_path):
    idx = scripted([500])
    whl = make_dists(tmp_path, "assay-five", "1.0.0")[0]
    t0 = time.monotonic()
    res = publish(idx.url, [whl], env={"PUBLISH_ATTEMPTS": "4", "PUBLISH_BACKOFF_BASE": "0.1"})
    assert res.returncode == 1
    assert "attempt 4/4" in res.stderr and "attempt 5/" not in res.stderr
    # One attempt is one twine run; twine itself re-sends a 5xx upload a few times at once.
    assert 4 <= len(idx.posts) <= 4 * 5
    assert "still failing after 4 attempts" in res.stderr and "HTTPError: 500" in res.stderr
    delays = re.findall(r"retrying in ([0-9.]+)s", res.stderr)
    assert delays == ["0.1", "0.2", "0.4"]  # exponential
    assert time.monotonic() - t0 >= 0.7


def test_transient_errors_then_success_and_token_stays_secret(scripted, tmp_path):
    # More 5xx in a row than one twine run re-sends by itself, so our retry must carry it.
    idx = scripted([503] * 6 + [200])
    whl = make_dists(tmp_path, "assay-flaky", "1.0.0")[0]
    idx.listed[whl.name] = hashlib.sha256(whl.read_bytes()).hexdigest()
    token = "pypi-TESTTOKEN-0123456789"
    res = publish(idx.url, [whl], env={"PUBLISH_TOKEN": token, "PUBLISH_ATTEMPTS": "8"})
    assert res.returncode == 0, res.stderr
    assert [p["status"] for p in idx.posts] == [503] * 6 + [200]
    assert "transient error (HTTPError: 503" in res.stderr and f"uploaded {whl.name}" in res.stderr
    assert f"visible: {whl.name} (sha256 matches)" in res.stderr
    expected = "Basic " + base64.b64encode(f"__token__:{token}".encode()).decode()
    assert all(p["auth"] == expected for p in idx.posts)
    assert token not in res.stdout + res.stderr


def test_non_retryable_error_fails_at_once(scripted, tmp_path):
    idx = scripted([403], {403: "Invalid or non-existent authentication information."})
    whl = make_dists(tmp_path, "assay-denied", "1.0.0")[0]
    res = publish(idx.url, [whl], env={"PUBLISH_ATTEMPTS": "5"})
    assert res.returncode == 1
    assert len(idx.posts) == 1
    assert "non-retryable error" in res.stderr


def test_already_exists_but_not_visible_fails(scripted, tmp_path):
    # E.g. a deleted file whose name the index will not take again: "exists" is not enough.
    idx = scripted([400], {400: "This filename has already been used, use a different version."})
    whl = make_dists(tmp_path, "assay-ghost", "1.0.0")[0]
    res = publish(idx.url, [whl], env={"PUBLISH_ATTEMPTS": "2"})
    assert res.returncode == 1
    assert "already exists on the index; treating as success" in res.stderr
    assert "not visible" in res.stderr and "after 2 checks" in res.stderr


def test_connection_refused_is_retried_then_fails(tmp_path):
    whl = make_dists(tmp_path, "assay-nobody", "1.0.0")[0]
    res = publish(f"http://127.0.0.1:{free_port()}/", [whl], env={"PUBLISH_ATTEMPTS": "2"})
    assert res.returncode == 1
    assert res.stderr.count(f"upload {whl.name} (attempt") == 2
    assert "still failing after 2 attempts" in res.stderr


def test_publish_usage_errors(tmp_path):
    whl = make_dists(tmp_path, "assay-usage", "1.0.0")[0]
    assert publish("", [whl]).returncode == 2
    res = run([PUBLISH, "--repository-url", "http://127.0.0.1:9/", tmp_path / "missing.whl"])
    assert res.returncode == 2 and "no such file" in res.stderr
    (tmp_path / "notes.txt").write_text("x")
    res = run([PUBLISH, "--repository-url", "http://127.0.0.1:9/", tmp_path / "notes.txt"])
    assert res.returncode == 2 and "not a dist file" in res.stderr


# --------------------------------------------------------------------------- release gate

def _pyproject_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', project, re.M).group(1)


def test_check_release_passes_for_this_repository():
    version = _pyproject_version()
    res = run([CHECK_RELEASE, f"v{version}"])
    assert res.returncode == 0, res.stderr
    assert f"matches pyproject version {version}" in res.stderr
    res = run([CHECK_RELEASE], env={"GITHUB_REF_NAME": f"v{version}"})
    assert res.returncode == 0, res.stderr


@pytest.fixture
def release_files(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\n\n[project]\nname = "x"\nversion = "0.2.0"\n\n'
        '[tool.other]\nversion = "9.9.9"\n')
    (tmp_path / "CHANGELOG.md").write_text(
        "# Changelog\n\n## [Unreleased]\n\n## [0.2.0rc1] - 2026-01-01\n- rc\n\n"
        "## [0.2.0] - 2026-02-01\n### Fixed\n- a thing\n\n## [0.1.0]\n- first\n")
    return tmp_path


def check_release(files: Path, *args) -> subprocess.CompletedProcess:
    return run([CHECK_RELEASE, "--pyproject", files / "pyproject.toml", "--changelog", files / "CHANGELOG.md", *args],
               env={"GITHUB_REF_NAME": ""})


def test_check_release_tag_and_changelog(release_files):
    ok = check_release(release_files, "--notes-out", release_files / "notes.md", "v0.2.0")
    assert ok.returncode == 0, ok.stderr
    assert (release_files / "notes.md").read_text().strip() == "### Fixed\n- a thing"
    bad_tag = check_release(release_files, "v0.2.1")
    assert bad_tag.returncode == 1 and "does not match the package version '0.2.0'" in bad_tag.stderr
    assert check_release(release_files, "0.2.0").returncode == 1  # the "v" is part of the rule
    assert check_release(release_files).returncode == 2  # no tag at all


def test_check_release_changelog_entry_required(release_files):
    cl = release_files / "CHANGELOG.md"
    cl.write_text("# Changelog\n\n## [0.2.0rc1]\n- rc only\n\n## [0x2y0]\n- not a dot\n")
    res = check_release(release_files, "v0.2.0")
    assert res.returncode == 1 and "has no '## [0.2.0]' section" in res.stderr
    cl.write_text("# Changelog\n\n## [0.2.0] - 2026-02-01\n\n   \n## [0.1.0]\n- first\n")
    res = check_release(release_files, "v0.2.0")
    assert res.returncode == 1 and "section of" in res.stderr and "is empty" in res.stderr
    cl.write_text("# Changelog\n\n## 0.2.0\n- plain heading\n")
    assert check_release(release_files, "v0.2.0").returncode == 0


def _dist_with(d: Path, version: str, with_obj: bool) -> None:
    """A wheel and sdist; the object (if any) listed first, then enough padding that a listing
    piped into `grep -q` would be cut off (the SIGPIPE-under-pipefail trap)."""
    d.mkdir(exist_ok=True)
    pad = [f"assay/padding/module_number_{i:05d}.py" for i in range(3000)]
    names = (["assay/data/assay.bpf.o"] if with_obj else []) + ["assay/__init__.py"] + pad
    with zipfile.ZipFile(d / f"assay_monitor-{version}-py3-none-any.whl", "w") as z:
        for n in names:
            z.writestr(n, b"\x7fELF" if n.endswith(".o") else b"")
    with tarfile.open(d / f"assay_monitor-{version}.tar.gz", "w:gz") as t:
        for n in names:
            t.addfile(tarfile.TarInfo(f"assay_monitor-{version}/{n}"), io.BytesIO(b""))


def test_check_release_dist_contents(release_files):
    dist = release_files / "dist"
    _dist_with(dist, "0.2.0", with_obj=True)
    ok = check_release(release_files, "--dist", dist, "v0.2.0")
    assert ok.returncode == 0, ok.stderr
    (dist / "stray-0.1.0-py3-none-any.whl").write_bytes(b"")
    assert check_release(release_files, "--dist", dist, "v0.2.0").returncode == 1
    shutil.rmtree(dist)
    _dist_with(dist, "0.2.0", with_obj=False)
    res = check_release(release_files, "--dist", dist, "v0.2.0")
    assert res.returncode == 1 and "carries no prebuilt BPF object" in res.stderr
    shutil.rmtree(dist)
    _dist_with(dist, "0.1.9", with_obj=True)
    res = check_release(release_files, "--dist", dist, "v0.2.0")
    assert res.returncode == 1 and "expected one 0.2.0 wheel" in res.stderr
