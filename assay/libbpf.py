"""Every ctypes declaration of the system libbpf (0.3 to 1.x), and the glue for its conventions."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno as _errno
import os
import platform
import resource
from typing import Callable, Optional

from assay.errors import BpfError

c_void_p, c_char_p, c_int, c_uint, c_size_t = (
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_size_t)
c_long, c_ulong, c_uint32, c_uint64 = ctypes.c_long, ctypes.c_ulong, ctypes.c_uint32, ctypes.c_uint64

SONAMES = ("libbpf.so.1", "libbpf.so.0")

# ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
RING_BUFFER_SAMPLE_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


class _VaListAarch64(ctypes.Structure):
    # AAPCS64 va_list: passed to the print callback by reference.
    _fields_ = [("stack", c_void_p), ("gr_top", c_void_p), ("vr_top", c_void_p),
                ("gr_offs", c_int), ("vr_offs", c_int)]


# On x86_64 va_list is an array type, so the callback receives a pointer either way.
VA_LIST = c_void_p
PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, VA_LIST)

# (name, restype, argtypes, first libbpf version that has it). Missing optional symbols stay None.
_PROTOTYPES = [
    ("libbpf_set_print", c_void_p, [PRINT_FN], "0.0.1"),
    ("libbpf_strerror", c_int, [c_int, c_char_p, c_size_t], "0.0.1"),
    ("libbpf_major_version", c_uint32, [], "0.6"),
    ("libbpf_minor_version", c_uint32, [], "0.6"),
    ("libbpf_version_string", c_char_p, [], "0.6"),
    ("libbpf_num_possible_cpus", c_int, [], "0.0.1"),
    ("bpf_object__open_file", c_void_p, [c_char_p, c_void_p], "0.0.6"),
    ("bpf_object__load", c_int, [c_void_p], "0.0.1"),
    ("bpf_object__close", None, [c_void_p], "0.0.1"),
    ("bpf_object__find_program_by_name", c_void_p, [c_void_p, c_char_p], "0.0.7"),
    ("bpf_object__find_map_by_name", c_void_p, [c_void_p, c_char_p], "0.0.1"),
    ("bpf_object__next_program", c_void_p, [c_void_p, c_void_p], "0.6"),
    ("bpf_program__next", c_void_p, [c_void_p, c_void_p], "0.0.1"),
    ("bpf_object__next_map", c_void_p, [c_void_p, c_void_p], "0.6"),
    ("bpf_map__next", c_void_p, [c_void_p, c_void_p], "0.0.1"),
    ("bpf_program__name", c_char_p, [c_void_p], "0.0.7"),
    ("bpf_program__section_name", c_char_p, [c_void_p], "0.2"),
    ("bpf_program__set_autoload", c_int, [c_void_p, ctypes.c_bool], "0.1"),
    ("bpf_program__autoload", ctypes.c_bool, [c_void_p], "0.1"),
    ("bpf_program__fd", c_int, [c_void_p], "0.0.1"),
    ("bpf_program__attach", c_void_p, [c_void_p], "0.0.7"),
    ("bpf_program__attach_cgroup", c_void_p, [c_void_p, c_int], "0.0.7"),
    ("bpf_link__destroy", c_int, [c_void_p], "0.0.7"),
    ("bpf_link__fd", c_int, [c_void_p], "0.0.7"),
    ("bpf_map__name", c_char_p, [c_void_p], "0.0.1"),
    ("bpf_map__fd", c_int, [c_void_p], "0.0.1"),
    ("bpf_map__set_max_entries", c_int, [c_void_p, c_uint32], "0.1"),
    ("bpf_map__resize", c_int, [c_void_p, c_uint32], "0.0.1"),
    ("bpf_map_update_elem", c_int, [c_int, c_void_p, c_void_p, c_uint64], "0.0.1"),
    ("bpf_map_update_batch", c_int, [c_int, c_void_p, c_void_p, ctypes.POINTER(c_uint32), c_void_p], "0.0.8"),
    ("bpf_map_lookup_elem", c_int, [c_int, c_void_p, c_void_p], "0.0.1"),
    ("bpf_map_delete_elem", c_int, [c_int, c_void_p], "0.0.1"),
    ("bpf_map_get_next_key", c_int, [c_int, c_void_p, c_void_p], "0.0.1"),
    ("bpf_obj_get_info_by_fd", c_int, [c_int, c_void_p, ctypes.POINTER(c_uint32)], "0.0.1"),
    ("libbpf_get_error", c_long, [c_void_p], "0.0.1"),
    ("ring_buffer__new", c_void_p, [c_int, RING_BUFFER_SAMPLE_FN, c_void_p, c_void_p], "0.0.9"),
    ("ring_buffer__free", None, [c_void_p], "0.0.9"),
    ("ring_buffer__poll", c_int, [c_void_p, c_int], "0.0.9"),
    ("ring_buffer__consume", c_int, [c_void_p], "0.0.9"),
    ("ring_buffer__epoll_fd", c_int, [c_void_p], "0.3"),
]

REQUIRED = {"bpf_object__open_file", "bpf_object__load", "bpf_program__attach", "ring_buffer__new",
            "ring_buffer__poll", "ring_buffer__consume", "bpf_program__set_autoload",
            "ring_buffer__epoll_fd"}


class BpfMapInfo(ctypes.Structure):
    # Prefix of struct bpf_map_info (uapi); the kernel fills what fits in the size we pass.
    _fields_ = [("type", c_uint32), ("id", c_uint32), ("key_size", c_uint32),
                ("value_size", c_uint32), ("max_entries", c_uint32), ("map_flags", c_uint32),
                ("name", ctypes.c_char * 16)]


class BpfProgInfo(ctypes.Structure):
    # Prefix of struct bpf_prog_info (uapi) up to recursion_misses (5.12+; older kernels leave it 0).
    _fields_ = [("type", c_uint32), ("id", c_uint32), ("_head", ctypes.c_uint8 * 184),
                ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
                ("recursion_misses", ctypes.c_uint64)]


class Lib:
    """The loaded libbpf: its functions as attributes (None where this version lacks them)."""

    def __init__(self, cdll: ctypes.CDLL, soname: str, path: str):
        self._cdll = cdll
        self.soname = soname
        self.path = path
        for name, restype, argtypes, _since in _PROTOTYPES:
            try:
                fn = getattr(cdll, name)
            except AttributeError:
                setattr(self, name, None)
                continue
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, name, fn)
        missing = sorted(n for n in REQUIRED if getattr(self, n) is None)
        if missing:
            raise BpfError(f"{path} is too old for Assay (needs libbpf >= 0.3): lacks {', '.join(missing)}")
        self.version = self._version()
        self._print_cb = None

    def _version(self) -> str:
        if self.libbpf_major_version is not None:
            return f"{self.libbpf_major_version()}.{self.libbpf_minor_version()}"
        # Older than 0.6: infer the range from the symbols it exports.
        if getattr(self._cdll, "bpf_map__update_elem", None) is not None:
            return "0.8"
        if getattr(self._cdll, "libbpf_set_strict_mode", None) is not None:
            return "0.5"
        if getattr(self._cdll, "bpf_linker__new", None) is not None:
            return "0.4"
        return "0.3"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def set_print(self, fn: Optional[Callable[[int, str], None]]) -> None:
        """Routes libbpf's log lines to fn(level, message); None silences libbpf."""
        if fn is None:
            self._print_cb = None
            self.libbpf_set_print(ctypes.cast(None, PRINT_FN))
            return
        libc = ctypes.CDLL(None, use_errno=True)
        vsnprintf = libc.vsnprintf
        vsnprintf.restype = c_int
        vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, VA_LIST]

        # libbpf hands over a verifier log as one message: 1 MiB holds any the kernel keeps.
        buf = ctypes.create_string_buffer(1 << 20)

        def _cb(level, fmt, args):
            vsnprintf(buf, len(buf), fmt, args)
            try:
                fn(level, buf.value.decode("utf-8", "backslashreplace").rstrip("\n"))
            except Exception:  # a logging failure must never unwind through C
                pass
            return 0

        self._print_cb = PRINT_FN(_cb)  # keep a reference: libbpf stores the pointer
        self.libbpf_set_print(self._print_cb)

    def strerror(self, err: int) -> str:
        buf = ctypes.create_string_buffer(256)
        if self.libbpf_strerror(err, buf, len(buf)) == 0:
            return buf.value.decode()
        return os.strerror(err) if 0 < err < 4096 else f"error {err}"


