"""Decoding of ring buffer records into event dicts, and their JSON and text renderings."""
from __future__ import annotations

import errno
import functools
import ipaddress
import json
import os
import re
import signal
import struct
import time
from typing import Callable, Dict, Mapping, Optional

from assay import abi
from assay.abi import EventType

TYPE_NAMES = {t: t.name.lower() for t in EventType}
ACTION_NAMES = {a: a.name.lower() for a in abi.Action}
FAMILIES = {2: "inet", 10: "inet6"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 262: "mptcp"}
NET_OPS = {o: o.name.lower() for o in abi.NetOp}
TAMPER = {t: t.name.lower() for t in abi.Tamper}
KNOBS = {abi.Knob.CORE_PATTERN: "core_pattern", abi.Knob.MODPROBE: "modprobe", abi.Knob.HOTPLUG: "hotplug",
         abi.Knob.UEVENT_HELPER: "uevent_helper", abi.Knob.BINFMT: "binfmt_misc/register"}
MOUNT_CALLS = {1: "mount", 2: "move_mount", 3: "pivot_root", 4: "fsconfig"}
SYSCALLS = {0: "openat", 1: "openat2", 2: "open"}
BUILTIN_SOURCE_ROUTE = "builtin:source-route"
BUILTIN_UNPROVABLE = "builtin:unprovable-path"

# Control characters, backslash, and the surrogates that surrogateescape makes of invalid UTF-8.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\\\\\udc80-\udcff]")
# Composite flags first, so O_SYNC is not also shown as O_DSYNC, nor O_TMPFILE as O_DIRECTORY.
_FLAG_NAMES = [n for n in ("O_TMPFILE", "O_SYNC", "O_CREAT", "O_EXCL", "O_NOCTTY", "O_TRUNC", "O_APPEND",
                           "O_NONBLOCK", "O_DSYNC", "O_DIRECTORY", "O_NOFOLLOW", "O_CLOEXEC", "O_PATH",
                           "O_DIRECT", "O_NOATIME", "O_LARGEFILE") if getattr(os, n, 0)]


def _escape_char(m: "re.Match") -> str:
    c = ord(m.group())
    if c == 0x5C:
        return "\\\\"
    return f"\\x{c - 0xDC00 if c >= 0xDC80 else c:02x}"


_ONLY_PRINTABLE_ASCII = re.compile(rb"[\x20-\x5b\x5d-\x7e]*\Z")


def clean(raw: bytes) -> str:
    """Kernel strings are untrusted: invalid UTF-8 and control characters become \\xNN escapes."""
    if _ONLY_PRINTABLE_ASCII.match(raw):  # the common case, and the hot path
        return raw.decode("ascii")
    return _UNSAFE.sub(_escape_char, raw.decode("utf-8", "surrogateescape"))


@functools.lru_cache(maxsize=256)
def open_flags(flags: int) -> str:
    acc = flags & 3
    names = ["O_WRONLY" if acc == 1 else "O_RDWR" if acc == 2 else "O_RDONLY"]
    rest = flags & ~3
    for n in _FLAG_NAMES:
        bit = getattr(os, n)
        if rest & bit == bit:
            names.append(n)
            rest &= ~bit
    if rest:
        names.append(hex(rest))
    return "|".join(names)


def _errname(ret: int) -> Optional[str]:
    return errno.errorcode.get(-ret, str(-ret)) if ret < 0 else None


def _addr(family: int, raw: bytes) -> str:
    if family == 2:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw[:16]))


