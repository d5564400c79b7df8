"""scripts/ci/verify_enforcement.sh inside a matrix guest: the gate passes and names the row's backend."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.vm
SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "ci", "verify_enforcement.sh")


def run(enforcer):
    if not os.path.exists(SCRIPT):
        pytest.fail(f"{SCRIPT} is not in the guest payload")
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, ASSAY=f"{sys.executable} -m assay", ENFORCER=enforcer))


def test_verify_enforcement_passes_with_the_rows_backend(expected_enforcer):
    p = run("auto")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("verify_enforcement: OK:") and f"enforces via {expected_enforcer} " in p.stdout


def test_verify_enforcement_of_fmod_ret_in_every_guest():
    # fmod_ret needs no LSM list entry: it works in the bpf-LSM guests too.
    p = run("fmod_ret")
    assert p.returncode == 0, p.stderr
    assert "enforces via fmod_ret " in p.stdout
