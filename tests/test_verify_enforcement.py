"""scripts/ci/verify_enforcement.sh natively: this host refuses every backend, so the gate must fail closed."""
import os
import subprocess

import pytest

from assay import doctor
from assay.monitor import default_object_path

pytestmark = pytest.mark.root
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ci", "verify_enforcement.sh")


def test_verify_enforcement_fails_closed_without_a_backend(assay_cmd):
    if doctor.enforcer(doctor.run_checks(default_object_path())):
        pytest.skip("this host can enforce; the guest tests cover the passing case")
    p = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, ASSAY=" ".join(assay_cmd)))
    assert p.returncode == 1
    assert p.stderr.startswith("verify_enforcement: FAIL: assay doctor: enforcement not available here")
    assert "enforcer_lsm" in p.stderr and "enforcer_fmod_ret" in p.stderr
