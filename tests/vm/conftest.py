"""Tests under tests/vm run inside kernel-matrix guests (real kernels, BPF LSM active).

Every test collected here gets the `vm` marker, so host CI (`pytest -m 'not vm'`) deselects them;
a plain host run skips them with the reason below. Inside a guest, kernel-matrix/guest/guest.py
sets ASSAY_VM=1 and ASSAY_VM_ROW to a JSON file describing the row (see the `vm_row` fixture).
"""
import json
import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
IN_GUEST = os.environ.get("ASSAY_VM") == "1"
SKIP_REASON = ("needs a kernel-matrix guest (real kernel with BPF LSM, as root): "
               "run `make matrix` or `make matrix KERNELS=6.1`")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection, so the added marker counts
def pytest_collection_modifyitems(config, items):
    # This hook sees the whole session's items; touch only the ones below this directory.
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        item.add_marker(pytest.mark.vm)
        if not IN_GUEST:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def vm_row():
    """The matrix row this guest was booted for (kernel release, libbpf, Python, ...)."""
    with open(os.environ["ASSAY_VM_ROW"]) as fh:
        return json.load(fh)


@pytest.fixture(scope="session")
def expected_enforcer(vm_row):
    """The backend `assay monitor --enforcer auto` must pick in this row: lsm where the row boots
    with `bpf` in its LSM list, fmod_ret where it boots with Ubuntu's list."""
    return vm_row.get("enforcer", "lsm")


RULE_EVENTS = ("file_blocked", "exec_blocked", "net_blocked", "file_alert", "exec_alert", "net_alert")


@pytest.fixture(autouse=True)
def rule_events_name_the_rows_enforcer(request, tmp_path, expected_enforcer):
    """After every guest test: each rule event any monitor wrote below tmp_path names the backend
    this row must enforce with, so every enforcement test also proves which backend denied."""
    yield
    if not IN_GUEST:
        return
    want = expected_enforcer
    forced = request.node.get_closest_marker("enforcer")
    if forced:
        want = forced.args[0]
    for f in tmp_path.rglob("*"):
        if not f.is_file() or f.stat().st_size > 64 << 20:
            continue
        for line in f.read_bytes().splitlines():
            if not line.startswith(b'{"type":"') or not any(f'"type":"{t}"'.encode() in line for t in RULE_EVENTS):
                continue
            ev = json.loads(line)
            assert ev.get("enforcer") == want, f"{f}: {ev}"
