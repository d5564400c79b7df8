"""A monitor inside a PID namespace of its own (a container without --pid=host) would write ids the
kernel never uses: it refuses, and doctor says why, instead of enforcing nothing in silence."""
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


@pytest.fixture
def in_new_pid_ns():
    if not shutil.which("unshare"):
        pytest.skip("needs unshare (util-linux)")
    return ["unshare", "--pid", "--fork", "--mount-proc"]


def test_monitor_refuses_in_a_pid_namespace_of_its_own(in_new_pid_ns, tmp_path):
    marker = tmp_path / "ran"
    p = subprocess.run(in_new_pid_ns + [sys.executable, "-m", "assay", "monitor", "--", "touch", str(marker)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 40, p.stderr
    assert "PID namespace of its own" in p.stderr and "--pid=host" in p.stderr
    assert "Traceback" not in p.stderr and not marker.exists()
    # the same command in the host's namespace runs (so the refusal above can fail)
    p = subprocess.run([sys.executable, "-m", "assay", "monitor", "-o", "/dev/null", "--", "touch", str(marker)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and marker.exists(), p.stderr


def test_doctor_names_the_pid_namespace(in_new_pid_ns):
    p = subprocess.run(in_new_pid_ns + [sys.executable, "-m", "assay", "doctor"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 40
    line = next(line for line in p.stdout.splitlines() if " pid_namespace " in line)
    assert line.startswith("[FAIL]") and "hostPID" in p.stdout
    p = subprocess.run([sys.executable, "-m", "assay", "doctor"], capture_output=True, text=True, timeout=120)
    assert next(line for line in p.stdout.splitlines() if " pid_namespace " in line).startswith("[ok  ]")
