"""File enforcement by inode identity, proven by denied syscalls inside real kernels (matrix guests)."""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import pathlib
import signal
import tempfile
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.vm
PROBE = os.path.join(os.path.dirname(__file__), "probe.py")
PY = sys.executable


def policy_yaml(rules, kill_switch=None):
    lines = ['version: "2.0"', "name: vm-test", "runtime_monitor:", "  enabled: true", "  rules:"]
    for r in rules:
        lines.append(f"    - id: {r['id']}")
        lines.append(f"      type: {r.get('type', 'file_open')}")
        lines.append(f"      match:")
        lines.append(f"        path_globs: {json.dumps(r['paths'])}")
        if r.get("not"):
            lines.append(f"        not: {{ path_globs: {json.dumps(r['not'])} }}")
        lines.append(f"      action: {r.get('action', 'deny')}")
        if r.get("allow_missing"):
            lines.append("      allow_missing: true")
    if kill_switch:
        lines.append(f"kill_switch: {json.dumps(kill_switch)}")
    return "\n".join(lines) + "\n"


class Run:
    def __init__(self, proc, results, events):
        self.proc, self.results, self.events = proc, results, events

    def of(self, type_):
        return [e for e in self.events if e["type"] == type_]


def run_policy(assay_cmd, tmp_path, rules, steps, kill_switch=None, timeout=120):
    pol = tmp_path / "policy.yaml"
    pol.write_text(policy_yaml(rules, kill_switch))
    plan, res, evs = tmp_path / "plan.json", tmp_path / "results.json", tmp_path / "events.jsonl"
    plan.write_text(json.dumps(steps))
    proc = subprocess.run(assay_cmd + ["monitor", "--policy", str(pol), "-o", str(evs), "--",
                                       PY, PROBE, str(plan), str(res)],
                          capture_output=True, text=True, timeout=timeout)
    results = json.loads(res.read_text()) if res.exists() else {}
    events = [json.loads(line) for line in evs.read_text().splitlines()] if evs.exists() else []
    return Run(proc, results, events)


@pytest.fixture
def files():
    # Outside pytest's tmp_path, whose 0700 parents would stop `nobody` before any LSM does.
    d = pathlib.Path(tempfile.mkdtemp(prefix="assay-vm-", dir="/tmp")) / "data"
    d.mkdir()
    os.chmod(d.parent, 0o755)
    os.chmod(d, 0o755)
    for name in ("secret.txt", "neighbour.txt"):
        (d / name).write_text(name)
        os.chmod(d / name, 0o644)
    return d


def test_denied_for_root_and_nobody_neighbour_readable(assay_cmd, tmp_path, files):
    secret = str(files / "secret.txt")
    r = run_policy(assay_cmd, tmp_path, [{"id": "block-secret", "paths": [secret]}], [
        {"name": "root", "op": "open", "path": secret},
        {"name": "nobody", "op": "as_user", "uid": 65534, "path": secret},
        {"name": "neighbour", "op": "open", "path": str(files / "neighbour.txt")},
        {"name": "neighbour_nobody", "op": "as_user", "uid": 65534, "path": str(files / "neighbour.txt")},
    ])
    assert r.proc.returncode == 0, r.proc.stderr
    assert r.results == {"root": "EPERM", "nobody": "EPERM", "neighbour": "ok", "neighbour_nobody": "ok"}
    blocked = r.of("file_blocked")
    assert len(blocked) == 2
    st = os.stat(secret)
    for ev in blocked:
        assert ev["rule"] == "block-secret" and ev["action"] == "deny" and ev["path"] == secret
        assert ev["ino"] == st.st_ino and ev["dev"] == st.st_dev
    assert {ev["uid"] for ev in blocked} == {0, 65534}


def test_aliases_do_not_bypass(assay_cmd, tmp_path, files):
    secret = files / "secret.txt"
    (tmp_path / "link").symlink_to(secret)
    os.link(secret, tmp_path / "hardlink")
    bind = tmp_path / "bind"
    bind.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mount(os.fsencode(files), os.fsencode(bind), None, 4096, None) == 0  # MS_BIND
    try:
        r = run_policy(assay_cmd, tmp_path, [{"id": "s", "paths": [str(secret)]}], [
            {"name": "symlink", "op": "open", "path": str(tmp_path / "link")},
            {"name": "hardlink", "op": "open", "path": str(tmp_path / "hardlink")},
            {"name": "bind_mount", "op": "open", "path": str(bind / "secret.txt")},
            {"name": "rename", "op": "rename", "src": str(secret), "path": str(files / "renamed.txt")},
            {"name": "renamed", "op": "open", "path": str(files / "renamed.txt")},
            {"name": "proc_fd", "op": "procfd", "path": str(files / "renamed.txt")},
            {"name": "openat2", "op": "openat2", "path": str(files / "renamed.txt")},
            {"name": "neighbour_via_bind", "op": "open", "path": str(bind / "neighbour.txt")},
        ])
    finally:
        libc.umount2(os.fsencode(bind), 2)
    assert r.proc.returncode == 0, r.proc.stderr
    assert r.results == {"symlink": "EPERM", "hardlink": "EPERM", "bind_mount": "EPERM", "rename": "ok",
                         "renamed": "EPERM", "proc_fd": "EPERM", "openat2": "EPERM",
                         "neighbour_via_bind": "ok"}


