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
