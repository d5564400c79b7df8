"""The shipped object on a real kernel with BPF LSM: it loads, every program attaches, events stream."""
import ctypes
import json
import os
import subprocess
import sys

import pytest

from assay import abi, enforce, system
from assay.bpf import Object, RingBuffer
from assay.monitor import default_object_path, skip_missing_tracepoints

pytestmark = pytest.mark.vm


# Syscalls an architecture does not have: their tracepoints are absent and the loader skips them.
ABSENT = {"x86_64": set(), "aarch64": {"assay_open_enter", "assay_open_exit"}}


def test_every_program_loads_and_attaches():
    tracefs = system.ensure_tracefs()
    assert tracefs
    with Object(default_object_path()) as obj:
        skipped = skip_missing_tracepoints(obj, tracefs)
        assert set(skipped) == ABSENT[os.uname().machine]
        obj.load()
        links = obj.attach()
        assert {link.program.name for link in links} == set(obj.programs) - set(skipped)
        assert any(p.is_lsm for p in obj.programs.values())


def test_trivial_lsm_deny_through_loader(tmp_path):
    target = tmp_path / "denied"
    target.write_text("x")
    with Object(default_object_path()) as obj:
        obj.load()
        for key in enforce.identify(str(target)).keys():
            obj.maps["file_deny"].update(key, bytes(abi.RuleRef(rule_id=1, action=int(abi.Action.DENY))))
        cfg = abi.Config(scope_all=1, monitor_tgid=os.getpid(), enforce=1, file_rules=abi.RULES_DENY)
        obj.maps["assay_config"].update(ctypes.c_uint32(0), cfg)
        got = []
        rb = RingBuffer(obj.maps["events"], got.append)
        obj.attach([p.name for p in obj.programs.values() if p.is_lsm])
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


def test_doctor_passes_in_guest(assay_cmd):
    p = subprocess.run(assay_cmd + ["doctor", "--format", "json"], capture_output=True, text=True, timeout=120)
    report = json.loads(p.stdout)
    assert p.returncode == 0, json.dumps(report, indent=1)
    assert report["enforcement"] is True