def test_subtree_covers_new_files_and_not_exception(assay_cmd, tmp_path, files):
    tree = files / "tree"
    (tree / "public").mkdir(parents=True)
    for d in (tree, tree / "public"):
        os.chmod(d, 0o755)
    r = run_policy(assay_cmd, tmp_path, [{"id": "tree", "paths": [f"{tree}/**"], "not": [f"{tree}/public/**"]}], [
        {"name": "create_new", "op": "create", "path": str(tree / "created-after-start.txt")},
        {"name": "create_public", "op": "create", "path": str(tree / "public" / "ok.txt")},
        {"name": "read_public", "op": "open", "path": str(tree / "public" / "ok.txt")},
        {"name": "outside", "op": "open", "path": str(files / "neighbour.txt")},
    ])
    assert r.proc.returncode == 0, r.proc.stderr
    assert r.results == {"create_new": "EPERM", "create_public": "ok", "read_public": "ok", "outside": "ok"}
    # created by the test after the monitor stopped: the file is truly new, so a later run
    # must deny it by its ancestor, not by a key inserted for it at start
    (tree / "later.txt").write_text("x")
    r2 = run_policy(assay_cmd, tmp_path, [{"id": "tree", "paths": [f"{tree}/**"]}], [
        {"name": "deep_new", "op": "create", "path": str(tree / "public" / "deeper.txt")},
        {"name": "later", "op": "open", "path": str(tree / "later.txt")},
    ])
    assert r2.results == {"deep_new": "EPERM", "later": "EPERM"}
    assert all(e["rule"] == "tree" for e in r2.of("file_blocked"))


def test_an_exception_lifts_only_its_own_rule(assay_cmd, tmp_path, files):
    # A `not` of one rule must never switch off another rule's deny.
    lay, side = files / "layers", files / "side"
    for d in (lay / "d" / "pub" / "ok", side):
        d.mkdir(parents=True)
    for path in (lay / "d" / "x", lay / "d" / "keep", lay / "d" / "pub" / "f", lay / "d" / "pub" / "secret",
                 lay / "d" / "pub" / "ok" / "g", side / "keep2"):
        path.write_text(path.name)
    r = run_policy(assay_cmd, tmp_path, [
        {"id": "outer", "paths": [f"{lay}/**"], "not": [f"{lay}/d/pub/ok/**"]},
        {"id": "inner", "paths": [f"{lay}/d/**"], "not": [f"{lay}/d/pub/**", f"{lay}/d/keep"]},
        {"id": "exact", "paths": [f"{lay}/d/pub/secret"]},
        {"id": "side", "paths": [f"{side}/**"], "not": [f"{side}/keep2"]},
        {"id": "no-keep2", "paths": [f"{side}/keep2"]},
    ], [
        {"name": "x", "op": "open", "path": str(lay / "d" / "x")},
        {"name": "pub_f", "op": "open", "path": str(lay / "d" / "pub" / "f")},         # inner lifts, outer denies
        {"name": "keep", "op": "open", "path": str(lay / "d" / "keep")},               # same, for an exact `not`
        {"name": "ok_g", "op": "open", "path": str(lay / "d" / "pub" / "ok" / "g")},   # lifted by both rules
        {"name": "secret", "op": "open", "path": str(lay / "d" / "pub" / "secret")},   # exact deny below a `not`
        {"name": "keep2", "op": "open", "path": str(side / "keep2")},                  # exact deny level with a `not`
        {"name": "outside", "op": "open", "path": str(files / "neighbour.txt")},
    ])
    assert r.proc.returncode == 0, r.proc.stderr
    assert r.results == {"x": "EPERM", "pub_f": "EPERM", "keep": "EPERM", "ok_g": "ok", "secret": "EPERM",
                         "keep2": "EPERM", "outside": "ok"}
    by_path = {e["path"]: e["rule"] for e in r.of("file_blocked")}
    assert by_path[str(lay / "d" / "pub" / "f")] == "outer" and by_path[str(lay / "d" / "keep")] == "outer"
    assert by_path[str(lay / "d" / "pub" / "secret")] == "exact" and by_path[str(side / "keep2")] == "no-keep2"
    assert "exception of rule inner only" in r.proc.stderr


