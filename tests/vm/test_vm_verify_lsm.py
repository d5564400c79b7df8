"""scripts/ci/verify_lsm.sh inside a matrix guest: a kernel with BPF LSM passes the gate."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vm
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "ci", "verify_lsm.sh")


def test_verify_lsm_passes_in_guest():
    if not os.path.exists(SCRIPT):
        pytest.fail(f"{SCRIPT} is not in the guest payload")
    p = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ASSAY=f"{sys.executable} -m assay"))
    assert p.returncode == 0, p.stderr
    assert "OK" in p.stdout
