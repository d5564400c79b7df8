"""`assay doctor` on this host: its verdict must match what the kernel really does."""
import json
import os
import shutil
import subprocess

import pytest

from assay import system

pytestmark = pytest.mark.root
PROBE_SRC = os.path.join(os.path.dirname(__file__), "data", "bpf", "trampoline_probe.c")


def loads_natively(section, tmp_path):
    """Independent of our loader and object: clang builds a one-line program for `section`, and
    bpftool loads it."""
    obj = tmp_path / "probe.o"
    subprocess.run(["clang", "-O2", "-target", "bpf", f'-DSECTION="{section}"', "-c", PROBE_SRC, "-o", str(obj)],
                   check=True)
    if not os.path.ismount("/sys/fs/bpf"):
        subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=False)
    pin = f"/sys/fs/bpf/assay-doctor-probe-{os.getpid()}"
    p = subprocess.run(["bpftool", "prog", "loadall", str(obj), pin], capture_output=True, text=True)
    shutil.rmtree(pin, ignore_errors=True)
    return p.returncode == 0


def fanotify_permission_events():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.fanotify_init(0x04 | 0x01, os.O_RDONLY)  # FAN_CLASS_CONTENT | FAN_CLOEXEC
    if fd < 0:
        return False
    os.close(fd)
    return True


@pytest.fixture
def truth(tmp_path):
    """What each backend can do here, found without Assay."""
    lsm = system.bpf_lsm_active() and loads_natively("lsm/file_open", tmp_path)
    fmod = loads_natively("fmod_ret/security_file_open", tmp_path)
    host = bool(system.cgroup2_mounts()) and loads_natively("cgroup/connect4", tmp_path) and fanotify_permission_events()
    return {"lsm": lsm, "fmod_ret": fmod, "host": host}


def first_backend(truth):
    return next((b for b in ("lsm", "fmod_ret", "host") if truth[b]), None)


def test_doctor_json_matches_kernel(assay_cmd, truth):
    p = subprocess.run(assay_cmd + ["doctor", "--format", "json"], capture_output=True, text=True, timeout=60)
    report = json.loads(p.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["load_tracepoint"]["ok"] is True
    assert checks["enforcer_lsm"]["ok"] is truth["lsm"]
    assert checks["enforcer_fmod_ret"]["ok"] is truth["fmod_ret"]
    assert checks["enforcer_host"]["ok"] is truth["host"]
    any_ok = first_backend(truth) is not None
    assert p.returncode == (0 if any_ok else 40) == report["exit_code"]
    assert report["monitoring"] is True
    assert report["enforcement"] is any_ok
    assert report["enforcer"] == first_backend(truth)
    for name in ("lsm", "fmod_ret", "host"):
        if not truth[name]:
            assert checks[f"enforcer_{name}"]["fix"]


def test_doctor_text_names_each_backend_and_its_fix(assay_cmd, truth):
    p = subprocess.run(assay_cmd + ["doctor"], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in p.stderr
    lines = p.stdout.splitlines()
    any_ok = first_backend(truth) is not None
    for name in ("lsm", "fmod_ret", "host"):
        line = next(line for line in lines if f" enforcer_{name} " in line)
        assert line.startswith("[ok  ]" if truth[name] else "[warn]" if any_ok else "[FAIL]"), line
    if p.returncode == 40:
        assert "fix:" in p.stdout and lines[-1].endswith("enforcement: NOT available (exit 40)")
    else:
        assert lines[-1].endswith(f"enforcement: available via {first_backend(truth)}")


def test_libbpf_lines_show_only_when_asked(assay_cmd):
    """libbpf's own lines (the verifier's among them) reach stderr at --log-level info, and at the
    default level libbpf is given no print callback at all."""
    quiet = subprocess.run(assay_cmd + ["monitor", "-o", "/dev/null", "--", "true"], capture_output=True, text=True)
    loud = subprocess.run(assay_cmd + ["--log-level", "debug", "monitor", "-o", "/dev/null", "--", "true"],
                          capture_output=True, text=True)
    assert quiet.returncode == 0 and loud.returncode == 0, (quiet.stderr, loud.stderr)
    assert "libbpf" not in quiet.stderr
    assert loud.stderr.count("libbpf") > 10