class Decoder:
    """Turns raw records into dicts. Pure apart from the clock offset fixed at construction."""

    def __init__(self, rule_names: Optional[Mapping[int, str]] = None):
        # ktime_get_ns() is CLOCK_MONOTONIC; this offset maps it to wall-clock time.
        self._wall_offset = time.time() - time.monotonic()
        self.rule_names: Mapping[int, str] = rule_names or {}
        self.enforcer: Optional[str] = None   # the backend whose decision a rule event reports
        # Variable-length records: the fixed part stops before the trailing path.
        self._body = {t: struct.Struct(abi.struct_format(cls, skip="hdr", stop="path"))
                      for t, cls in abi.EVENT_STRUCTS.items()}
        self._hsize = abi.HEADER_SIZE
        self._path_off = {t: getattr(cls, "path").offset for t, cls in abi.EVENT_STRUCTS.items()
                          if hasattr(cls, "path")}
        self._sec, self._sec_text = -1, ""
        self._decoders: Dict[int, Callable] = {
            EventType.EXEC: self._exec, EventType.EXIT: self._exit, EventType.FORK: self._fork,
            EventType.OPEN: self._open, EventType.CONNECT: self._connect,
            EventType.FILE_BLOCKED: self._block, EventType.EXEC_BLOCKED: self._block,
            EventType.NET_BLOCKED: self._net_block, EventType.TAMPER_BLOCKED: self._tamper,
        }

    def timestamp(self, ts_ns: int) -> str:
        """RFC 3339 UTC with microseconds; the seconds part is formatted once per second."""
        us = int(ts_ns / 1000 + self._wall_offset * 1e6)
        sec, frac = divmod(us, 1_000_000)
        if sec != self._sec:
            self._sec, self._sec_text = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._sec_text}.{frac:06d}Z"

    def decode(self, data: bytes) -> dict:
        if len(data) < self._hsize:
            raise ValueError(f"short record: {len(data)} bytes")
        ts, cg, typ, pid, tid, ppid, uid, gid, comm = abi.HEADER.unpack_from(data)
        ev = {"type": TYPE_NAMES.get(typ, str(typ)), "ts": self.timestamp(ts), "pid": pid, "tid": tid,
              "ppid": ppid, "uid": uid, "gid": gid, "comm": clean(comm.split(b"\0", 1)[0]),
              "cgroup_id": cg}
        fn = self._decoders.get(typ)
        if fn is not None:
            fn(typ, data, ev)
        return ev

    def _fields(self, typ: int, data: bytes) -> tuple:
        return self._body[typ].unpack_from(data, self._hsize)

    def _path(self, typ: int, data: bytes, length: int) -> str:
        off = self._path_off[typ]
        return clean(data[off:off + length].split(b"\0", 1)[0])

    def _exec(self, typ, data, ev):
        flen, alen, filename, args = self._fields(typ, data)
        ev["filename"] = clean(filename[:flen].split(b"\0", 1)[0])
        argv = args[:alen].rstrip(b"\0").split(b"\0") if alen else []
        ev["argv"] = [clean(a) for a in argv]
        ev["argv_truncated"] = alen >= abi.ARGS_MAX

    def _exit(self, typ, data, ev):
        ev["exit_code"], ev["signal"] = self._fields(typ, data)[:2]

    def _fork(self, typ, data, ev):
        ev["child_pid"] = self._fields(typ, data)[0]

    def _open(self, typ, data, ev):
        ret, dfd, flags, mode, syscall, plen = self._fields(typ, data)
        ev.update(syscall=SYSCALLS.get(syscall, str(syscall)), path=self._path(typ, data, plen),
                  flags=open_flags(flags), ret=ret, dfd=dfd)
        if ret < 0:
            ev["error"] = _errname(ret)

    def _connect(self, typ, data, ev):
        ret, fd, family, port, addr, op, _ = self._fields(typ, data)
        ev.update(family=FAMILIES.get(family, str(family)), addr=_addr(family, addr), port=port, ret=ret,
                  fd=fd, op=NET_OPS.get(op, str(op)))
        if ret < 0:
            ev["error"] = _errname(ret)

    def _rule(self, ev, rule_id, action):
        # rule id 0 is no policy rule but a built-in refusal: a source route (net_blocked), or a
        # path whose ancestry could not be walked to its end (file_blocked, exec_blocked)
        if rule_id:
            ev["rule"] = self.rule_names.get(rule_id, str(rule_id))
        else:
            ev["rule"] = BUILTIN_SOURCE_ROUTE if ev["type"] == "net_blocked" else BUILTIN_UNPROVABLE
        ev["rule_id"] = rule_id
        ev["action"] = ACTION_NAMES.get(action, str(action))
        if self.enforcer:
            ev["enforcer"] = self.enforcer
        if action in (abi.Action.LOG, abi.Action.ALERT):
            ev["type"] = ev["type"].replace("_blocked", "_alert")  # reported, not denied

    def _block(self, typ, data, ev):
        ino, dev, gen, rule_id, action, plen, _pad = self._fields(typ, data)
        self._rule(ev, rule_id, action)
        ev.update(path=self._path(typ, data, plen), dev=dev, ino=ino, gen=gen)

    def _net_block(self, typ, data, ev):
        rule_id, action, family, port, proto, op, addr = self._fields(typ, data)
        self._rule(ev, rule_id, action)
        ev.update(family=FAMILIES.get(family, str(family)), addr=_addr(family, addr), port=port,
                  protocol=PROTOCOLS.get(proto, str(proto)), op=NET_OPS.get(op, str(op)))


    def _tamper(self, typ, data, ev):
        what, target, arg, _ = self._fields(typ, data)
        ev["what"] = TAMPER.get(what, str(what))
        if what in (abi.Tamper.BPF_MAP, abi.Tamper.BPF_PROG, abi.Tamper.BPF_LINK):
            ev["id"] = target
        elif what in (abi.Tamper.BLOCK_DEVICE, abi.Tamper.KERNEL_MEMORY):
            ev["device"] = f"{os.major(target)}:{os.minor(target)}" if target else "/proc/kcore"
        elif what == abi.Tamper.KNOB:
            ev["knob"] = KNOBS.get(target, str(target))
        elif what == abi.Tamper.MODULE:
            ev["load"] = {1: "module", 2: "kexec"}.get(target, str(target))
        elif what == abi.Tamper.MOUNT:
            ev["call"] = MOUNT_CALLS.get(target, str(target))
        else:
            ev["target_pid"] = target
        if what == abi.Tamper.SIGNAL:
            ev["signal"] = _signame(arg)
        elif what == abi.Tamper.PTRACE:
            ev["mode"] = arg
        if self.enforcer:
            ev["enforcer"] = self.enforcer


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def to_json(ev: dict) -> str:
    return json.dumps(ev, separators=(",", ":"))


