"""The host backend: cgroup sock_addr programs for connects, fanotify permission events for files
and exec, where BPF trampolines (lsm, fmod_ret) are unavailable."""
from __future__ import annotations

import collections
import errno
import os
import select
import signal
import stat
import struct
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

import structlog

from assay import abi, fanotify, system
from assay.enforcers import host_judge
from assay.enforcers.base import Backend
from assay.errors import BpfError

log = structlog.get_logger("assay.host")

PERM = fanotify.FAN_OPEN_PERM | fanotify.FAN_OPEN_EXEC_PERM
QUEUE_MAX = 65536          # rule events waiting for the main thread; past it they are counted, not kept
INDEX_MAX = 200_000        # entries indexed below one subtree deny (moves and links out keep their rule)
# Filesystems fanotify cannot mark whole (no file handles, or internal): a subtree there cannot be judged.
PSEUDO = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "bpf", "devpts", "mqueue",
          "pstore", "configfs", "fusectl", "hugetlbfs", "binfmt_misc", "autofs", "efivarfs", "rpc_pipefs",
          "nsfs", "selinuxfs", "devtmpfs"}


def _precheck() -> Optional[str]:
    if not system.cgroup2_mounts():
        return "no cgroup v2 hierarchy is mounted (connect rules attach there)"
    return fanotify.available()


def _refused_fix() -> str:
    return ("the host backend needs cgroup v2, cgroup BPF programs (CONFIG_CGROUP_BPF) and fanotify permission "
            "events (CONFIG_FANOTIFY_ACCESS_PERMISSIONS), as root")


# ---------------------------------------------------------------- mounts

def _below(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root.rstrip("/") + "/")


# ---------------------------------------------------------------- the agent

