"""Host facts and the pseudo-filesystems BPF needs: tracefs, securityfs, cgroup2."""
from __future__ import annotations

import ctypes
import os
from typing import List, Optional, Tuple

import attrs

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
SECURITYFS = "/sys/kernel/security"
CGROUP2_MAGIC = 0x63677270


def _mount(source: str, target: str, fstype: str) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.mount(source.encode(), target.encode(), fstype.encode(), 0, None) == 0


def _is_mounted(target: str) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == target for line in f)
    except OSError:
        return False


def ensure_tracefs() -> Optional[str]:
    """libbpf finds tracepoint ids in tracefs; mount it when the host has not."""
    for d in TRACEFS_DIRS:
        if os.path.exists(os.path.join(d, "events")):
            return d
    if os.path.isdir(TRACEFS_DIRS[0]) and _mount("tracefs", TRACEFS_DIRS[0], "tracefs"):
        return TRACEFS_DIRS[0]
    if os.path.isdir("/sys/kernel/debug") and not _is_mounted("/sys/kernel/debug"):
        if _mount("debugfs", "/sys/kernel/debug", "debugfs") and os.path.exists(TRACEFS_DIRS[1] + "/events"):
            return TRACEFS_DIRS[1]
    return None


def ensure_securityfs() -> bool:
    if os.path.exists(os.path.join(SECURITYFS, "lsm")):
        return True
    return os.path.isdir(SECURITYFS) and _mount("securityfs", SECURITYFS, "securityfs") and \
        os.path.exists(os.path.join(SECURITYFS, "lsm"))


def active_lsms() -> list:
    ensure_securityfs()
    try:
        with open(os.path.join(SECURITYFS, "lsm")) as f:
            return [x for x in f.read().strip().split(",") if x]
    except OSError:
        return []


def bpf_lsm_active() -> bool:
    return "bpf" in active_lsms()


def preemption() -> Optional[str]:
    """The kernel's preemption model: none, voluntary, full or lazy (the current one of a
    PREEMPT_DYNAMIC kernel, from debugfs), "full" for a PREEMPT or PREEMPT_RT build; None when
    it cannot be told."""
    path = "/sys/kernel/debug/sched/preempt"
    if not os.path.exists(path) and os.path.isdir("/sys/kernel/debug") and not _is_mounted("/sys/kernel/debug"):
        _mount("debugfs", "/sys/kernel/debug", "debugfs")
    try:
        with open(path) as f:
            current = [w for w in f.read().split() if w.startswith("(")]
        if current:
            return current[0].strip("()")
    except OSError:
        pass
    version = os.uname().version.split()
    if "PREEMPT_RT" in version or "PREEMPT" in version:
        return "full"
    return None


# Where a task can be preempted inside a BPF program: fmod_ret runs can then be skipped.
PREEMPTIBLE = ("full", "lazy")


def lockdown_mode() -> Optional[str]:
    try:
        with open(os.path.join(SECURITYFS, "lockdown")) as f:
            text = f.read()
    except OSError:
        return None
    # "none [integrity] confidentiality": the bracketed one is active
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if start >= 0 < end else text.strip()


def cgroup2_mounts() -> list:
    out = []
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 2 and parts[2] == "cgroup2":
                    out.append(parts[1])
    except OSError:
        pass
    return out


def block_devices_below(st_devs) -> List[Tuple[int, int]]:
    """(major, minor) of the block devices that hold these filesystems (st_dev values), with the
    disks their partitions are on and the devices below each (device mapper, RAID slaves): reading
    any of them raw reads the filesystem's blocks."""
    out, todo, seen = [], [], set()
    for dev in st_devs:
        todo.append(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    while todo:
        p = todo.pop()
        try:
            real = os.path.realpath(p)
            with open(os.path.join(real, "dev")) as f:
                major, minor = (int(x) for x in f.read().strip().split(":"))
        except (OSError, ValueError):
            continue
        if (major, minor) in seen:
            continue
        seen.add((major, minor))
        out.append((major, minor))
        if os.path.exists(os.path.join(real, "partition")):
            todo.append(os.path.dirname(real))
        try:
            todo += [os.path.join(real, "slaves", s) for s in os.listdir(os.path.join(real, "slaves"))]
        except OSError:
            pass
    return out


@attrs.frozen
class Mount:
    point: str      # where it is mounted, in this namespace
    fstype: str
    root: str       # the directory of its filesystem mounted there ("/" for the whole)
    dev: int        # its superblock's device (what the kernel's decisions read as i_sb->s_dev)


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounts() -> List[Mount]:
    """This namespace's mounts (/proc/self/mountinfo), in its order: a later one on the same point
    is on top. Empty where it cannot be read."""
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                a, b = left.split(), right.split()
                major, minor = (int(x) for x in a[2].split(":"))
                out.append(Mount(_unescape(a[4]), b[0] if b else "", _unescape(a[3]), os.makedev(major, minor)))
    except (OSError, ValueError, IndexError):
        return []
    return out


PROC_PID_INIT_INO = 0xEFFFFFFC   # the initial PID namespace's inode number, fixed by the kernel


def in_initial_pid_namespace() -> Optional[bool]:
    """False inside a container with a PID namespace of its own: there the kernel's process ids
    (which every BPF program sees) are not the ones this process sees. None if unknown."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino == PROC_PID_INIT_INO
    except OSError:
        return None


PID_NAMESPACE_FIX = ("run the monitor in the host's PID namespace (docker run --pid=host, Kubernetes "
                     "hostPID: true)")


def cgroup2_root() -> str:
    """Where cgroup programs attach to cover every process: the cgroup v2 root (the unified mount
    on hybrid hosts). Raises BpfError where none is mounted."""
    from assay.errors import BpfError

    mounts = cgroup2_mounts()
    if not mounts:
        raise BpfError("no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup)")
    return mounts[0]


def cgroup_id(path: str) -> int:
    """A cgroup v2 directory's id is its kernfs inode number. Raises OSError/ValueError."""
    st = os.stat(path)
    libc = ctypes.CDLL(None, use_errno=True)

    class StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    buf = StatFs()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), path)
    if buf.f_type & 0xFFFFFFFF != CGROUP2_MAGIC:
        raise ValueError(f"{path} is not on a cgroup v2 filesystem (mounted at: "
                         f"{', '.join(cgroup2_mounts()) or 'none'})")
    return st.st_ino


def in_cgroup_subtree(pid: int, cgroup_dir: str) -> bool:
    """Is the process in this cgroup v2 directory or below it? A process that cannot be read
    (gone) is not."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            rel = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None)
    except OSError:
        return False
    if rel is None:
        return False
    here = os.path.realpath(cgroup2_root() + rel)
    want = os.path.realpath(cgroup_dir)
    return here == want or here.startswith(want.rstrip("/") + "/")


def own_cgroup2_path() -> Optional[str]:
    """The cgroup v2 directory of this process, if cgroup2 is mounted."""
    try:
        with open("/proc/self/cgroup") as f:
            rel = next((line.split(":", 2)[2].strip() for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    mounts = cgroup2_mounts()
    if rel is None or not mounts:
        return None
    return os.path.join(mounts[0], rel.lstrip("/"))