def _host_port(ev: dict) -> str:
    host = f"[{ev['addr']}]" if ev["family"] == "inet6" else ev["addr"]
    return f"{host}:{ev['port']}"


def _via(ev: dict) -> str:
    return f" enforcer={ev['enforcer']}" if ev.get("enforcer") else ""


def to_text(ev: dict) -> str:
    """One line for people; every string in ev is already escaped."""
    t = ev["type"]
    if t == "policy_reloaded":
        return (f"POLICY RELOADED {ev['path']} ({ev['policy']}): +{ev['added']} -{ev['removed']} ~{ev['changed']} "
                f"rules; entries +{ev['entries']['added']} ~{ev['entries']['updated']} -{ev['entries']['removed']}")
    if t == "policy_reload_failed":
        return f"POLICY RELOAD {ev['outcome'].upper()} {ev['path']}: {ev['error']}"
    who = f"[{ev['pid']} {ev['comm']}]"
    if t == "exec":
        return f"{who} exec {ev['filename']} {' '.join(ev['argv'][1:])}".rstrip()
    if t == "exit":
        how = f"signal {ev['signal']}" if ev["signal"] else f"code {ev['exit_code']}"
        return f"{who} exit {how}"
    if t == "fork":
        return f"{who} fork -> {ev['child_pid']}"
    if t == "open":
        res = ev.get("error") or ev["ret"]
        return f"{who} {ev['syscall']} {ev['path']} {ev['flags']} = {res}"
    if t == "connect":
        res = ev.get("error") or ev["ret"]
        return f"{who} {ev.get('op', 'connect')} {_host_port(ev)} = {res}"
    if t in ("file_blocked", "exec_blocked", "file_alert", "exec_alert"):
        verb = "BLOCKED" if t.endswith("blocked") else "ALERT"
        return (f"{who} {verb} {t.split('_')[0].upper()} {ev['path']} rule={ev['rule']} "
                f"action={ev['action']} dev={ev['dev']} ino={ev['ino']} gen={ev['gen']}{_via(ev)}")
    if t in ("net_blocked", "net_alert"):
        verb = "BLOCKED" if t.endswith("blocked") else "ALERT"
        return (f"{who} {verb} {ev.get('op', 'connect').upper()} {_host_port(ev)} "
                f"rule={ev['rule']} action={ev['action']}{_via(ev)}")
    if t == "tamper_blocked":
        target = next((f"{k} {ev[k]}" for k in ("id", "device", "knob", "load", "call") if k in ev), None) \
            or f"pid {ev['target_pid']}"
        extra = f" {ev['signal']}" if "signal" in ev else ""
        return f"{who} BLOCKED TAMPER {ev['what']}{extra} -> {target}{_via(ev)}"
    if t == "process_killed":
        return f"{who} KILLED with {ev['signal']} rule={ev['rule']}"
    return f"{who} {t}"
