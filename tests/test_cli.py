"""Bad arguments: a clear one-line message and the documented exit code, never a traceback."""
import subprocess

import pytest


def run(assay_cmd, *args):
    return subprocess.run(assay_cmd + list(args), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args,needle", [
    (["monitor", "--format", "xml", "--", "true"], "--format"),
    (["monitor"], "nothing to monitor"),
    (["monitor", "--duration", "soon", "--", "true"], "invalid duration"),
    (["monitor", "--ringbuf-size", "1000", "--", "true"], "power of 2"),
    (["monitor", "--pid", "notanumber"], "--pid"),
    (["monitor", "--max-scope", "10", "--", "true"], "--max-scope"),
    (["monitor", "--bogus"], "--bogus"),
    (["nosuchcommand"], "nosuchcommand"),
    (["doctor", "--format", "yaml"], "--format"),
    (["--log-level", "loud", "doctor"], "--log-level"),
])
def test_usage_errors_exit_1(assay_cmd, args, needle):
    p = run(assay_cmd, *args)
    assert p.returncode == 1, (p.returncode, p.stderr)
    assert needle in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.root
def test_missing_pid_is_a_usage_error(assay_cmd):
    p = run(assay_cmd, "monitor", "--pid", "999999999")
    assert p.returncode == 1 and "no such process" in p.stderr


@pytest.mark.root
@pytest.mark.parametrize("args,needle", [
    (["monitor", "--cgroup", "/nonexistent/cgroup", "--", "true"], "cannot resolve cgroup"),
    (["monitor", "--cgroup", "/tmp", "--", "true"], "not on a cgroup v2"),
    (["monitor", "--ebpf", "/nonexistent.bpf.o", "--", "true"], "BPF object not found"),
])
def test_bpf_and_cgroup_failures_exit_40(assay_cmd, args, needle):
    p = run(assay_cmd, *args)
    assert p.returncode == 40, (p.returncode, p.stderr)
    assert needle in p.stderr and "Traceback" not in p.stderr
    assert len([line for line in p.stderr.splitlines() if line.startswith("assay: error")]) == 1


def test_version(assay_cmd):
    p = run(assay_cmd, "--version")
    assert p.returncode == 0 and p.stdout.startswith("assay ")
