"""The shipped object on a real kernel: it loads, every backend that the row offers attaches and
denies through the loader, the other one is refused as documented, events stream."""
import ctypes
import json
import os
import subprocess

import pytest

from assay import abi, enforce, enforcers, system
from assay.bpf import Object, RingBuffer
from assay.monitor import default_object_path, skip_missing_tracepoints

pytestmark = pytest.mark.vm


# Syscalls an architecture does not have: their tracepoints are absent and the loader skips them.
ABSENT = {"x86_64": set(), "aarch64": {"assay_open_enter", "assay_open_exit"}}


def usable(expected_enforcer):
    """lsm rows can use both backends (fmod_ret needs no LSM list entry); fmod_ret rows only fmod_ret."""
    return ["lsm", "fmod_ret"] if expected_enforcer == "lsm" else ["fmod_ret"]


def backend(name):
    return enforcers.candidates(name)[0]


def assert_refused(name, assay_cmd, tmp_path):
    """The documented refusal: --enforcer lsm without `bpf` in the LSM list exits 40 and says why,
    before the workload runs (its hooks would attach but never be called)."""
    assert name == "lsm"
    assert backend(name).precheck().startswith("bpf is not an active LSM")
    pol = tmp_path / "p.yaml"
    pol.write_text('version: "2.0"\nname: t\nruntime_monitor:\n  enabled: true\n  rules:\n'
                   "    - id: s\n      type: file_open\n      match: { path_globs: ['/etc/hostname'] }\n"
                   "      action: deny\n")
    marker = tmp_path / "ran"
    p = subprocess.run(assay_cmd + ["monitor", "--enforcer", name, "--policy", str(pol), "--", "touch", str(marker)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 40, p.stderr
    assert "  lsm: bpf is not an active LSM (active: " in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()


@pytest.mark.parametrize("name", ["lsm", "fmod_ret"])
def test_every_program_of_a_backend_loads_and_attaches(name, expected_enforcer, assay_cmd, tmp_path):
    if name not in usable(expected_enforcer):
        return assert_refused(name, assay_cmd, tmp_path)
    tracefs = system.ensure_tracefs()
    assert tracefs
    b = backend(name)

    def open_object():
        obj = Object(default_object_path())
        assert set(skip_missing_tracepoints(obj, tracefs)) == ABSENT[os.uname().machine]
        return obj

    with enforcers.load_and_attach(open_object, b) as obj:
        links = obj.attach()
        attached = {link.program.name for link in links}
        wanted = {p.name for p in obj.programs.values() if not enforcers.is_enforcing(p) or b.owns(p)}
        assert attached == wanted - ABSENT[os.uname().machine]
        hooks = {"file_open", "bprm_check_security" if name == "lsm" else "bprm_check", "mmap_file",
                 "file_mprotect", "inode_rename", "inode_link", "socket_connect", "socket_sendmsg",
                 "socket_setsockopt", "task_alloc", "sctp_bind_connect", "bpf_map", "bpf_prog", "task_kill",
                 "ptrace_access_check", "bpf", "kernel_read_file", "kernel_load_data", "sb_mount", "move_mount",
                 "sb_pivotroot", "fs_context_parse_param"}
        assert {obj.programs[n].section.split("/")[-1].replace("security_", "") for n in b.programs(obj)} == hooks


@pytest.mark.parametrize("name", ["lsm", "fmod_ret"])
def test_trivial_deny_through_loader(name, expected_enforcer, assay_cmd, tmp_path):
    if name not in usable(expected_enforcer):
        return assert_refused(name, assay_cmd, tmp_path)
    target = tmp_path / "denied"
    target.write_text("x")
    with enforcers.load_and_attach(lambda: Object(default_object_path()), backend(name)) as obj:
        for key in enforce.identify(str(target)).keys():
            obj.maps["file_deny"].update(key, bytes(abi.RuleRef(rule_id=1, action=int(abi.Action.DENY))))
        cfg = abi.Config(scope_all=1, monitor_tgid=os.getpid(), enforce=1, file_rules=abi.RULES_DENY)
        obj.maps["assay_config"].update(ctypes.c_uint32(0), cfg)
        got = []
        rb = RingBuffer(obj.maps["events"], got.append)
        p = subprocess.run(["cat", str(target)], capture_output=True, text=True)
        assert p.returncode != 0 and "Operation not permitted" in p.stderr
        rb.poll(1000)
        rb.close()
    assert got, "no file_blocked event"
    # after close, the program is gone: the file opens again
    assert subprocess.run(["cat", str(target)], capture_output=True).returncode == 0


def test_events_stream(assay_cmd, tmp_path):
    out = tmp_path / "ev.jsonl"
    p = subprocess.run(assay_cmd + ["monitor", "-o", str(out), "--", "cat", "/proc/version"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    evs = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(e["type"] == "open" and e["path"] == "/proc/version" and e["ret"] >= 0 for e in evs)
    assert any(e["type"] == "exec" for e in evs) and any(e["type"] == "exit" for e in evs)


def test_doctor_passes_in_guest_and_names_the_rows_backend(assay_cmd, expected_enforcer):
    p = subprocess.run(assay_cmd + ["doctor", "--format", "json"], capture_output=True, text=True, timeout=120)
    report = json.loads(p.stdout)
    assert p.returncode == 0, json.dumps(report, indent=1)
    assert report["enforcement"] is True and report["enforcer"] == expected_enforcer
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["enforcer_fmod_ret"]["ok"] is True
    assert checks["enforcer_lsm"]["ok"] is (expected_enforcer == "lsm")
    text = subprocess.run(assay_cmd + ["doctor"], capture_output=True, text=True, timeout=120).stdout
    assert text.splitlines()[-1] == f"monitoring: available; enforcement: available via {expected_enforcer}"
