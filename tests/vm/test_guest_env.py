"""The guest really is what its matrix row says: kernel, LSM list, BTF, libbpf, Python, wheel."""
import ctypes
import os
import platform
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm


def _dpkg_version(package):
    for stanza in Path("/var/lib/dpkg/status").read_text().split("\n\n"):
        fields = dict(l.split(": ", 1) for l in stanza.splitlines() if ": " in l and not l[:1].isspace())
        if fields.get("Package") == package and "installed" in fields.get("Status", ""):
            return fields["Version"]
    return None


def test_runs_as_root():
    assert os.geteuid() == 0


def test_kernel_release_matches_row(vm_row):
    release = os.uname().release
    assert release == vm_row["kernel_release"]
    assert release.startswith(vm_row["kernel_series"] + ".")


def test_guest_runs_the_rows_architecture(vm_row):
    # An arm64 row must really run arm64 code, not an amd64 guest by mistake.
    assert os.uname().machine == vm_row.get("machine", "x86_64")


def test_lsm_list_is_the_rows(vm_row, expected_enforcer):
    # lsm rows boot with `bpf` in the list; fmod_ret rows with Ubuntu's list, where it is absent.
    active = Path("/sys/kernel/security/lsm").read_text().strip().split(",")
    if expected_enforcer == "lsm":
        assert "bpf" in active, f"active LSMs: {active}, booted with lsm={vm_row['lsm']}"
    else:
        assert "bpf" not in active, f"active LSMs: {active}, booted with lsm={vm_row['lsm']}"
        assert {"yama", "apparmor"} <= set(active), active


def test_kernel_btf_present():
    btf = Path("/sys/kernel/btf/vmlinux")
    assert btf.is_file() and btf.stat().st_size > 0


def test_bpffs_and_tracing_mounted():
    mounts = {line.split()[1]: line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()}
    assert mounts.get("/sys/fs/bpf") == "bpf"
    assert mounts.get("/sys/fs/cgroup") == "cgroup2"
    assert Path("/sys/kernel/tracing/events").is_dir() or Path("/sys/kernel/debug/tracing/events").is_dir()


def test_libbpf_soname_and_version(vm_row):
    ctypes.CDLL(vm_row["libbpf_soname"])  # raises OSError if the soname is missing
    version = _dpkg_version(vm_row["libbpf_package"])
    assert version is not None, f"{vm_row['libbpf_package']} not installed"
    upstream = version.split(":", 1)[-1].rsplit("-", 1)[0]
    assert upstream == vm_row["libbpf_version"] or upstream.startswith(vm_row["libbpf_version"] + ".")


def test_python_version(vm_row):
    assert "%d.%d" % sys.version_info[:2] == vm_row["python"]
    assert platform.python_version() == vm_row["python_full"]


def test_assay_comes_from_the_wheel():
    # The guest gets the built wheel, never the source tree: this is what users install.
    import assay
    from importlib import metadata

    assert metadata.version("assay-monitor")
    pkg = Path(assay.__file__).resolve().parent
    assert str(pkg).startswith("/opt/assay/pkg/")
    assert list((pkg / "data").glob("*.bpf.o")), "the wheel has no BPF object"


def test_wheel_dependencies_import():
    # Every Requires-Dist of the wheel reaches the guest (kernel-matrix/payload.py installs them):
    # --metrics-addr needs prometheus_client.
    import prometheus_client

    from assay import metrics

    assert prometheus_client.__file__.startswith("/opt/assay/deps/"), prometheus_client.__file__
    assert metrics.parse_addr(":9464") == ("127.0.0.1", 9464)
