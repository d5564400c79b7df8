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
res["links"] = fds(31, 30)   # BPF_LINK_GET_NEXT_ID, BPF_LINK_GET_FD_BY_ID: an fd detaches it
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
    assert len(got["links"]) >= 5 and set(got["links"]) == {1}, got["links"]
    assert {k: got[k] for k in ("sigterm", "sigkill", "sigstop", "ptrace", "proc_mem", "probe")} == {
        "sigterm": 1, "sigkill": 1, "sigstop": 1, "ptrace": 1, "proc_mem": 13, "probe": "ok"}   # /proc/PID/mem: EACCES
    whats = {e["what"] for e in evs if e["type"] == "tamper_blocked"}
    assert whats == {"bpf_map", "bpf_prog", "bpf_link", "signal", "ptrace"}, whats
    assert '"summary"' in p.stderr


def test_no_protect_lets_the_scope_take_the_maps(assay_cmd, tmp_path):
    """The same probe with --no-protect: the map fds come back (so the test above can fail)."""
    pol = policy(tmp_path, file_rule("s", ["/etc/hostname"]))
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", TAMPER], "--no-protect")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert "fd" in got["maps"] and "fd" in got["progs"] and "fd" in got["links"], got
    assert not [e for e in evs if e["type"] == "tamper_blocked"]


def test_monitoring_alone_does_not_protect(assay_cmd, tmp_path):
    """Without a policy nothing is enforced, self-protection included (no decision is loaded)."""
    evs = tmp_path / "ev.jsonl"
    p = subprocess.run(assay_cmd + ["monitor", "-o", str(evs), "--", PY, "-c", TAMPER], capture_output=True,
                       text=True, timeout=180)
    assert p.returncode == 0, p.stderr
    assert "fd" in json.loads(p.stdout)["maps"]


KERNEL = r'''
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
res = {}
def attempt(name, fn):
    try:
        fn(); res[name] = "ok"
    except OSError as e:
        res[name] = e.errno
def write(path):
    with open(path, "r+b", buffering=0) as f:
        f.write(f.read() or b"\n")   # the same value back: nothing changes if it is let through
def read(path):
    with open(path, "rb") as f:
        f.read(1)
def sysfail(ret):
    if ret < 0:
        e = ctypes.get_errno(); raise OSError(e, os.strerror(e))
plan = json.loads(sys.argv[1])
for name, path in plan.get("write", {}).items():
    attempt(name, lambda p=path: write(p))
for name, path in plan.get("read", {}).items():
    attempt(name, lambda p=path: read(p))
junk = ctypes.create_string_buffer(b"\0" * 64)
attempt("init_module", lambda: sysfail(libc.syscall(175, junk, 64, b"")))          # x86_64 init_module
fd = os.open("/etc/hostname", os.O_RDONLY)
attempt("finit_module", lambda: sysfail(libc.syscall(313, fd, b"", 0)))           # x86_64 finit_module
if plan.get("mount"):
    attempt("mount", lambda: sysfail(libc.mount(b"none", plan["mount"].encode(), b"tmpfs", 0, None)))
    def fsconfig():
        fs = libc.syscall(430, b"tmpfs", 0)                                           # fsopen
        sysfail(fs)
        try:
            sysfail(libc.syscall(431, fs, 1, b"size", b"1m", 0))                      # FSCONFIG_SET_STRING
        finally:
            os.close(fs)
    attempt("fsconfig", fsconfig)
print(json.dumps(res))
'''


@pytest.fixture
def loop_ext4(tmp_path):
    """A real ext4 on a loop device holding a protected file, and a second loop device without rules."""
    import kmod
    kmod.load("loop")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    devs = []
    for name in ("rules.img", "free.img"):
        img = tmp_path / name
        with open(img, "wb") as f:
            f.truncate(16 << 20)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
        devs.append(subprocess.run(["losetup", "--find", "--show", str(img)], check=True, capture_output=True,
                                   text=True).stdout.strip())
    subprocess.run(["mount", "-t", "ext4", devs[0], str(mnt)], check=True)
    (mnt / "secret").write_text("secret")
    (mnt / "tree").mkdir()
    try:
        yield mnt, devs[0], devs[1]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        for d in devs:
            subprocess.run(["losetup", "-d", d], check=False)


