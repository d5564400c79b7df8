"""The scope map on this host's real kernel: what enters it and what must leave it."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from assay import abi, system
from assay.bpf import Object
from assay.monitor import default_object_path, skip_missing_tracepoints

pytestmark = pytest.mark.root

# The leader thread leaves first with SYS_exit (not exit_group); another thread ends the process.
LEADER_FIRST = r'''
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None)
def last():
    time.sleep(0.3)
    os._exit(0)
threading.Thread(target=last).start()
libc.syscall({"x86_64": 60, "aarch64": 93}[os.uname().machine], 0)  # SYS_exit: this thread only
'''


def test_no_entry_leaks_when_the_leader_thread_exits_first():
    tracefs = system.ensure_tracefs()
    with Object(default_object_path()) as obj:
        skip_missing_tracepoints(obj, tracefs)
        for p in obj.programs.values():
            p.autoload = p.section.startswith("tracepoint/sched/")
        obj.load()
        cfg = abi.Config(monitor_tgid=os.getpid(), event_mask=0)
        obj.maps["assay_config"].update(ctypes.c_uint32(0), cfg)
        obj.attach()
        scope = obj.maps["scope_pids"]
        # the workload starts in scope (as `-- CMD` does) and forks the real test process
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            os.read(r, 1)
            os.execv(sys.executable, [sys.executable, "-c",
                                      "import subprocess, sys; sys.exit(subprocess.run("
                                      f"[sys.executable, '-c', {LEADER_FIRST!r}]).returncode)"])
        os.close(r)
        scope.update(ctypes.c_uint32(pid), ctypes.c_uint32(1))
        os.write(w, b"x")
        os.close(w)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        left = [int.from_bytes(k, "little") for k in scope.keys()]
    assert left == [], f"scope_pids kept {left} after every process of the scope exited"
