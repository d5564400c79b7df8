"""The host backend (--enforcer host), natively on this kernel: fanotify answers file and exec rules,
cgroup programs judge connects. Every case is a syscall the real kernel refuses, or lets through."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "vm"))
from test_vm_net_exec import CONNECT, EXEC, servers  # noqa: E402,F401  (servers is a fixture)

from assay.enforcers import host as host_backend  # noqa: E402

pytestmark = pytest.mark.root
PROBE = os.path.join(HERE, "vm", "probe.py")
PY = sys.executable
NOBODY = 65534


@pytest.fixture(autouse=True)
def host_backend_here():
    why = host_backend._precheck()
    if why:
        pytest.skip(f"the host backend cannot work here: {why}")


def policy(tmp_path, rules: str, extra: str = "") -> str:
    p = tmp_path / "policy.yaml"
    p.write_text('version: "2.0"\nname: host\nruntime_monitor:\n  enabled: true\n  rules:\n' + rules + extra)
    return str(p)


def monitor(assay_cmd, tmp_path, pol, argv, timeout=120, extra=()):
    evs = tmp_path / "ev.jsonl"
    p = subprocess.run(assay_cmd + ["monitor", "--enforcer", "host", "--policy", pol, "-o", str(evs), *extra,
                                    "--"] + argv, capture_output=True, text=True, timeout=timeout)
    events = [json.loads(line) for line in evs.read_text().splitlines()] if evs.exists() else []
    return p, events


def probe(assay_cmd, tmp_path, pol, steps, timeout=120):
    plan, res = tmp_path / "plan.json", tmp_path / "results.json"
    plan.write_text(json.dumps(steps))
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, PROBE, str(plan), str(res)], timeout)
    assert p.returncode == 0, p.stderr
    return json.loads(res.read_text()), evs, p


@pytest.fixture(params=["tmpfs", "ext4"])
def fs(request):
    """A fresh filesystem: tmpfs, or a real ext4 on a loop device. World-readable, so `nobody`
    is stopped by the rules and not by modes."""
    base = pathlib.Path(tempfile.mkdtemp(prefix="assay-host-", dir="/tmp"))
    os.chmod(base, 0o755)
    mnt = base / "mnt"
    mnt.mkdir()
    dev = None
    if request.param == "tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=755", "assay-test", str(mnt)], check=True)
    else:
        if not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
            pytest.skip("needs mkfs.ext4 and losetup (e2fsprogs, util-linux)")
        img = base / "fs.img"
        with open(img, "wb") as f:
            f.truncate(64 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
        dev = subprocess.run(["losetup", "--find", "--show", str(img)], check=True, capture_output=True,
                             text=True).stdout.strip()
        subprocess.run(["mount", dev, str(mnt)], check=True)
        os.chmod(mnt, 0o755)
    yield mnt
    subprocess.run(["umount", "-R", "-l", str(mnt)], check=False)
    if dev:
        subprocess.run(["losetup", "-d", dev], check=False)
    shutil.rmtree(base, ignore_errors=True)


def _write(path: pathlib.Path, text="x\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o644)
    for p in path.parents:
        if str(p).startswith(str(path.anchor)) and p != pathlib.Path("/"):
            try:
                os.chmod(p, 0o755) if p.is_dir() else None
            except OSError:
                pass


def test_files_every_way_in(assay_cmd, tmp_path, fs):
    d = fs / "data"
    secret, keys = d / "secret.txt", d / "keys"
    for f in (secret, d / "neighbour.txt", keys / "k1", keys / "a/b/c/d/deep", keys / "public/pub", keys / "k3",
              keys / "k4", d / "outside.txt"):
        _write(f)
    os.link(secret, d / "pre-link")
    os.link(keys / "k1", d / "k1-pre-link")
    bind = fs / "bind"
    bind.mkdir()
    os.chmod(bind, 0o755)
    pol = policy(tmp_path,
                 f"    - id: secret\n      type: file_open\n      match: {{ path_globs: ['{secret}'] }}\n      action: deny\n"
                 f"    - id: keys\n      type: file_open\n      match: {{ path_globs: ['{keys}/**'],"
                 f" not: {{ path_globs: ['{keys}/public/**'] }} }}\n      action: deny\n")
    steps = [
        {"name": "direct", "op": "open", "path": str(secret)},
        {"name": "neighbour", "op": "open", "path": str(d / "neighbour.txt")},
        {"name": "symlink_made", "op": "symlink", "src": str(secret), "path": str(d / "sl")},
        {"name": "symlink", "op": "open", "path": str(d / "sl")},
        {"name": "hardlink_before", "op": "open", "path": str(d / "pre-link")},
        {"name": "hardlink_before_subtree", "op": "open", "path": str(d / "k1-pre-link")},
        {"name": "hardlink_after_made", "op": "link", "src": str(secret), "path": str(d / "post-link")},
        {"name": "hardlink_after", "op": "open", "path": str(d / "post-link")},
        {"name": "procfd", "op": "procfd", "path": str(secret)},
        {"name": "openat2", "op": "openat2", "path": str(secret)},
        {"name": "handle", "op": "handle", "path": str(secret)},
        {"name": "uring", "op": "uring", "path": str(secret)},
        {"name": "grandchild", "op": "grandchild", "path": str(secret)},
        {"name": "nobody", "op": "as_user", "uid": NOBODY, "path": str(secret)},
        {"name": "chroot", "op": "chroot", "root": str(d), "path": "/keys/k1"},
        {"name": "subtree", "op": "open", "path": str(keys / "k1")},
        {"name": "deep", "op": "open", "path": str(keys / "a/b/c/d/deep")},
        {"name": "exception", "op": "open", "path": str(keys / "public/pub")},
        {"name": "created_later", "op": "create", "path": str(keys / "new")},
        {"name": "created_later_open", "op": "open", "path": str(keys / "new")},
        {"name": "moved_in_made", "op": "rename", "src": str(d / "outside.txt"), "path": str(keys / "moved")},
        {"name": "moved_in", "op": "open", "path": str(keys / "moved")},
        {"name": "moved_out_made", "op": "rename", "src": str(keys / "k3"), "path": str(d / "k3-out")},
        {"name": "moved_out", "op": "open", "path": str(d / "k3-out")},
        {"name": "linked_out_made", "op": "link", "src": str(keys / "k4"), "path": str(d / "k4-out")},
        {"name": "linked_out", "op": "open", "path": str(d / "k4-out")},
        {"name": "bind_made", "op": "bind", "src": str(keys), "path": str(bind)},
        {"name": "bind", "op": "open", "path": str(bind / "k1")},
        {"name": "unbind", "op": "umount", "path": str(bind)},
        {"name": "renamed_made", "op": "rename", "src": str(secret), "path": str(d / "renamed.txt")},
        {"name": "renamed", "op": "open", "path": str(d / "renamed.txt")},
        {"name": "replaced", "op": "create", "path": str(secret)},   # a new file at the place: denied too
        {"name": "replaced_open", "op": "open", "path": str(secret)},
    ]
    got, evs, _ = probe(assay_cmd, tmp_path, pol, steps)
    made = {k: v for k, v in got.items() if k.endswith("_made") or k == "unbind"}
    assert set(made.values()) == {"ok"}, made
    want_ok = {"neighbour", "exception"}
    for name, result in got.items():
        if name in made:
            continue
        if name in ("created_later", "replaced"):
            assert result == "EPERM", got  # the create happens; its open is refused
            continue
        assert result == ("ok" if name in want_ok else "EPERM"), (name, got)
    blocked = [e for e in evs if e["type"] == "file_blocked"]
    assert blocked and all(e["enforcer"] == "host" for e in blocked)
    assert {e["rule"] for e in blocked} == {"secret", "keys"}
    assert not [e for e in evs if e["type"] == "file_blocked" and e["path"].endswith(("neighbour.txt", "pub"))]
    # outside the scope, this test process reads everything
    assert (d / "renamed.txt").read_text() == "x\n" and (keys / "k1").read_text() == "x\n"


def test_file_alert_log_and_kill_modes(assay_cmd, tmp_path, fs):
    watched, killer = fs / "watched", fs / "killer"
    _write(watched)
    _write(killer)
    pol = policy(tmp_path,
                 f"    - id: watch\n      type: file_open\n      match: {{ path_globs: ['{watched}'] }}\n      action: alert\n"
                 f"    - id: kill\n      type: file_open\n      match: {{ path_globs: ['{killer}'] }}\n"
                 "      action: trigger_kill\n",
                 "kill_switch: { enabled: true, mode: immediate, triggers: [ { on_rule: kill } ] }\n")
    got, evs, _ = probe(assay_cmd, tmp_path, pol, [{"name": "watched", "op": "open", "path": str(watched)}])
    assert got == {"watched": "ok"}
    assert [(e["type"], e["rule"], e["action"]) for e in evs if "rule" in e] == [("file_alert", "watch", "alert")]
    p, evs = monitor(assay_cmd, tmp_path, pol, ["cat", str(killer)])
    assert p.returncode == 137, p.stderr
    assert [e["action"] for e in evs if e["type"] == "file_blocked"] == ["kill_immediate"]
    # graceful: SIGTERM, then SIGKILL after the grace period
    pol = policy(tmp_path,
                 f"    - id: kill\n      type: file_open\n      match: {{ path_globs: ['{killer}'] }}\n"
                 "      action: trigger_kill\n",
                 "kill_switch: { enabled: true, mode: graceful, grace_period_ms: 300, triggers: [ { on_rule: kill } ] }\n")
    stubborn = ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                f"try:\n    open({str(killer)!r})\nexcept OSError:\n    pass\ntime.sleep(30)\n")
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", stubborn])
    assert p.returncode == 137, p.stderr
    assert [e["signal"] for e in evs if e["type"] == "process_killed"] == ["SIGTERM", "SIGKILL"]


def test_blocked_open_proceeds_after_kill_9(assay_cmd, tmp_path, fs):
    """fail-open: a process in the scope is blocked in open(2), waiting for an answer from a
    stopped monitor; kill -9 the monitor, and that open (and every later one) proceeds. --pid
    scope: with -- COMMAND the watchdog would end the workload with the monitor."""
    secret = fs / "secret"
    _write(secret)
    pol = policy(tmp_path, f"    - id: s\n      type: file_open\n      match: {{ path_globs: ['{secret}'] }}\n"
                           "      action: deny\n")
    go, out = tmp_path / "go", tmp_path / "out"
    script = (f"import os,time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
              f"try:\n    os.close(os.open({str(secret)!r}, os.O_RDONLY)); r='ok'\n"
              f"except OSError as e: r=str(e.errno)\nopen({str(out)!r},'w').write(r)\n"
              "time.sleep(0.5)\n"
              f"try:\n    os.close(os.open({str(secret)!r}, os.O_RDONLY)); r='ok'\n"
              f"except OSError as e: r=str(e.errno)\nopen({str(out)!r},'a').write(' '+r)\n")
    target = subprocess.Popen([PY, "-c", script])
    ready = tmp_path / "ready"
    mon = subprocess.Popen(assay_cmd + ["monitor", "--enforcer", "host", "--policy", pol, "--pid", str(target.pid),
                                        "--ready-file", str(ready), "-o", str(tmp_path / "ev.jsonl")],
                           stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists() or mon.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), mon.communicate()[1]
        os.kill(mon.pid, signal.SIGSTOP)          # it stops answering
        go.touch()
        time.sleep(1.0)
        assert not out.exists()                   # blocked in open, waiting for the answer
        os.kill(mon.pid, signal.SIGKILL)          # kill -9 while the open waits
        mon.wait()
        assert target.wait(timeout=30) == 0
        assert out.read_text() == "ok ok"         # the waiting open and the next one went through
    finally:
        for p in (mon, target):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_exec_every_way_in_and_the_loader(assay_cmd, tmp_path):
    d = tmp_path / "bin"
    (d / "tools").mkdir(parents=True)
    os.chmod(tmp_path, 0o755)
    shutil.copy("/bin/true", d / "denied-true")
    shutil.copy("/bin/true", d / "other-true")
    os.symlink(d / "denied-true", d / "link-true")
    os.link(d / "denied-true", d / "hard-true")
    (d / "denied-script").write_text("#!/bin/sh\nexit 0\n")
    (d / "via-interp").write_text(f"#!{d}/denied-true\n")
    for f in ("denied-script", "via-interp"):
        os.chmod(d / f, 0o755)
    loader = next(p for p in ("/lib64/ld-linux-x86-64.so.2", "/lib/ld-linux-aarch64.so.1") if os.path.exists(p))
    pol = policy(tmp_path,
                 f"    - id: no-true\n      type: proc_exec\n      match: {{ path_globs: ['{d}/denied-true',"
                 f" '{d}/denied-script', '{d}/tools/**'] }}\n      action: deny\n")
    cases = [["direct", f"{d}/denied-true"], ["symlink", f"{d}/link-true"], ["hardlink", f"{d}/hard-true"],
             ["execveat", f"{d}/denied-true"], ["script", f"{d}/denied-script"], ["other", f"{d}/other-true"],
             ["interp", f"{d}/via-interp"], ["copy_into_tree", f"{d}/tools/new-true"]]
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", EXEC, json.dumps(cases)])
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got == {"direct": "EPERM", "symlink": "EPERM", "hardlink": "EPERM", "execveat": "EPERM",
                   "script": "EPERM", "other": "ok", "interp": "EPERM", "copy_into_tree": "EPERM"}
    blocked = [e for e in evs if e["type"] == "exec_blocked"]
    assert len(blocked) == 7 and all(e["rule"] == "no-true" and e["enforcer"] == "host" for e in blocked)
    # the dynamic loader run as the program: what it maps, no execve opens; refused where exec rules are
    p, evs = monitor(assay_cmd, tmp_path, pol, [loader, f"{d}/denied-true"])
    assert p.returncode != 0
    assert [e for e in evs if e["type"] == "exec_blocked" and e["rule"] == "builtin:unprovable-path"]
    p, _ = monitor(assay_cmd, tmp_path, pol, ["sh", "-c", f"{d}/other-true && /bin/true"])
    assert p.returncode == 0, p.stderr  # dynamic programs (the loader as their interpreter) still run
    # a copy of the loader is not the loader, but it maps what it is given all the same
    shutil.copy(loader, d / "my-ld.so")
    p, evs = monitor(assay_cmd, tmp_path, pol, [str(d / "my-ld.so"), f"{d}/denied-true"])
    assert p.returncode != 0, p.stderr
    assert [e for e in evs if e["type"] == "exec_blocked" and e["rule"] == "no-true"], evs[-5:]
    p, _ = monitor(assay_cmd, tmp_path, pol, [str(d / "my-ld.so"), f"{d}/other-true"])
    assert p.returncode == 0, p.stderr


def test_net_v4_v6_mapped_udp_fastopen_and_outside(assay_cmd, tmp_path, servers):  # noqa: F811
    d4, a4 = servers[(socket.AF_INET, "denied")], servers[(socket.AF_INET, "allowed")]
    d6, a6 = servers[(socket.AF_INET6, "denied")], servers[(socket.AF_INET6, "allowed")]
    pol = policy(tmp_path,
                 f"    - id: no-port\n      type: net_connect\n      match: {{ dest_globs: ['{d4}', '{d6}'] }}\n"
                 "      action: deny\n"
                 "    - id: no-dns-host\n      type: net_connect\n      match: { dest_globs: ['127.0.0.53/32:53'] }\n"
                 "      action: deny\n")
    cases = [
        ("v4_denied", "AF_INET", "SOCK_STREAM", ["127.0.0.1", d4]),
        ("v4_allowed", "AF_INET", "SOCK_STREAM", ["127.0.0.1", a4]),
        ("v6_denied", "AF_INET6", "SOCK_STREAM", ["::1", d6]),
        ("v6_allowed", "AF_INET6", "SOCK_STREAM", ["::1", a6]),
        ("mapped_v4_denied", "AF_INET6", "SOCK_STREAM", ["::ffff:127.0.0.1", d4]),
        ("wildcard_denied", "AF_INET", "SOCK_STREAM", ["0.0.0.0", d4]),
        ("udp_connect_denied", "AF_INET", "SOCK_DGRAM", ["127.0.0.53", 53]),
        ("udp_sendto_denied", "AF_INET", "SOCK_DGRAM", ["127.0.0.53", 53], "sendto"),
        ("udp_sendmsg_denied", "AF_INET", "SOCK_DGRAM", ["127.0.0.53", 53], "sendmsg"),
        ("udp6_sendto_denied", "AF_INET6", "SOCK_DGRAM", ["::1", d6], "sendto"),
        ("udp_sendto_allowed", "AF_INET", "SOCK_DGRAM", ["127.0.0.1", a4], "sendto"),
        ("udp_connected_sendto_denied", "AF_INET", "SOCK_DGRAM", ["127.0.0.53", 53], "connected_sendto",
         ["127.0.0.1", a4]),
        ("tfo_denied", "AF_INET", "SOCK_STREAM", ["127.0.0.1", d4], "fastopen"),
    ]
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", CONNECT, json.dumps(cases)])
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert {k for k, v in got.items() if v == "EPERM"} == {k for k, *_ in cases if k.endswith("_denied")}, got
    assert got["v4_allowed"] == got["v6_allowed"] == got["udp_sendto_allowed"] == "ok"
    blocked = [e for e in evs if e["type"] == "net_blocked"]
    assert blocked and all(e["enforcer"] == "host" for e in blocked)
    assert {e["rule"] for e in blocked} == {"no-port", "no-dns-host"}
    with socket.create_connection(("127.0.0.1", d4), timeout=5):  # outside the scope: unaffected
        pass


def test_a_subtree_on_a_pseudo_filesystem_is_refused(assay_cmd, tmp_path):
    pol = policy(tmp_path, "    - id: procs\n      type: file_open\n      match: { path_globs: ['/proc/sys/**'] }\n"
                           "      action: deny\n")
    p, _ = monitor(assay_cmd, tmp_path, pol, ["true"])
    assert p.returncode == 40, p.stderr
    assert "rule procs" in p.stderr and "the host backend cannot" in p.stderr and "/proc/sys" in p.stderr
    assert "Traceback" not in p.stderr


def test_a_learned_policy_enforced_end_to_end(assay_cmd, tmp_path):
    """Record, profile, generate --mode enforce (allow-lists: deny / and everything below it,
    except what was learned), then enforce it here: the job runs, a variant is refused."""
    import test_vm_learning
    test_vm_learning.test_record_profile_generate_enforce(assay_cmd, tmp_path)
    assert '"enforcer":"host"' in (tmp_path / "bad.jsonl").read_text()


OVERLAY = r'''
set -e
mount -t tmpfs none "$1"
mkdir "$1/u" "$1/w" "$1/m"
mount -t overlay none -o "lowerdir=$2,upperdir=$1/u,workdir=$1/w" "$1/m"
cat "$1/m/secret"
'''


def test_an_overlay_in_a_user_namespace_is_no_way_around(assay_cmd, tmp_path):
    """As nobody: a user namespace, an overlay whose lower layer holds the protected file, and a
    read through the overlay (a different inode, on a filesystem no mark covers). fanotify sees
    the overlay's own open of the real file, so the rule still holds; the event names the reader."""
    if subprocess.run(["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups",
                       "unshare", "-Urm", "true"], capture_output=True).returncode:
        pytest.skip("unprivileged user namespaces are disabled here (kernel.unprivileged_userns_clone)")
    base = pathlib.Path(tempfile.mkdtemp(prefix="assay-ovl-", dir="/tmp"))
    os.chmod(base, 0o755)
    lower, work = base / "lower", base / "work"
    lower.mkdir()
    work.mkdir()
    os.chmod(work, 0o777)
    _write(lower / "secret", "s3cret\n")
    os.chmod(lower, 0o755)
    script = base / "overlay.sh"
    script.write_text(OVERLAY)
    os.chmod(script, 0o755)
    try:
        for rules in ([str(lower / "secret")], [f"{lower}/**"]):
            pol = policy(tmp_path, f"    - id: s\n      type: file_open\n      match: {{ path_globs: {json.dumps(rules)} }}\n"
                                   "      action: deny\n")
            p, evs = monitor(assay_cmd, tmp_path, pol, ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY),
                                                        "--clear-groups", "unshare", "-Urm", "sh", str(script),
                                                        str(work), str(lower)])
            assert "s3cret" not in p.stdout and "Operation not permitted" in p.stderr, (rules, p.stdout, p.stderr)
            blocked = [e for e in evs if e["type"] == "file_blocked"]
            assert blocked and blocked[0]["comm"] == "cat" and blocked[0]["ppid"] != 0, blocked
    finally:
        shutil.rmtree(base, ignore_errors=True)