def ptr_error(value: Optional[int]) -> int:
    """libbpf 0.x returns ERR_PTR-encoded pointers, 1.x returns NULL and sets errno: handle both."""
    if not value:
        return ctypes.get_errno() or _errno.EINVAL
    if value >= (1 << 64) - 4095:
        return (1 << 64) - value
    return 0


def int_error(ret: int) -> int:
    """1.x returns -errno; 0.x low-level calls return -1 with errno set. Returns a positive errno or 0."""
    if ret >= 0:
        return 0
    if ret == -1:
        return ctypes.get_errno() or _errno.EPERM
    return -ret


_lib: Optional[Lib] = None


def find_libbpf() -> tuple:
    """Returns (soname, path) of the first loadable libbpf, or raises BpfError."""
    errors = []
    for soname in SONAMES:
        try:
            ctypes.CDLL(soname, use_errno=True)
            return soname, ctypes.util.find_library(soname.split(".so")[0][3:]) or soname
        except OSError as e:
            errors.append(str(e))
    raise BpfError("libbpf not found (need libbpf.so.1 or libbpf.so.0: apt-get install libbpf1): "
                   + "; ".join(errors))


def load() -> Lib:
    """Loads the system libbpf once, preferring libbpf.so.1."""
    global _lib
    if _lib is None:
        soname, path = find_libbpf()
        _lib = Lib(ctypes.CDLL(soname, use_errno=True), soname, path)
    return _lib


def raise_memlock() -> None:
    """Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK, and libbpf 0.x does not raise it."""
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if hard != soft:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))


if platform.machine() == "aarch64":  # pragma: no cover - exercised on arm64 only
    VA_LIST = ctypes.POINTER(_VaListAarch64)
    PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, VA_LIST)
    _PROTOTYPES[0] = ("libbpf_set_print", c_void_p, [PRINT_FN], "0.0.1")
