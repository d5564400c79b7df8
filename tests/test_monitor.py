"""`assay monitor` against this host's real kernel: events, scope, fork inheritance, drops, signals."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

pytestmark = pytest.mark.root
PY = sys.executable


def run_monitor(assay_cmd, args, timeout=60, **kw):
    p = subprocess.run(assay_cmd + ["monitor"] + args, capture_output=True, text=True, timeout=timeout, **kw)
    return p


def events_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summary_of(stderr):
    lines = [json.loads(line) for line in stderr.splitlines() if line.startswith('{"summary"')]
    assert lines, f"no summary on stderr: {stderr!r}"
    return lines[-1]["summary"]


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
                c.close()
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def test_command_events_exec_open_connect(assay_cmd, tmp_path, listener):
    out = tmp_path / "ev.jsonl"
    outsider_file = tmp_path / "outsider-marker"
    stop = threading.Event()

    def outsider():  # a process outside the scope opening files all along
        while not stop.is_set():
            with open(outsider_file, "w"):
                pass
            time.sleep(0.01)
    t = threading.Thread(target=outsider, daemon=True)
    t.start()
    script = f"cat /etc/hostname >/dev/null; {PY} -c 'import socket; socket.create_connection((\"127.0.0.1\", {listener})).close()'"
    try:
        p = run_monitor(assay_cmd, ["-o", str(out), "--", "sh", "-c", script])
    finally:
        stop.set()
        t.join()
    assert p.returncode == 0, p.stderr
    evs = events_of(out)
    sh_exec = [e for e in evs if e["type"] == "exec" and e["filename"].endswith("/sh")]
    assert sh_exec, "no exec event for sh"
    sh_pid = sh_exec[0]["pid"]
    cat_opens = [e for e in evs if e["type"] == "open" and e["path"] == "/etc/hostname"]
    assert len(cat_opens) == 1
    o = cat_opens[0]
    assert o["comm"] == "cat" and o["ret"] >= 0 and o["ppid"] == sh_pid and o["pid"] != sh_pid
    assert o["flags"].startswith("O_RDONLY") and o["syscall"] == "openat"
    conns = [e for e in evs if e["type"] == "connect" and e["port"] == listener]
    assert len(conns) == 1 and conns[0]["addr"] == "127.0.0.1" and conns[0]["ret"] == 0
    assert conns[0]["family"] == "inet" and conns[0]["ppid"] == sh_pid
    assert conns[0]["op"] == "connect"
    exits = [e for e in evs if e["type"] == "exit" and e["pid"] == sh_pid]
    assert exits and exits[0]["exit_code"] == 0
    for e in evs:
        for key in ("type", "ts", "pid", "ppid", "uid", "comm", "cgroup_id"):
            assert key in e
    assert not [e for e in evs if e.get("path", "").endswith("outsider-marker")], "out-of-scope events leaked"
    assert all(e["pid"] != os.getpid() for e in evs)
    s = summary_of(p.stderr)
    assert s["dropped"] == 0 and s["total"] == len(evs) and s["exit_status"] == 0


SENDS = r'''
import socket, sys
port = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(50):                                   # one destination, many datagrams
    u.sendto(b"x", ("127.0.0.1", port))
u.sendmsg([b"x"], [], 0, ("127.0.0.2", port))         # sendmsg with an address
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u6.sendto(b"x", ("::1", port))
c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
c.connect(("127.0.0.3", port))
c.send(b"x")                                          # no address: judged by its connect
'''


def test_sends_that_name_a_destination_are_reported_once_per_process(assay_cmd, tmp_path):
    # Recordings must see every destination the net rules judge, sendto/sendmsg ones included.
    out = tmp_path / "ev.jsonl"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        p = run_monitor(assay_cmd, ["-o", str(out), "--", PY, "-c", SENDS, str(port)])
    assert p.returncode == 0, p.stderr
    nets = [(e["op"], e["addr"], e["port"], e["ret"]) for e in events_of(out)
            if e["type"] == "connect" and e["port"] == port]
    assert sorted(nets) == sorted([("sendmsg", "127.0.0.1", port, 0), ("sendmsg", "127.0.0.2", port, 0),
                                   ("sendmsg", "::1", port, 0), ("connect", "127.0.0.3", port, 0)])


def test_child_forked_after_start_is_in_scope(assay_cmd, tmp_path):
    marker = tmp_path / "forked"
    # A process that is already running when the monitor starts, and forks children (and
    # grandchildren) later; only the pid is given to the monitor.
    code = textwrap.dedent(f"""
        import os, time
        end = time.time() + 6
        while time.time() < end:
            pid = os.fork()
            if pid == 0:
                g = os.fork()
                if g == 0:
                    open({str(marker)!r} + "-grandchild", "w").close()
                    os._exit(0)
                os.waitpid(g, 0)
                open({str(marker)!r} + "-child", "w").close()
                os._exit(0)
            os.waitpid(pid, 0)
            time.sleep(0.1)
    """)
    proc = subprocess.Popen([PY, "-c", code])
    try:
        time.sleep(0.3)
        out = tmp_path / "ev.jsonl"
        p = run_monitor(assay_cmd, ["--pid", str(proc.pid), "--duration", "3s", "-o", str(out)])
        assert p.returncode == 0, p.stderr
    finally:
        proc.kill()
        proc.wait()
    evs = events_of(out)
    child = [e for e in evs if e["type"] == "open" and e["path"].endswith("forked-child")]
    grand = [e for e in evs if e["type"] == "open" and e["path"].endswith("forked-grandchild")]
    assert child and all(e["ppid"] == proc.pid and e["pid"] != proc.pid for e in child)
    assert grand and all(e["ppid"] not in (proc.pid, os.getpid()) for e in grand)
    forks = [e for e in evs if e["type"] == "fork" and e["pid"] == proc.pid]
    assert forks


def test_tiny_ring_buffer_flood_counts_drops(assay_cmd, tmp_path):
    out = tmp_path / "ev.jsonl"
    n = 30000
    code = f"import os\nfor i in range({n}):\n    os.close(os.open('/dev/null', os.O_RDONLY))\n"
    p = run_monitor(assay_cmd, ["--ringbuf-size", "4096", "-o", str(out), "--", PY, "-c", code])
    assert p.returncode == 0, p.stderr
    s = summary_of(p.stderr)
    devnull = [e for e in events_of(out) if e["type"] == "open" and e["path"] == "/dev/null"]
    assert s["dropped"] > 0, s
    assert "events were dropped" in p.stderr
    # every open either arrived or was counted as dropped: nothing lost silently
    assert len(devnull) + s["dropped"] >= n
    assert s["total"] == len(events_of(out))


def test_exit_status_of_command_is_returned(assay_cmd, tmp_path):
    p = run_monitor(assay_cmd, ["-o", str(tmp_path / "e"), "--", "sh", "-c", "exit 7"])
    assert p.returncode == 7
    assert summary_of(p.stderr)["exit_status"] == 7


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_cleanly_with_summary(assay_cmd, tmp_path, sig):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        mon = subprocess.Popen(assay_cmd + ["monitor", "--pid", str(sleeper.pid), "-o", str(tmp_path / "e")],
                               stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        mon.send_signal(sig)
        _, err = mon.communicate(timeout=20)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert mon.returncode == 0, err
    assert "Traceback" not in err
    assert summary_of(err)["dropped"] == 0


def test_control_characters_and_bad_utf8_are_escaped(assay_cmd, tmp_path):
    name = b"evil\x1b[31m\x01\xff.txt"
    path = os.fsencode(tmp_path) + b"/" + name
    code = f"open({path!r}, 'w').close()"
    out = tmp_path / "ev.jsonl"
    p = run_monitor(assay_cmd, ["-o", str(out), "--", PY, "-c", code])
    assert p.returncode == 0, p.stderr
    raw = out.read_bytes()
    assert b"\x1b" not in raw and b"\xff" not in raw
    evs = [e for e in events_of(out) if e["type"] == "open" and "evil" in e["path"]]
    assert evs and evs[0]["path"].endswith("evil\\x1b[31m\\x01\\xff.txt")
    p = run_monitor(assay_cmd, ["--format", "text", "--", PY, "-c", code])
    assert "\x1b" not in p.stdout and "evil\\x1b[31m\\x01\\xff.txt" in p.stdout


def test_scope_limit_keeps_a_reserve():
    from assay.monitor import scope_limit
    assert scope_limit(64) == 48 and scope_limit(65536) == 65536 - 1024
    assert all(0 < scope_limit(n) < n for n in (64, 100, 4096, 1 << 22))


def test_every_decision_belongs_to_a_kind_of_rule(obj_path):
    """A run loads only the decisions its policy needs: a decision missing from HOOKS_FOR would
    never load, so every one of the object's must be in it, for both backends."""
    from assay import enforcers
    from assay.bpf import Object
    with Object(obj_path) as obj:
        progs = [p for p in obj.programs.values() if enforcers.is_enforcing(p)]
        every = set().union(*enforcers.HOOKS_FOR.values())
        owned = {b.name: {enforcers.hook_of(p) for p in progs if b.owns(p)} for b in enforcers.BACKENDS}
        assert owned["lsm"] == owned["fmod_ret"] == every
        assert owned["host"] == set().union(*enforcers.HOST_HOOKS_FOR.values())
        enforcers.select_programs(obj, enforcers.BACKENDS[1], enforcers.needed_hooks(["net"]))
        loaded = {p.name for p in progs if p.autoload}
    assert loaded == {"fmod_task_alloc", "fmod_socket_connect", "fmod_socket_sendmsg", "fmod_socket_setsockopt",
                      "fmod_sctp_bind_connect"}


