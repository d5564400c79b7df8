"""The release wheel in a fresh venv, with no compiler, bpftool or headers on PATH: it must run."""
import glob
import json
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), ROOT], check=True, capture_output=True, timeout=300)
    (whl,) = glob.glob(str(out / "assay_monitor-*.whl"))
    return whl


def test_wheel_ships_the_bpf_object_and_names_libbpf(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "assay/data/assay.bpf.o" in names
    # every subpackage, e.g. the ones `assay report` and the GitHub Action's steps import
    for pkg in sorted({os.path.dirname(p) for p in glob.glob(os.path.join(ROOT, "assay", "**", "__init__.py"),
                                                             recursive=True)}):
        rel = os.path.relpath(pkg, ROOT).replace(os.sep, "/")
        assert f"{rel}/__init__.py" in names, rel
    assert not any(n.endswith((".c", ".h")) for n in names)
    assert "libbpf" in meta  # the system libbpf requirement is stated in the metadata
    assert wheel.endswith("-py3-none-any.whl")


def test_wheel_dependencies_import(wheel):
    """Every Requires-Dist is pure Python and imports here: the matrix guests get exactly these."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith("METADATA"))).decode()
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")
                and "extra ==" not in line]
    names = {r.split(">")[0].split("<")[0].split("=")[0].split(";")[0].strip().lower() for r in requires}
    assert "dnspython" in names            # the DNS proxy reads answers with it (assay/dns/)
    modules = {"dnspython": "dns.message", "ruamel.yaml": "ruamel.yaml", "prometheus_client": "prometheus_client"}
    for n in names:
        __import__(modules.get(n, n.replace("-", "_")))


@pytest.mark.root
def test_fresh_venv_runs_doctor_and_monitor_without_toolchain(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", wheel], capture_output=True, text=True,
                         timeout=600)
    assert pip.returncode == 0, pip.stderr
    # Only the venv on PATH: no clang, bpftool or llvm reachable by name.
    env = {"PATH": f"{venv}/bin", "HOME": str(tmp_path)}
    for tool in ("clang", "bpftool", "llc"):
        assert subprocess.run(["sh", "-c", f"PATH={venv}/bin command -v {tool}"]).returncode != 0
    assay = str(venv / "bin" / "assay")
    doc = subprocess.run([assay, "doctor", "--format", "json"], capture_output=True, text=True, env=env, timeout=120)
    report = json.loads(doc.stdout)
    assert report["monitoring"] is True and doc.returncode in (0, 40)
    out = tmp_path / "ev.jsonl"
    mon = subprocess.run([assay, "monitor", "-o", str(out), "--", "/bin/cat", "/etc/hostname"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert mon.returncode == 0, mon.stderr
    evs = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(e["type"] == "open" and e["path"] == "/etc/hostname" for e in evs)
    imp = subprocess.run([str(venv / "bin" / "python"), "-c", "import assay.dns.proxy, dns.message"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert imp.returncode == 0, imp.stderr
