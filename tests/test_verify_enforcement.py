"""scripts/ci/verify_enforcement.sh natively: it passes through the host backend, and fails closed
when told to use a backend this kernel refuses."""
import os
import subprocess

import pytest

from assay import doctor
from assay.enforcers import host
from assay.monitor import default_object_path

pytestmark = pytest.mark.root
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "ci", "verify_enforcement.sh")


def run(assay_cmd, enforcer):
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, ASSAY=" ".join(assay_cmd), ENFORCER=enforcer))


def test_verify_enforcement_passes_through_the_host_backend(assay_cmd):
    why = host._precheck()
    if why:
        pytest.skip(f"the host backend cannot work here: {why}")
    p = run(assay_cmd, "host")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("verify_enforcement: OK:") and "enforces via host " in p.stdout


def test_verify_enforcement_fails_closed_with_a_refused_backend(assay_cmd):
    checks = {c.name: c for c in doctor.run_checks(default_object_path())}
    if checks["enforcer_lsm"].ok:
        pytest.skip("this kernel runs BPF LSM programs: the guests cover a refused backend")
    p = run(assay_cmd, "lsm")
    assert p.returncode == 1
    assert p.stderr.startswith("verify_enforcement: FAIL: assay monitor --enforcer lsm exited 40"), p.stderr