def test_ready_file_and_sd_notify_once_attached(assay_cmd, tmp_path):
    """A launcher (the GitHub Action, systemd) learns when the programs are attached: --ready-file
    holds the monitor's pid and NOTIFY_SOCKET gets READY=1, and a child forked after that is seen."""
    ready, out = tmp_path / "ready", tmp_path / "ev.jsonl"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(60)
    target = subprocess.Popen(["sleep", "60"])
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    mon = subprocess.Popen(assay_cmd + ["monitor", "--pid", str(target.pid), "--ready-file", str(ready),
                                        "-o", str(out)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg.splitlines() and f"MAINPID={mon.pid}" in msg.splitlines()
        assert ready.read_text() == f"{mon.pid}\n"
        assert mon.poll() is None
    finally:
        target.kill()
        target.wait()
        mon.send_signal(signal.SIGINT)
        err = mon.communicate(timeout=60)[1]
        sock.close()
    assert summary_of(err)["events"].get("exit", 0) >= 1, err  # the target's exit, seen after READY


def test_sd_notify_without_a_manager_is_a_no_op(tmp_path):
    import structlog
    from assay import notify
    assert notify.sd_notify("READY=1", env={}) is False
    # a socket path nobody listens on: logged, never raised
    with structlog.testing.capture_logs() as logs:
        assert notify.sd_notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "none")}) is False
    assert [e["event"] for e in logs] == ["sd_notify failed"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"assay-test-{os.getpid()}"
    sock.bind("\0" + name)
    assert notify.sd_notify("READY=1", env={"NOTIFY_SOCKET": "@" + name}) is True
    assert sock.recv(64) == b"READY=1"
    sock.close()


def test_stop_file_stops_the_monitor_only_with_its_token(assay_cmd, tmp_path):
    # The launcher's way to stop it: self-protection refuses signals from the scope (docs/action.md).
    sleeper = subprocess.Popen(["sleep", "60"])
    stop, ready, out = tmp_path / "stop", tmp_path / "ready", tmp_path / "ev.jsonl"
    token = "a" * 64
    stop.write_text(token + "\n")
    try:
        p = subprocess.Popen(assay_cmd + ["monitor", "--pid", str(sleeper.pid), "-o", str(out), "--ready-file",
                                          str(ready), "--stop-file", str(stop)],
                             stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert ready.exists() and not stop.exists(), "the token file is taken (removed) before ready"
        stop.write_text("b" * 64 + "\n")
        time.sleep(1.0)
        assert p.poll() is None and not stop.exists(), "a wrong token must neither stop it nor stay"
        stop.write_text(token + "\n")
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "did not hold the stop token: ignored and removed" in err
        assert summary_of(err)["exit_status"] is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stop_file_missing_or_short_is_a_usage_error(assay_cmd, tmp_path):
    p = run_monitor(assay_cmd, ["--pid", str(os.getpid()), "--stop-file", str(tmp_path / "none")])
    assert p.returncode == 1 and "--stop-file" in p.stderr and "No such file" in p.stderr
    (tmp_path / "short").write_text("abc")
    p = run_monitor(assay_cmd, ["--pid", str(os.getpid()), "--stop-file", str(tmp_path / "short")])
    assert p.returncode == 1 and "at least 16 bytes" in p.stderr
