"""Self-protection (issue 13): a root workload in the scope can neither take the monitor's BPF
objects nor signal or trace the monitor, under the row's backend; --no-protect lifts it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_vm_bypass import file_rule, monitor, policy

pytestmark = pytest.mark.vm
PY = sys.executable

TAMPER = r'''
import ctypes, json, os, platform, signal
libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
mon = os.getppid()   # `-- COMMAND` runs as the monitor's child
res = {}

class IdAttr(ctypes.Structure):   # union bpf_attr for *_GET_NEXT_ID and *_GET_FD_BY_ID
    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]

def bpf(cmd, attr):
    r = libc.syscall(NR_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    return r if r >= 0 else -ctypes.get_errno()

def fds(next_cmd, get_cmd):
    out, cur = [], 0
    while True:
        a = IdAttr(id=cur)
        if bpf(next_cmd, a) < 0:
            return out
        cur = a.next_id
        r = bpf(get_cmd, IdAttr(id=cur))
        out.append("fd" if r >= 0 else -r)

res["maps"] = fds(12, 14)    # BPF_MAP_GET_NEXT_ID, BPF_MAP_GET_FD_BY_ID
res["progs"] = fds(11, 13)   # BPF_PROG_GET_NEXT_ID, BPF_PROG_GET_FD_BY_ID
if os.environ.get("ASSAY_TRY_KILL"):
    for name, sig in (("sigterm", signal.SIGTERM), ("sigkill", signal.SIGKILL), ("sigstop", signal.SIGSTOP)):
        try:
            os.kill(mon, sig); res[name] = "ok"
        except OSError as e:
            res[name] = e.errno
    res["ptrace"] = "ok" if libc.ptrace(16, mon, 0, 0) == 0 else ctypes.get_errno()   # PTRACE_ATTACH
    try:
        open(f"/proc/{mon}/mem", "rb").close(); res["proc_mem"] = "ok"
    except OSError as e:
        res["proc_mem"] = e.errno
    os.kill(mon, 0); res["probe"] = "ok"   # asking whether it exists stays allowed
print(json.dumps(res))
'''


def test_a_root_workload_cannot_touch_the_monitor(assay_cmd, tmp_path):
    pol = policy(tmp_path, file_rule("s", ["/etc/hostname"]))
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", TAMPER], env={**os.environ, "ASSAY_TRY_KILL": "1"})
    assert p.returncode == 0, p.stderr           # the monitor lived to report the command's status
    got = json.loads(p.stdout)
    assert len(got["maps"]) >= 10 and set(got["maps"]) == {1}, got["maps"]     # EPERM for every map
    assert len(got["progs"]) >= 5 and set(got["progs"]) == {1}, got["progs"]
    assert {k: got[k] for k in ("sigterm", "sigkill", "sigstop", "ptrace", "proc_mem", "probe")} == {
        "sigterm": 1, "sigkill": 1, "sigstop": 1, "ptrace": 1, "proc_mem": 13, "probe": "ok"}   # /proc/PID/mem: EACCES
    whats = {e["what"] for e in evs if e["type"] == "tamper_blocked"}
    assert whats == {"bpf_map", "bpf_prog", "signal", "ptrace"}, whats
    assert '"summary"' in p.stderr


def test_no_protect_lets_the_scope_take_the_maps(assay_cmd, tmp_path):
    """The same probe with --no-protect: the map fds come back (so the test above can fail)."""
    pol = policy(tmp_path, file_rule("s", ["/etc/hostname"]))
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", TAMPER], "--no-protect")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert "fd" in got["maps"] and "fd" in got["progs"], got
    assert not [e for e in evs if e["type"] == "tamper_blocked"]


def test_monitoring_alone_does_not_protect(assay_cmd, tmp_path):
    """Without a policy nothing is enforced, self-protection included (no decision is loaded)."""
    evs = tmp_path / "ev.jsonl"
    p = subprocess.run(assay_cmd + ["monitor", "-o", str(evs), "--", PY, "-c", TAMPER], capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "fd" in json.loads(p.stdout)["maps"]
