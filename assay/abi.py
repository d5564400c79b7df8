"""Python mirror of bpf/src/assay.h; tests/test_abi.py checks it against the object's BTF."""
from __future__ import annotations

import ctypes
import enum
import struct

COMM_LEN = 16
PATH_MAX = 4096
ARGS_MAX = 1024
NAME_MAX = 256
WALK_DEPTH = 48
CGROUP_DEPTH = 32
KILL_REQUESTS = 4096
KILL_NOW = 0x80000000     # in a kill request: kill at once (from a cgroup program, which cannot signal)
ACT_FLAG_NOT_MAPS = 0x100   # assay.h ASSAY_ACT_FLAG_NOT_MAPS

RULES_DENY, RULES_DENY_DIRS, RULES_ALLOW, RULES_ALLOW_DIRS = 1, 2, 4, 8
RULES_DENY_NAMES = 16
NET_DENY4, NET_DENY6, NET_ALLOW4, NET_ALLOW6 = 1, 2, 4, 8
NET_RANGES = 8

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s32, s64 = ctypes.c_int32, ctypes.c_int64


class EventType(enum.IntEnum):
    EXEC = 1
    EXIT = 2
    FORK = 3
    OPEN = 4
    CONNECT = 5
    FILE_BLOCKED = 6
    NET_BLOCKED = 7
    EXEC_BLOCKED = 8
    TAMPER_BLOCKED = 9


class Tamper(enum.IntEnum):
    BPF_MAP = 1
    BPF_PROG = 2
    SIGNAL = 3
    PTRACE = 4
    BLOCK_DEVICE = 5
    KERNEL_MEMORY = 6
    KNOB = 7
    MODULE = 8
    MOUNT = 9
    BPF_LINK = 10


class Knob(enum.IntEnum):
    CORE_PATTERN = 1
    MODPROBE = 2
    HOTPLUG = 3
    UEVENT_HELPER = 4
    BINFMT = 5


class Action(enum.IntEnum):
    LOG = 1
    ALERT = 2
    DENY = 3
    KILL_IMMEDIATE = 4
    KILL_GRACEFUL = 5


class Counter(enum.IntEnum):
    RINGBUF_DROP = 0
    SCOPE_FULL = 1
    WALK_TRUNC = 2
    PENDING_FULL = 3
    KILL_FULL = 4
    DISCONNECTED = 5
    SCOPE_FORK_DENIED = 6
    MAX = 7


class OpenSyscall(enum.IntEnum):
    OPENAT = 0
    OPENAT2 = 1
    OPEN = 2


class NetOp(enum.IntEnum):
    CONNECT = 0
    SENDMSG = 1
    SOURCE_ROUTE = 2


# C enum name -> (Python enum, prefix of its C constants)
ENUMS = {
    "assay_event_type": (EventType, "ASSAY_EV_"),
    "assay_action": (Action, "ASSAY_ACT_"),
    "assay_counter": (Counter, "ASSAY_CNT_"),
    "assay_open_syscall": (OpenSyscall, "ASSAY_SYS_"),
    "assay_net_op": (NetOp, "ASSAY_NET_OP_"),
    "assay_tamper": (Tamper, "ASSAY_TAMPER_"),
    "assay_knob": (Knob, "ASSAY_KNOB_"),
}


class Config(ctypes.Structure):
    _fields_ = [("scope_all", u32), ("scope_cgroup", u32), ("cgroup_id", u64),
                ("monitor_tgid", u32), ("event_mask", u32), ("enforce", u32), ("file_rules", u32),
                ("exec_rules", u32), ("net_rules", u32), ("scope_limit", u32), ("scope_user", s32),
                ("protect", u32), ("watchdog_tgid", u32), ("protect_mounts", u32)]


class Lpm4Key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 4)]


class Lpm6Key(ctypes.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u8 * 16)]


class PortRange(ctypes.Structure):
    _fields_ = [("lo", u16), ("hi", u16), ("rule_id", u32), ("action", u32)]


class NetValue(ctypes.Structure):
    _fields_ = [("count", u32), ("ranges", PortRange * NET_RANGES)]


class InodeKey(ctypes.Structure):
    _fields_ = [("ino", u64), ("dev", u32), ("gen", u32)]


class NameKey(ctypes.Structure):
    _fields_ = [("parent_ino", u64), ("parent_dev", u32), ("name_len", u32), ("name_hash", u64)]


FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


def name_hash(name: bytes) -> int:
    """assay_name_key.name_hash: FNV-1a over the name's 8-byte little-endian chunks, the last
    one zero-padded (bpf/src/file.bpf.h computes the same)."""
    h = FNV_OFFSET
    for i in range(0, len(name), 8):
        h ^= int.from_bytes(name[i:i + 8], "little")
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