def test_a_root_workload_cannot_make_the_kernel_work_for_it(assay_cmd, tmp_path, loop_ext4):
    """Kernel knobs that run a program as root, module and kexec loading, raw reads of the rules'
    block device and of kernel memory, and mounts while subtree rules exist: all refused to a root
    process in the scope, each a tamper_blocked event. Device nodes are judged by number, so a
    private copy (mknod) is refused too."""
    mnt, rules_dev, free_dev = loop_ext4
    if not os.path.ismount("/proc/sys/fs/binfmt_misc"):
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"], check=False)
    st = os.stat(rules_dev)
    node = tmp_path / "disk-copy"
    os.mknod(node, 0o600 | 0o060000, st.st_rdev)            # S_IFBLK, the same device
    mem = tmp_path / "mem-copy"
    os.mknod(mem, 0o600 | 0o020000, os.makedev(1, 1))       # S_IFCHR 1:1, /dev/mem
    target = tmp_path / "mnt-target"
    target.mkdir()
    plan = {"write": {"core_pattern": "/proc/sys/kernel/core_pattern", "modprobe": "/proc/sys/kernel/modprobe"},
            "read": {"core_pattern_read": "/proc/sys/kernel/core_pattern", "rules_dev": rules_dev,
                     "rules_dev_copy": str(node), "free_dev": free_dev, "mem_copy": str(mem),
                     "kcore": "/proc/kcore"},
            "mount": str(target)}
    if os.path.exists("/proc/sys/fs/binfmt_misc/register"):
        plan["write"]["binfmt_register"] = "/proc/sys/fs/binfmt_misc/register"
    if os.path.exists("/sys/kernel/uevent_helper"):
        plan["write"]["uevent_helper"] = "/sys/kernel/uevent_helper"
    pol = policy(tmp_path, file_rule("s", [str(mnt / "secret")]) + file_rule("t", [f"{mnt}/tree/**"]))
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", KERNEL, json.dumps(plan)])
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    refused = set(plan["write"]) | {"rules_dev", "rules_dev_copy", "mem_copy", "kcore", "init_module",
                                    "finit_module", "mount", "fsconfig"}
    assert {k for k, v in got.items() if v == 1} == refused, got          # EPERM, each of them
    assert got["core_pattern_read"] == "ok" and got["free_dev"] == "ok"
    blocked = [e for e in evs if e["type"] == "tamper_blocked"]
    assert {e["what"] for e in blocked} == {"knob", "module", "block_device", "kernel_memory", "mount"}
    assert {e["knob"] for e in blocked if e["what"] == "knob"} >= {"core_pattern", "modprobe"}
    assert {e["call"] for e in blocked if e["what"] == "mount"} == {"mount", "fsconfig"}
    dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    assert {e["device"] for e in blocked if e["what"] == "block_device"} == {dev}

    # The same probe with --allow-mounts and without subtree rules mounts; with --no-protect
    # every one of them is let through (so the assertions above can fail).
    pol = policy(tmp_path, file_rule("s", [str(mnt / "secret")]))
    p, _ = monitor(assay_cmd, tmp_path, pol, [PY, "-c", KERNEL, json.dumps({"mount": str(target)})])
    assert json.loads(p.stdout)["mount"] == "ok", p.stdout
    subprocess.run(["umount", str(target)], check=False)
    p, evs = monitor(assay_cmd, tmp_path, pol, [PY, "-c", KERNEL, json.dumps(plan)], "--no-protect")
    got = json.loads(p.stdout)
    assert got["core_pattern"] == got["rules_dev"] == got["kcore"] == got["mount"] == "ok", got
    assert got["init_module"] != 1 and got["finit_module"] != 1, got   # the kernel's own refusal
    assert not [e for e in evs if e["type"] == "tamper_blocked"]
    subprocess.run(["umount", str(target)], check=False)
