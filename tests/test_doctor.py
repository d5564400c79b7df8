"""`assay doctor` on this host: its verdict must match what the kernel really does."""
import json
import os
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.root


def lsm_loads_natively(obj_path):
    """Independent of our loader: bpftool loads every program of the object, the LSM one included."""
    pin = "/sys/fs/bpf/assay-doctor-probe"
    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=False)
    p = subprocess.run(["bpftool", "prog", "loadall", obj_path, pin], capture_output=True, text=True)
    shutil.rmtree(pin, ignore_errors=True)
    subprocess.run(["rm", "-rf", pin])
    return p.returncode == 0


def test_doctor_json_matches_kernel(assay_cmd, obj_path):
    p = subprocess.run(assay_cmd + ["doctor", "--format", "json"], capture_output=True, text=True, timeout=60)
    report = json.loads(p.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["load_tracepoint"]["ok"] is True
    lsm_ok = lsm_loads_natively(obj_path)
    assert checks["load_lsm"]["ok"] is lsm_ok
    assert p.returncode == (0 if lsm_ok else 40) == report["exit_code"]
    assert report["monitoring"] is True
    if not lsm_ok:
        assert checks["load_lsm"]["fix"]
        assert report["enforcement"] is False


def test_doctor_text_names_fix(assay_cmd):
    p = subprocess.run(assay_cmd + ["doctor"], capture_output=True, text=True, timeout=60)
    assert "load_lsm" in p.stdout and "Traceback" not in p.stderr
    if p.returncode == 40:
        assert "fix:" in p.stdout and "NOT available (exit 40)" in p.stdout
