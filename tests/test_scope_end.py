"""The end of the scope on this host's real kernel: nothing the command started outlives the
monitor, whether the command exits, the monitor fails, or the monitor is killed with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from assay.monitor import Monitor, MonitorOptions

pytestmark = pytest.mark.root
PY = sys.executable


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")


def wait_gone(pids, timeout=10.0) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


# The command leaves two processes behind, each in a new session (setsid, double fork), and
# writes their pids: the classic way to outlive a supervisor.
LEAVE_BEHIND = r'''
import os, sys, time
pids = []
for i in range(2):
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, b"%d\n" % os.getpid())
            if sys.argv[2] == "ignore_term":
                import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)
            time.sleep(float(sys.argv[3]))
            open(sys.argv[1] + ".survived.%d" % i, "w").close()
            os._exit(0)
        os._exit(0)
    os.close(w)
    pids.append(int(os.read(r, 32)))
    os.wait()
open(sys.argv[1], "w").write(" ".join(map(str, pids)))
sys.exit(7)
'''


def leave_behind(tmp_path, how="obey", sleep=30):
    pids = tmp_path / "pids"
    return pids, [PY, "-c", LEAVE_BEHIND, str(pids), how, str(sleep)]


def test_left_behind_processes_get_sigterm_at_scope_end(assay_cmd, tmp_path):
    pids_file, cmd = leave_behind(tmp_path)
    out = tmp_path / "ev.jsonl"
    t0 = time.time()
    p = subprocess.run(assay_cmd + ["monitor", "-o", str(out), "--"] + cmd, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 7, p.stderr  # the command's own status
    pids = [int(x) for x in pids_file.read_text().split()]
    assert wait_gone(pids, 0.5) == [], "a process of the scope outlived the monitor"
    assert time.time() - t0 < 20
    killed = [json.loads(line) for line in out.read_text().splitlines() if '"process_killed"' in line]
    assert sorted(e["pid"] for e in killed) == sorted(pids)
    assert {(e["signal"], e["reason"]) for e in killed} == {("SIGTERM", "scope_end")}
    assert not list(tmp_path.glob("pids.survived.*"))


def test_sigterm_ignored_gets_sigkill_after_the_grace(assay_cmd, tmp_path):
    pids_file, cmd = leave_behind(tmp_path, "ignore_term")
    out = tmp_path / "ev.jsonl"
    t0 = time.time()
    p = subprocess.run(assay_cmd + ["monitor", "--scope-grace", "500ms", "-o", str(out), "--"] + cmd,
                       capture_output=True, text=True, timeout=60)
    took = time.time() - t0
    assert p.returncode == 7, p.stderr
    pids = [int(x) for x in pids_file.read_text().split()]
    assert wait_gone(pids, 0.5) == []
    killed = [json.loads(line) for line in out.read_text().splitlines() if '"process_killed"' in line]
    for pid in pids:
        assert [e["signal"] for e in killed if e["pid"] == pid] == ["SIGTERM", "SIGKILL"]
    assert 0.5 <= took < 15


def test_wait_all_waits_for_the_rest_of_the_scope(assay_cmd, tmp_path):
    pids_file, cmd = leave_behind(tmp_path, sleep=1.5)
    out = tmp_path / "ev.jsonl"
    p = subprocess.run(assay_cmd + ["monitor", "--wait-all", "-o", str(out), "--"] + cmd,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 7, p.stderr
    # both finished their work before the monitor returned, and nobody was killed
    assert len(list(tmp_path.glob("pids.survived.*"))) == 2
    assert '"process_killed"' not in out.read_text()


def test_sigkill_of_the_monitor_ends_its_scope(assay_cmd, tmp_path):
    pids_file, cmd = leave_behind(tmp_path, "ignore_term", sleep=60)
    mon = subprocess.Popen(assay_cmd + ["monitor", "-o", str(tmp_path / "ev"), "--"] + cmd,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while not pids_file.exists() and time.time() < deadline:
            time.sleep(0.05)
        pids = [int(x) for x in pids_file.read_text().split()]
        assert all(alive(p) for p in pids)
        mon.send_signal(signal.SIGKILL)
        mon.wait(10)
        # the watchdog, outside the scope, kills what the monitor can no longer end
        assert wait_gone(pids, 5) == []
    finally:
        if mon.poll() is None:
            mon.kill()


def test_a_fatal_error_in_the_monitor_ends_the_scope_first(tmp_path):
    """The monitor fails while the command runs (here: its event consumer raises): the error
    propagates, but only after every process of the scope is dead."""
    pids_file, cmd = leave_behind(tmp_path, "ignore_term", sleep=60)
    seen = []

    def consumer(ev):
        if ev["type"] == "exit" and pids_file.exists() and not seen:
            seen.append(ev)
            raise RuntimeError("consumer failed")
    mon = Monitor(MonitorOptions(command=tuple(cmd)), on_event=consumer)
    with pytest.raises(RuntimeError, match="consumer failed"):
        mon.run(None)
    pids = [int(x) for x in pids_file.read_text().split()]
    assert wait_gone(pids, 2) == []
