"""fanotify(7) through libc: groups, marks, permission events and their answers, file handles."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from typing import Iterator, Optional, Tuple

import attrs

# fanotify_init flags
FAN_CLOEXEC = 0x01
FAN_NONBLOCK = 0x02
FAN_CLASS_CONTENT = 0x04
FAN_UNLIMITED_QUEUE = 0x10
FAN_UNLIMITED_MARKS = 0x20
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# fanotify_mark flags
FAN_MARK_ADD = 0x01
FAN_MARK_REMOVE = 0x02
FAN_MARK_DONT_FOLLOW = 0x04
FAN_MARK_ONLYDIR = 0x08
FAN_MARK_IGNORED_MASK = 0x20
FAN_MARK_IGNORED_SURV_MODIFY = 0x40
FAN_MARK_FLUSH = 0x80
FAN_MARK_FILESYSTEM = 0x100

# event masks
FAN_MODIFY = 0x02
FAN_MOVED_FROM = 0x40
FAN_MOVED_TO = 0x80
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_Q_OVERFLOW = 0x4000
FAN_OPEN_PERM = 0x10000
FAN_OPEN_EXEC_PERM = 0x40000
FAN_ONDIR = 0x40000000
FAN_EVENT_ON_CHILD = 0x08000000

FAN_ALLOW = 0x01
FAN_DENY = 0x02
FAN_NOFD = -1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
MAX_HANDLE_SZ = 128

METADATA = struct.Struct("=IBBHQii")      # struct fanotify_event_metadata
RESPONSE = struct.Struct("=iI")           # struct fanotify_response
INFO_HEADER = struct.Struct("=BBH")       # struct fanotify_event_info_header
FSID = struct.Struct("=ii")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_init.restype = ctypes.c_int
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p]
_libc.fanotify_mark.restype = ctypes.c_int
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int),
                                    ctypes.c_int]
_libc.name_to_handle_at.restype = ctypes.c_int
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.open_by_handle_at.restype = ctypes.c_int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def init(flags: int, event_flags: int = os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC) -> int:
    return _check(_libc.fanotify_init(flags, event_flags), "fanotify_init")


def mark(fd: int, flags: int, mask: int, path: Optional[str], dirfd: int = AT_FDCWD) -> None:
    raw = os.fsencode(path) if path is not None else None
    _check(_libc.fanotify_mark(fd, flags, mask, dirfd, raw), f"fanotify_mark {path or dirfd}")


@attrs.frozen
class Event:
    mask: int
    fd: int
    pid: int
    info: bytes = b""     # the info records after the metadata (FID groups)


def read_events(fd: int, size: int = 64 << 10) -> Iterator[Event]:
    """The events waiting on a group (a non-blocking fd): none when it has nothing."""
    try:
        buf = os.read(fd, size)
    except BlockingIOError:
        return
    off = 0
    while off + METADATA.size <= len(buf):
        event_len, _vers, _res, meta_len, mask, efd, pid = METADATA.unpack_from(buf, off)
        if event_len < METADATA.size:
            break
        yield Event(mask, efd, pid, bytes(buf[off + meta_len:off + event_len]))
        off += event_len


def respond(fd: int, event_fd: int, allow: bool) -> None:
    """Answers a permission event; the kernel then lets the open go on, or fails it with EPERM."""
    os.write(fd, RESPONSE.pack(event_fd, FAN_ALLOW if allow else FAN_DENY))


def dfid_name(info: bytes) -> Optional[Tuple[int, int, bytes, bytes]]:
    """(fsid as statvfs's f_fsid, handle type, handle bytes, name) of a FAN_REPORT_DFID_NAME record."""
    off = 0
    while off + INFO_HEADER.size <= len(info):
        typ, _pad, length = INFO_HEADER.unpack_from(info, off)
        if length < INFO_HEADER.size:
            return None
        if typ == FAN_EVENT_INFO_TYPE_DFID_NAME:
            v0, v1 = FSID.unpack_from(info, off + INFO_HEADER.size)
            body = info[off + INFO_HEADER.size + FSID.size:off + length]
            hbytes, htype = struct.unpack_from("=Ii", body)
            handle = body[8:8 + hbytes]
            name = body[8 + hbytes:].split(b"\0", 1)[0]
            return (v0 & 0xFFFFFFFF) | (v1 & 0xFFFFFFFF) << 32, htype, handle, name
        off += length
    return None


class _Handle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ)]


def handle_of(fd: int, path: bytes = b"") -> Tuple[int, bytes]:
    """The file handle (type, bytes) of an open file, or of PATH below dirfd fd: the inode's
    identity with its generation, which a reused inode number does not share."""
    h = _Handle(handle_bytes=MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    flags = AT_EMPTY_PATH if not path else 0
    _check(_libc.name_to_handle_at(fd, path or b"", ctypes.byref(h), ctypes.byref(mount_id), flags),
           "name_to_handle_at")
    return h.handle_type, bytes(h.f_handle[:h.handle_bytes])


def open_handle(mount_fd: int, htype: int, handle: bytes, flags: int = os.O_PATH) -> int:
    h = _Handle(handle_bytes=len(handle), handle_type=htype)
    ctypes.memmove(h.f_handle, handle, len(handle))
    return _check(_libc.open_by_handle_at(mount_fd, ctypes.byref(h), flags | os.O_CLOEXEC), "open_by_handle_at")


def available() -> Optional[str]:
    """None when permission events can be used here, else why not."""
    try:
        fd = init(FAN_CLASS_CONTENT | FAN_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return "fanotify permission events are not in this kernel (CONFIG_FANOTIFY_ACCESS_PERMISSIONS)"
        if e.errno == errno.EPERM:
            return "fanotify needs CAP_SYS_ADMIN"
        if e.errno == errno.ENOSYS:
            return "fanotify is not in this kernel (CONFIG_FANOTIFY)"
        return f"fanotify_init: {e.strerror}"
    os.close(fd)
    return None
