"""scripts/ci/verify_lsm.sh natively: this host refuses LSM programs, so the gate must fail closed."""
import os
import subprocess
import sys

import pytest

from assay import system

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ci", "verify_lsm.sh")


@pytest.mark.root
def test_verify_lsm_fails_closed_without_usable_bpf_lsm(assay_cmd):
    p = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, ASSAY=f"{sys.executable} -m assay"))
    doctor = subprocess.run(assay_cmd + ["doctor"], capture_output=True, text=True, timeout=120)
    if doctor.returncode == 0:
        pytest.skip("this host has usable BPF LSM; the guest test covers the passing case")
    assert p.returncode != 0
    assert "FAIL" in p.stderr and "load_lsm" in p.stderr or "bpf_lsm" in p.stderr
    assert system.active_lsms() is not None