def test_scope_grandchild_denied_outsider_allowed(assay_cmd, tmp_path, files):
    secret = str(files / "secret.txt")
    pol = tmp_path / "policy.yaml"
    pol.write_text(policy_yaml([{"id": "s", "paths": [secret]}]))
    plan, res = tmp_path / "plan.json", tmp_path / "results.json"
    plan.write_text(json.dumps([{"name": "grandchild", "op": "grandchild", "path": secret},
                                {"name": "wait", "op": "sleep", "seconds": 2.0}]))
    mon = subprocess.Popen(assay_cmd + ["monitor", "--policy", str(pol), "-o", str(tmp_path / "ev"), "--",
                                        PY, PROBE, str(plan), str(res)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not res.exists():
            time.sleep(0.1)
        # the monitor is enforcing now (the probe ran its first step); this test process is outside
        with open(secret) as f:
            assert f.read() == "secret.txt"
    finally:
        _, err = mon.communicate(timeout=60)
    assert mon.returncode == 0, err
    assert json.loads(res.read_text())["grandchild"] == "EPERM"


@pytest.mark.parametrize("mode", ["immediate", "graceful"])
def test_kill_modes(assay_cmd, tmp_path, files, mode):
    secret = str(files / "secret.txt")
    steps = [{"name": "ignore_term", "op": "ignore_sigterm"}] if mode == "graceful" else []
    steps += [{"name": "open", "op": "open", "path": secret}, {"name": "after", "op": "sleep", "seconds": 10}]
    r = run_policy(assay_cmd, tmp_path, [{"id": "creds", "paths": [secret], "action": "trigger_kill"}], steps,
                   kill_switch={"enabled": True, "mode": mode, "grace_period_ms": 300,
                                "triggers": [{"on_rule": "creds"}]})
    assert r.proc.returncode == 128 + signal.SIGKILL, r.proc.stderr
    if mode == "immediate":
        assert "open" not in r.results  # killed inside the open call: it never returned
    else:
        assert r.results.get("open") == "EPERM" and "after" not in r.results
    blocked = r.of("file_blocked")
    assert blocked and blocked[0]["action"] == f"kill_{mode}"
    if mode == "graceful":
        assert [e["signal"] for e in r.of("process_killed")] == ["SIGTERM", "SIGKILL"]
    exits = [e for e in r.of("exit") if e["pid"] == blocked[0]["pid"]]
    assert exits and exits[0]["signal"] == signal.SIGKILL


def test_monitor_sigkill_removes_enforcement(assay_cmd, tmp_path, files):
    secret = str(files / "secret.txt")
    pol = tmp_path / "policy.yaml"
    pol.write_text(policy_yaml([{"id": "s", "paths": [secret]}]))
    sleeper = subprocess.Popen([PY, "-c", "import time; time.sleep(120)"])
    mon = subprocess.Popen(assay_cmd + ["monitor", "--all", "--policy", str(pol), "-o", str(tmp_path / "ev")],
                           stderr=subprocess.DEVNULL)
    try:
        deadline, denied = time.time() + 60, False
        while time.time() < deadline and not denied:
            try:
                open(secret).close()
                time.sleep(0.2)
            except PermissionError:
                denied = True
        assert denied, "the --all policy never took effect"
        mon.kill()
        mon.wait(timeout=30)
        time.sleep(0.5)  # links are released when the last fd closes with the process
        with open(secret) as f:
            assert f.read() == "secret.txt"
    finally:
        sleeper.kill()
        sleeper.wait()
        if mon.poll() is None:
            mon.kill()


def test_tmpfs_has_no_generation_but_is_denied(assay_cmd, tmp_path, files):
    secret = str(files / "secret.txt")
    with open(secret) as f:
        with pytest.raises(OSError):
            fcntl.ioctl(f.fileno(), 0x80087601, b"\0" * 8)  # FS_IOC_GETVERSION: ENOTTY on tmpfs
    r = run_policy(assay_cmd, tmp_path, [{"id": "s", "paths": [secret]}],
                   [{"name": "open", "op": "open", "path": secret}])
    assert r.results == {"open": "EPERM"}
    assert r.of("file_blocked")[0]["gen"] != 0  # the kernel's i_generation is random there


def test_alert_action_reports_without_denying(assay_cmd, tmp_path, files):
    secret = str(files / "secret.txt")
    r = run_policy(assay_cmd, tmp_path, [{"id": "watch", "paths": [secret], "action": "alert"}],
                   [{"name": "open", "op": "open", "path": secret}])
    assert r.results == {"open": "ok"}
    alerts = r.of("file_alert")
    assert len(alerts) == 1 and alerts[0]["rule"] == "watch" and not r.of("file_blocked")


def test_missing_path_allowed_is_covered_by_parent(assay_cmd, tmp_path, files):
    later = str(files / "not-yet.txt")
    r = run_policy(assay_cmd, tmp_path, [{"id": "later", "paths": [later], "allow_missing": True}],
                   [{"name": "create", "op": "create", "path": later}])
    assert r.results == {"create": "EPERM"}
    assert "covering it through" in r.proc.stderr