class RuleRef(ctypes.Structure):
    _fields_ = [("rule_id", u32), ("action", u32)]


class EventHeader(ctypes.Structure):
    _fields_ = [("ts_ns", u64), ("cgroup_id", u64), ("type", u32), ("pid", u32), ("tid", u32),
                ("ppid", u32), ("uid", u32), ("gid", u32), ("comm", ctypes.c_char * COMM_LEN)]


class ExecEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("filename_len", u32), ("args_len", u32),
                ("filename", ctypes.c_char * PATH_MAX), ("args", ctypes.c_char * ARGS_MAX)]


class ExitEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("exit_code", s32), ("signal", s32)]


class ForkEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("child_pid", u32), ("_pad", u32)]


class OpenEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("ret", s64), ("dfd", s32), ("flags", s32), ("mode", u32),
                ("syscall", u16), ("path_len", u16), ("path", ctypes.c_char * PATH_MAX)]


class ConnectEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("ret", s32), ("fd", s32), ("family", u16), ("port", u16),
                ("addr", u8 * 16), ("op", u16), ("_pad", u16)]


class BlockEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("ino", u64), ("dev", u32), ("gen", u32), ("rule_id", u32),
                ("action", u32), ("path_len", u32), ("_pad", u32), ("path", ctypes.c_char * PATH_MAX)]


class NetBlockEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("rule_id", u32), ("action", u32), ("family", u16),
                ("port", u16), ("protocol", u16), ("op", u16), ("addr", u8 * 16)]


class TamperEvent(ctypes.Structure):
    _fields_ = [("hdr", EventHeader), ("what", u32), ("target", u32), ("arg", u32), ("_pad", u32)]


def own_key(kind: Tamper, obj_id: int) -> int:
    """ASSAY_OWN_KEY: a key of the own_objects map."""
    return (int(kind) << 32) | obj_id


# C struct name -> mirror
STRUCTS = {
    "assay_config": Config,
    "assay_inode_key": InodeKey,
    "assay_lpm4_key": Lpm4Key,
    "assay_lpm6_key": Lpm6Key,
    "assay_port_range": PortRange,
    "assay_net_value": NetValue,
    "assay_rule_ref": RuleRef,
    "assay_name_key": NameKey,
    "assay_event_header": EventHeader,
    "assay_exec_event": ExecEvent,
    "assay_exit_event": ExitEvent,
    "assay_fork_event": ForkEvent,
    "assay_open_event": OpenEvent,
    "assay_connect_event": ConnectEvent,
    "assay_block_event": BlockEvent,
    "assay_net_block_event": NetBlockEvent,
    "assay_tamper_event": TamperEvent,
}

EVENT_STRUCTS = {
    EventType.EXEC: ExecEvent,
    EventType.EXIT: ExitEvent,
    EventType.FORK: ForkEvent,
    EventType.OPEN: OpenEvent,
    EventType.CONNECT: ConnectEvent,
    EventType.FILE_BLOCKED: BlockEvent,
    EventType.NET_BLOCKED: NetBlockEvent,
    EventType.EXEC_BLOCKED: BlockEvent,
    EventType.TAMPER_BLOCKED: TamperEvent,
}

_FMT = {u8: "B", u16: "H", u32: "I", u64: "Q", s32: "i", s64: "q"}


def struct_format(cls, skip: str = "", stop: str = "") -> str:
    """A struct module format equal to the ctypes layout (the fast decoding path).

    With skip naming the first field, the format covers only what follows it; with stop naming a
    field, it ends just before that field (and has no tail padding)."""
    out, pos = ["<"], 0
    fields = cls._fields_
    if skip:
        assert fields[0][0] == skip
        pos = ctypes.sizeof(fields[0][1])
        fields = fields[1:]
    for name, ctype in fields:
        if name == stop:
            return "".join(out)
        off = getattr(cls, name).offset
        if off > pos:
            out.append(f"{off - pos}x")
        size = ctypes.sizeof(ctype)
        if ctype in _FMT:
            out.append(_FMT[ctype])
        elif issubclass(ctype, ctypes.Structure):
            out.append(struct_format(ctype)[1:])
        else:  # arrays of bytes/chars
            out.append(f"{size}s")
        pos = off + size
    if ctypes.sizeof(cls) > pos:
        out.append(f"{ctypes.sizeof(cls) - pos}x")
    return "".join(out)


HEADER = struct.Struct(struct_format(EventHeader))
HEADER_SIZE = HEADER.size