class HostAgent:
    """Holds the fanotify groups and answers their permission events on a thread of its own.

    The answer is written before anything else is done for an event (no logging, no output on
    the way), the monitor's own opens are allowed at once, and the kernel allows every pending
    and later open when the group's fd closes: when this process dies, even by SIGKILL."""

    def __init__(self, plan, in_scope: Callable[[int], bool], rule_names: Dict[int, str]):
        self.rules = host_judge.from_plan(plan) if plan is not None else {"file": host_judge.KindRules(),
                                                                         "exec": host_judge.KindRules()}
        self.plan = plan
        self.in_scope = in_scope
        self.rule_names = rule_names
        self.notes: List[str] = []
        self.fd = -1
        self.fid_fd = -1
        self.own = os.getpid()
        self.events: Deque[Tuple] = collections.deque()
        self.kills: Deque[Tuple[int, int]] = collections.deque()   # graceful: (pid, rule index)
        self.dropped = 0            # rule events past QUEUE_MAX (decisions are never affected)
        self.answered = 0
        self.ignored = 0            # inodes the kernel no longer asks about (ignore marks)
        self.errors = 0
        self._stop_r, self._stop_w = -1, -1
        self._thread: Optional[threading.Thread] = None
        self._subtree_devs: set = set()
        self._mount_fds: Dict[int, int] = {}     # st_dev -> fd of its root, for open_by_handle_at
        self._fsids: Dict[int, int] = {}         # statfs f_fsid -> st_dev, for the notification group
        self._exec_open: Dict[int, Tuple[int, int]] = {}  # pid -> the inode its execve just opened
        self._interp_next: Dict[int, float] = {}          # pid -> its execve opened a dynamic program
        self._loaders: set = set()
        self._marked_dirs: Dict[Tuple[int, int], str] = {}

    @property
    def active(self) -> bool:
        return bool(self.rules["file"] or self.rules["exec"])

    # ------------------------------------------------------------ setup
    def start(self) -> None:
        if not self.active:
            return
        self.fd = fanotify.init(fanotify.FAN_CLASS_CONTENT | fanotify.FAN_CLOEXEC | fanotify.FAN_NONBLOCK |
                                fanotify.FAN_UNLIMITED_QUEUE | fanotify.FAN_UNLIMITED_MARKS)
        try:
            self._mark_rules()
            self._watch_moves()
            self._find_loaders()
        except BaseException:
            self.close()
            raise
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(target=self._serve, name="assay-fanotify", daemon=True)
        self._thread.start()

    def _mark(self, flags: int, mask: int, path: str, rule: str) -> None:
        try:
            fanotify.mark(self.fd, fanotify.FAN_MARK_ADD | flags, mask, path)
        except OSError as e:
            raise BpfError(f"rule {rule}: the host backend cannot watch {path}: {os.strerror(e.errno)}"
                           f"{' (its filesystem has no file handles or is internal)' if e.errno in (errno.ENODEV, errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL) else ''}") from None

    def _mark_rules(self) -> None:
        plan = self.plan
        mounts = system.mounts()
        for e in plan.entries:
            rule = self.rule_names.get(e.rule_index, str(e.rule_index))
            if e.map_name.endswith("_deny"):
                self._mark(fanotify.FAN_MARK_DONT_FOLLOW, PERM, e.path, rule)
            elif e.map_name.endswith("_deny_dirs"):
                self._mark_subtree(e.path, rule, mounts, e.map_name.startswith("exec"))
        for n in plan.names:
            parent = n.parent_path
            if (n.parent.dev, n.parent.ino) not in self._marked_dirs:
                self._mark(fanotify.FAN_MARK_ONLYDIR, PERM | fanotify.FAN_EVENT_ON_CHILD, parent,
                           self.rule_names.get(n.rule_index, str(n.rule_index)))
                self._marked_dirs[(n.parent.dev, n.parent.ino)] = parent

    def _mark_subtree(self, root: str, rule: str, mounts, exec_only: bool) -> None:
        """Marks every filesystem a subtree reaches: its own, and those mounted below it. Files
        rules get every open there; exec rules only execve's."""
        mask = fanotify.FAN_OPEN_EXEC_PERM if exec_only else PERM
        st = os.stat(root)
        # the mount the subtree's root is on: the deepest point above it, the top one of a stack
        under = [m for m in mounts if _below(root, m.point)]
        fstype = max(under, key=lambda m: len(m.point)).fstype if under else ""
        if fstype in PSEUDO:
            raise BpfError(f"rule {rule}: the host backend cannot watch {root}: a subtree on {fstype}, a "
                           "filesystem fanotify cannot mark whole")
        self._mark(fanotify.FAN_MARK_FILESYSTEM, mask, root, rule)
        self._subtree_devs.add(st.st_dev)
        self._mount_fd(st.st_dev, mounts)
        for m in mounts:
            point, fstype = m.point, m.fstype
            if point == root or not _below(point, root) or fstype in PSEUDO:
                continue
            try:
                fanotify.mark(self.fd, fanotify.FAN_MARK_ADD | fanotify.FAN_MARK_FILESYSTEM, mask, point)
                d = os.stat(point).st_dev
                self._subtree_devs.add(d)
                self._mount_fd(d, mounts)
            except OSError as e:
                self.notes.append(f"rule {rule}: {point} ({fstype}) cannot be watched ({os.strerror(e.errno)}): "
                                  "files there are not judged by this rule")
        if exec_only and root == "/":
            # fileless programs (memfd_create, then execveat) live on an internal tmpfs
            try:
                mfd = os.memfd_create("assay-probe", os.MFD_CLOEXEC)
                try:
                    fanotify.mark(self.fd, fanotify.FAN_MARK_ADD | fanotify.FAN_MARK_FILESYSTEM, mask, None, mfd)
                    self._subtree_devs.add(os.fstat(mfd).st_dev)
                finally:
                    os.close(mfd)
            except OSError as e:
                self.notes.append(f"rule {rule}: programs run from memory (memfd) cannot be watched "
                                  f"({os.strerror(e.errno)})")

    def _mount_fd(self, dev: int, mounts) -> None:
        """An fd on the root of filesystem `dev`, if this namespace mounts it whole: a file handle
        opened through it names the file by its place in the filesystem, not by a bind mount."""
        if dev in self._mount_fds:
            return
        for m in mounts:
            point = m.point
            if m.root != "/":
                continue
            try:
                if os.stat(point).st_dev == dev:
                    self._mount_fds[dev] = os.open(point, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                    self._fsids[os.statvfs(point).f_fsid] = dev
                    return
            except OSError:
                continue

    def _watch_moves(self) -> None:
        """Index what lies below each subtree deny, by file handle, so that moving or linking it
        out (which this backend cannot refuse) keeps its rule; a notification group keeps the
        index current. Before a permission event is answered, its pending moves are read."""
        roots = {"file": [], "exec": []}
        for e in self.plan.entries:
            if e.map_name.endswith("_deny_dirs") and e.path != "/":
                roots[e.map_name.split("_")[0]].append((e.path, e.rule_index, e.action))
        if not (roots["file"] or roots["exec"]):
            return
        try:
            self.fid_fd = fanotify.init(fanotify.FAN_CLOEXEC | fanotify.FAN_NONBLOCK | fanotify.FAN_REPORT_DFID_NAME |
                                        fanotify.FAN_UNLIMITED_QUEUE | fanotify.FAN_UNLIMITED_MARKS)
            for kind, rs in roots.items():
                for path, _i, _a in rs:
                    fanotify.mark(self.fid_fd, fanotify.FAN_MARK_ADD | fanotify.FAN_MARK_FILESYSTEM,
                                  fanotify.FAN_CREATE | fanotify.FAN_MOVED_TO | fanotify.FAN_ONDIR, path)
        except OSError as e:
            self.notes.append(f"moves and links out of a subtree cannot be followed ({os.strerror(e.errno)}): "
                              "only what lay below it at the start keeps its rule")
            if self.fid_fd >= 0:
                os.close(self.fid_fd)
                self.fid_fd = -1
        for kind, rs in roots.items():
            self.notes += host_judge.members_below(self.rules[kind], rs, self._handle_of_path, INDEX_MAX)

    def _find_loaders(self) -> None:
        """The dynamic loaders: run directly (`ld.so PROG`), one maps a program no execve opened."""
        if not self.rules["exec"]:
            return
        import glob
        for pat in ("/lib*/ld-linux*.so*", "/lib/*/ld-linux*.so*", "/usr/lib*/ld-linux*.so*",
                    "/usr/lib/*/ld-linux*.so*", "/lib*/ld-*.so*", "/usr/lib*/ld-*.so*", "/lib/ld-musl-*.so*"):
            for p in glob.glob(pat):
                try:
                    st = os.stat(p)
                    self._loaders.add((st.st_dev, st.st_ino))
                    fanotify.mark(self.fd, fanotify.FAN_MARK_ADD, fanotify.FAN_OPEN_EXEC_PERM, p)
                except OSError:
                    pass

    @staticmethod
    def _handle_of_path(path: str) -> Tuple[int, bytes]:
        return fanotify.handle_of(fanotify.AT_FDCWD, os.fsencode(path))

    # ------------------------------------------------------------ the answering thread
    def _serve(self) -> None:
        fds = [self.fd, self._stop_r] + ([self.fid_fd] if self.fid_fd >= 0 else [])
        while True:
            try:
                r, _, _ = select.select(fds, [], [])
            except InterruptedError:
                continue
            if self._stop_r in r:
                return
            if self.fid_fd in r:
                self._follow_moves()
            for ev in fanotify.read_events(self.fd):
                if ev.fd < 0:
                    continue
                try:
                    self._answer(ev)
                except Exception as e:  # noqa: BLE001  an event must never stay unanswered
                    self.errors += 1
                    try:
                        fanotify.respond(self.fd, ev.fd, False)
                    except OSError:
                        pass
                    log.error("host backend: could not judge an event (denied)", error=str(e))
                finally:
                    os.close(ev.fd)

    def _answer(self, ev) -> None:
        exec_open = bool(ev.mask & fanotify.FAN_OPEN_EXEC_PERM)
        if ev.pid == self.own or not self.in_scope(ev.pid):
            fanotify.respond(self.fd, ev.fd, True)
            self.answered += 1
            if ev.pid != self.own:
                self._maybe_ignore(ev, exec_open)
            return
        if self.fid_fd >= 0:
            self._follow_moves()
        st = os.fstat(ev.fd)
        ident = (st.st_dev, st.st_ino)
        if exec_open:
            kind = "exec"
            self._exec_open[ev.pid] = ident
        else:
            if self._exec_open.pop(ev.pid, None) == ident:
                # execve's own open of what it runs: proc_exec's business, judged just before
                fanotify.respond(self.fd, ev.fd, True)
                self.answered += 1
                return
            kind = "file"
            if ident in self.rules["exec"].deny and _runs_without_interpreter(ev.pid):
                # A program that runs without a loader of its own (a dynamic loader run directly,
                # a copy of one, a static loader) opening a denied program maps it: judged as
                # running it, as the LSM forms' mmap_file decision does.
                kind = "exec"
        rules = self.rules[kind]
        m = None
        path = ""
        loader = kind == "exec" and ident in self._loaders
        if loader and self._interp_next.pop(ev.pid, None) is not None:
            # The ELF interpreter of the program just judged: the kernel maps it for that program
            # (bprm_check never sees it; the LSM form's mapping check skips an allow-list's
            # catch-all), so only a rule naming the loader itself applies.
            r = rules.deny.get(ident)
            m = host_judge.Match(r[0], r[1], 0) if r else None
            if m is not None:
                path = os.readlink(f"/proc/self/fd/{ev.fd}")
        elif rules:
            path, places, handle = self._places(ev.fd, st)
            m = host_judge.judge(rules, ident, places, handle, st.st_dev in self._subtree_devs)
            if loader and m is None:
                # the loader is what execve named (`ld.so PROG`): it maps a program no execve opens
                m = host_judge.Match(0, abi.Action.DENY, 0)
        if kind == "exec" and not loader and (m is None or not m.blocks) and stat.S_ISREG(st.st_mode) \
                and _has_interp(ev.fd):
            self._interp_next[ev.pid] = time.monotonic()
        if m is None and not loader:
            self._ignore_if_ruleless(ev.fd, st, kind)
        allow = m is None or not m.blocks
        # who it was, read while the process still waits for the answer: a denied process may
        # be gone (its /proc with it) a moment after (rule matches only: rare, never the hot path)
        who = _proc_header(ev.pid) if m is not None else None
        pidfd = _pidfd(ev.pid) if m is not None and m.action is abi.Action.KILL_IMMEDIATE else None
        if pidfd is not None:
            # Killed while it waits for the answer, the process never sees the open's result:
            # answered first, it could act on EPERM (or exit on its own) before the signal lands.
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except OSError:
                pass
            os.close(pidfd)
        try:
            fanotify.respond(self.fd, ev.fd, allow)
        except OSError:
            if pidfd is None:
                raise
            # the kill ended the wait, and the kernel dropped the event with it
        self.answered += 1
        if m is None:
            return
        if pidfd is None and m.action is abi.Action.KILL_GRACEFUL:
            self.kills.append((ev.pid, m.rule_index))
        if len(self.events) >= QUEUE_MAX:
            self.dropped += 1
            return
        self.events.append(_block_record(kind, ev.pid, who, st, m, path))

    def _maybe_ignore(self, ev, exec_open: bool) -> None:
        """After an out-of-scope open was let through: if no rule can judge this file for anyone,
        the kernel need not ask about it again."""
        try:
            st = os.fstat(ev.fd)
        except OSError:
            return
        if not self._ignorable(st):
            return
        kind = "exec" if exec_open else "file"
        path, places, handle = self._places(ev.fd, st)
        if host_judge.judge(self.rules[kind], (st.st_dev, st.st_ino), places, handle,
                            st.st_dev in self._subtree_devs) is None:
            self._ignore(ev.fd, kind)

    def _ignorable(self, st) -> bool:
        # One name only (a second could lie below a rule), and nothing any rule names exactly.
        ident = (st.st_dev, st.st_ino)
        return (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and ident not in self._loaders and
                all(ident not in r.deny and ident not in r.allow for r in self.rules.values()))

    def _ignore_if_ruleless(self, fd: int, st, kind: str) -> None:
        if self._ignorable(st):
            self._ignore(fd, kind)

    def _ignore(self, fd: int, kind: str) -> None:
        """An ignore mark on the inode, dropped by the kernel when the file is next modified (no
        SURV_MODIFY): new content is judged again. Moved below a subtree deny, it is dropped by
        _follow_moves."""
        bit = fanotify.FAN_OPEN_EXEC_PERM if kind == "exec" else fanotify.FAN_OPEN_PERM
        try:
            fanotify.mark(self.fd, fanotify.FAN_MARK_ADD | fanotify.FAN_MARK_IGNORED_MASK, bit, None, fd)
            self.ignored += 1
        except OSError:
            pass

    def _places(self, fd: int, st) -> Tuple[str, List[host_judge.Place], Optional[Tuple[int, int, bytes]]]:
        """The names a file is judged by: the one it was opened through, and (through a file
        handle) its place in its own filesystem, which a bind mount or another mount namespace
        does not change."""
        path = os.readlink(f"/proc/self/fd/{fd}")
        paths = [path]
        handle = None
        try:
            htype, h = fanotify.handle_of(fd)
            handle = (st.st_dev, htype, h)
            mfd = self._mount_fds.get(st.st_dev)
            if mfd is not None:
                rfd = fanotify.open_handle(mfd, htype, h)
                try:
                    real = os.readlink(f"/proc/self/fd/{rfd}")
                finally:
                    os.close(rfd)
                if real != path:
                    paths.append(real)
        except OSError:
            pass
        return path, [_place(p) for p in paths], handle

    def _follow_moves(self) -> None:
        """New names below a subtree deny (created, moved or linked there): indexed, so they keep
        the rule when moved or linked out later."""
        for ev in fanotify.read_events(self.fid_fd):
            rec = fanotify.dfid_name(ev.info)
            if rec is None:
                continue
            fsid, htype, dh, name = rec
            dev = self._fsids.get(fsid)
            if dev is None:
                continue
            try:
                dfd = fanotify.open_handle(self._mount_fds[dev], htype, dh, os.O_PATH | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                p = os.path.join(os.readlink(f"/proc/self/fd/{dfd}"), os.fsdecode(name))
            finally:
                os.close(dfd)
            ident = host_judge.ident_of(p)
            if ident is None:
                continue
            for kind in ("file", "exec"):
                rules = self.rules[kind]
                if not rules.deny_dirs:
                    continue
                below = host_judge.KindRules(deny_dirs=rules.deny_dirs, allow_dirs=rules.allow_dirs)
                m = host_judge.judge(below, ident, [_place(p)])
                if m is not None and m.rule_index:
                    self._index(rules, p, ident[0], (m.rule_index, m.action))

    def _index(self, rules, path: str, dev: int, ref) -> None:
        try:
            htype, h = self._handle_of_path(path)
        except OSError:
            return
        rules.members[(dev, htype, h)] = ref
        self._unignore(path)
        if os.path.isdir(path) and not os.path.islink(path):
            host_judge.members_below(rules, [(path, ref[0], ref[1])], self._handle_of_path, INDEX_MAX,
                                     on_member=self._unignore)

    def _unignore(self, path: str) -> None:
        """Now below a subtree deny: the kernel must ask about it again."""
        try:
            fanotify.mark(self.fd, fanotify.FAN_MARK_REMOVE | fanotify.FAN_MARK_IGNORED_MASK |
                          fanotify.FAN_MARK_DONT_FOLLOW, PERM, path)
        except OSError:
            pass  # it had none

    # ------------------------------------------------------------ stop
    def stop(self) -> None:
        if self._thread is not None:
            os.write(self._stop_w, b"x")
            self._thread.join(5)
            self._thread = None
        self.close()

    def close(self) -> None:
        # Closing the group allows every open still waiting on it.
        for fd in (self.fd, self.fid_fd, self._stop_r, self._stop_w, *self._mount_fds.values()):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self.fid_fd = self._stop_r = self._stop_w = -1
        self._mount_fds = {}


def _place(path: str) -> host_judge.Place:
    parent = os.path.dirname(path) or "/"
    try:
        pst = os.stat(parent)
        pid = (pst.st_dev, pst.st_ino)
    except OSError:
        pid = None
    if not path.startswith("/"):   # not reachable from this root (a memfd, another namespace)
        return host_judge.Place(None, os.fsencode(os.path.basename(path)), None)
    return host_judge.Place(pid, os.fsencode(os.path.basename(path)), host_judge.ancestors_of(path))


_ELF = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")


def _has_interp(fd: int) -> bool:
    """Does this ELF program name a dynamic loader (PT_INTERP)? 64-bit little-endian only."""
    try:
        hdr = os.pread(fd, 64, 0)
        if len(hdr) < 64 or hdr[:4] != b"\x7fELF" or hdr[4] != 2 or hdr[5] != 1:
            return False
        phoff = struct.unpack_from("<Q", hdr, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", hdr, 54)
        if not phentsize or phnum > 128:
            return False
        ph = os.pread(fd, phentsize * phnum, phoff)
        return any(struct.unpack_from("<I", ph, i * phentsize)[0] == 3 for i in range(len(ph) // phentsize))
    except OSError:
        return False


AT_BASE = 7


def _runs_without_interpreter(pid: int) -> bool:
    """Did the kernel start this process with no ELF interpreter (auxv AT_BASE is 0)? True for a
    dynamic loader run as the program, and for static programs. Read from procfs: never an open
    of a file a mark could hold."""
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    for i in range(0, len(raw) - 15, 16):
        key, value = struct.unpack_from("<QQ", raw, i)
        if key == AT_BASE:
            return value == 0
        if key == 0:
            break
    return False


def _pidfd(pid: int) -> Optional[int]:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _proc_header(pid: int) -> Tuple[int, int, int, bytes]:
    """(ppid, uid, gid, comm) of a live process, as the kernel's event header has them."""
    ppid = uid = gid = 0
    comm = b""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"PPid:"):
                    ppid = int(line.split()[1])
                elif line.startswith(b"Uid:"):
                    uid = int(line.split()[1])
                elif line.startswith(b"Gid:"):
                    gid = int(line.split()[1])
        with open(f"/proc/{pid}/comm", "rb") as f:
            comm = f.read().rstrip(b"\n")
    except OSError:
        pass
    return ppid, uid, gid, comm


def _block_record(kind: str, pid: int, who: Tuple[int, int, int, bytes], st, m: host_judge.Match,
                  path: str) -> bytes:
    """The same record a decision program writes (struct assay_block_event), so the event has the
    same shape whichever backend judged."""
    ppid, uid, gid, comm = who
    ev = abi.BlockEvent()
    h = ev.hdr
    h.ts_ns = time.monotonic_ns()
    h.type = int(abi.EventType.EXEC_BLOCKED if kind == "exec" else abi.EventType.FILE_BLOCKED)
    h.pid = h.tid = pid
    h.ppid, h.uid, h.gid = ppid, uid, gid
    h.comm = comm[:abi.COMM_LEN - 1]
    ev.ino = st.st_ino
    ev.dev = st.st_dev & 0xFFFFFFFF
    ev.rule_id = m.rule_index
    ev.action = int(m.action)
    raw = os.fsencode(path)[:abi.PATH_MAX - 1]
    ev.path = raw
    ev.path_len = len(raw)
    return bytes(ev)[:abi.BlockEvent.path.offset + len(raw)]


BACKEND = Backend("host", "cgroup/", "cgroup v2 with cgroup BPF programs (connects), fanotify permission events "
                                      "(files, exec), as root", _precheck, _refused_fix,
                  judges_files_in_userspace=True)
