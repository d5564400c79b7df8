"""Object model over libbpf: Object, Program, Link, Map and RingBuffer."""
from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import structlog

from assay import libbpf, log as _logsetup  # noqa: F401  (default log level before any CLI setup)
from assay.errors import BpfError

log = structlog.get_logger("assay.bpf")

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2
PERCPU_TYPES = {5, 6, 10}  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
# libbpf's warnings (verifier logs included) show with --log-level info; errors carry the gist.
LEVELS = {0: "info", 1: "info", 2: "debug"}


def _route_libbpf_log(level: int, msg: str) -> None:
    getattr(log, LEVELS.get(level, "debug"))("libbpf", msg=msg)


_print_synced = False


def sync_libbpf_log() -> None:
    """libbpf prints through us only when its lines can show (--log-level info or debug)."""
    global _print_synced
    if libbpf._lib is None:
        return
    _print_synced = True
    if _logsetup.libbpf_visible:
        libbpf._lib.set_print(_route_libbpf_log)
    else:
        libbpf._lib.set_print(None)


def lib() -> libbpf.Lib:
    lb = libbpf.load()
    if not _print_synced:
        sync_libbpf_log()
    return lb


def _as_buffer(value, size: int, what: str):
    if isinstance(value, (bytes, bytearray)):
        if len(value) != size:
            raise ValueError(f"{what} must be {size} bytes, got {len(value)}")
        return ctypes.create_string_buffer(bytes(value), size)
    if ctypes.sizeof(value) != size:
        raise ValueError(f"{what} must be {size} bytes, got {ctypes.sizeof(value)}")
    return value


class Link:
    """An attachment; destroying it detaches the program."""

    def __init__(self, ptr: int, program: "Program"):
        self._ptr = ptr
        self.program = program

    def id(self) -> Optional[int]:
        """The kernel's id of this link (BPF_LINK_GET_FD_BY_ID takes it), None for an attachment
        that is no bpf_link (a perf event on kernels before bpf_link for tracepoints)."""
        if not self._ptr or lib().bpf_link__fd is None:
            return None
        fd = lib().bpf_link__fd(self._ptr)
        if fd < 0:
            return None
        info = (ctypes.c_uint32 * 32)()   # struct bpf_link_info: type, id, prog_id, ...
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if libbpf.int_error(lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))):
            return None
        return int(info[1]) or None

    def destroy(self) -> None:
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None


def destroy_all(links: List["Link"]) -> None:
    """Detaches links side by side: closing a tracepoint's perf event waits for an RCU grace
    period (~75 ms), and one after another those waits add up to seconds. ctypes drops the GIL
    for the call, so the waits overlap."""
    links = [l for l in links if l._ptr]
    if len(links) < 2:
        for link in links:
            link.destroy()
        return
    threads = [threading.Thread(target=link.destroy, name="assay-detach") for link in links]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Program:
    def __init__(self, obj: "Object", ptr: int):
        lb = lib()
        self._obj, self._ptr = obj, ptr
        self.name = lb.bpf_program__name(ptr).decode()
        sec = lb.bpf_program__section_name(ptr) if lb.bpf_program__section_name else None
        self.section = sec.decode() if sec else ""

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, on: bool) -> None:
        err = libbpf.int_error(lib().bpf_program__set_autoload(self._ptr, bool(on)))
        if err:
            raise BpfError(f"cannot set autoload on {self.name}: {lib().strerror(err)}")

    @property
    def fd(self) -> int:
        return lib().bpf_program__fd(self._ptr)

    def _prog_info(self) -> libbpf.BpfProgInfo:
        info = libbpf.BpfProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        err = libbpf.int_error(lib().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info), ctypes.byref(size)))
        if err:
            raise BpfError(f"program {self.name}: get info failed: {lib().strerror(err)}")
        return info

    @property
    def id(self) -> int:
        return int(self._prog_info().id)

    def recursion_misses(self) -> int:
        """Runs the kernel skipped because this program was already running on that CPU (a
        trampoline program whose task was preempted inside it): for fmod_ret, a decision not made."""
        return int(self._prog_info().recursion_misses)

    def attach(self) -> Link:
        if self.section.startswith("cgroup/"):
            return self._attach_cgroup()
        ptr = lib().bpf_program__attach(self._ptr)
        err = libbpf.ptr_error(ptr)
        if err:
            raise BpfError(f"attach {self.name} ({self.section}) failed: {lib().strerror(err)}")
        return Link(ptr, self)

    def _attach_cgroup(self) -> Link:
        """A cgroup program goes on the cgroup v2 root, through a bpf_link: it covers every
        process, and it goes away with this process (never left attached)."""
        from assay.system import cgroup2_root

        root = cgroup2_root()
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            ptr = lib().bpf_program__attach_cgroup(self._ptr, fd)
        finally:
            os.close(fd)
        err = libbpf.ptr_error(ptr)
        if err:
            raise BpfError(f"attach {self.name} ({self.section}) to {root} failed: {lib().strerror(err)}")
        return Link(ptr, self)


class Map:
    def __init__(self, obj: "Object", ptr: int):
        self._obj, self._ptr = obj, ptr
        self.name = lib().bpf_map__name(ptr).decode()
        self._info: Optional[libbpf.BpfMapInfo] = None

    def set_max_entries(self, n: int) -> None:
        lb = lib()
        fn = lb.bpf_map__set_max_entries or lb.bpf_map__resize
        err = libbpf.int_error(fn(self._ptr, n))
        if err:
            raise BpfError(f"cannot size map {self.name} to {n}: {lb.strerror(err)}")

    @property
    def fd(self) -> int:
        return lib().bpf_map__fd(self._ptr)

    @property
    def info(self) -> libbpf.BpfMapInfo:
        # Asked of the kernel once loaded: works the same on every libbpf version.
        if self._info is None:
            info = libbpf.BpfMapInfo()
            size = ctypes.c_uint32(ctypes.sizeof(info))
            err = libbpf.int_error(lib().bpf_obj_get_info_by_fd(self.fd, ctypes.byref(info),
                                                                 ctypes.byref(size)))
            if err:
                raise BpfError(f"map {self.name}: get info failed: {lib().strerror(err)}")
            self._info = info
        return self._info

    @property
    def key_size(self) -> int:
        return self.info.key_size

    @property
    def value_size(self) -> int:
        return self.info.value_size

    @property
    def is_percpu(self) -> bool:
        return self.info.type in PERCPU_TYPES

    def _value_buf_size(self) -> int:
        if self.is_percpu:
            return ((self.value_size + 7) // 8) * 8 * lib().libbpf_num_possible_cpus()
        return self.value_size

    def update(self, key, value, flags: int = BPF_ANY) -> None:
        k = _as_buffer(key, self.key_size, "key")
        v = _as_buffer(value, self._value_buf_size(), "value")
        err = libbpf.int_error(lib().bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(v), flags))
        if err:
            raise BpfError(f"map {self.name}: update failed: {lib().strerror(err)}")

    def insert(self, key, value) -> bool:
        """Adds a new key; False if it was already there (BPF_NOEXIST)."""
        k = _as_buffer(key, self.key_size, "key")
        v = _as_buffer(value, self._value_buf_size(), "value")
        err = libbpf.int_error(lib().bpf_map_update_elem(self.fd, ctypes.byref(k), ctypes.byref(v), BPF_NOEXIST))
        if err == errno.EEXIST:
            return False
        if err:
            raise BpfError(f"map {self.name}: update failed: {lib().strerror(err)}")
        return True

    def update_many(self, items: List[Tuple[bytes, bytes]]) -> None:
        """Writes many entries in one syscall where the kernel has batch ops (5.6+)."""
        if not items:
            return
        lb = lib()
        keys = b"".join(k for k, _ in items)
        values = b"".join(v for _, v in items)
        if len(keys) != len(items) * self.key_size or len(values) != len(items) * self.value_size:
            raise ValueError(f"map {self.name}: batch of mis-sized keys or values")
        if lb.bpf_map_update_batch is not None and not self.is_percpu:
            count = ctypes.c_uint32(len(items))
            err = libbpf.int_error(lb.bpf_map_update_batch(self.fd, keys, values, ctypes.byref(count), None))
            if not err:
                return
            if err not in (22, 95, 524):  # EINVAL/EOPNOTSUPP/ENOTSUPP: no batch support, go one by one
                raise BpfError(f"map {self.name}: batch update failed: {lb.strerror(err)}")
        fd, fn = self.fd, lb.bpf_map_update_elem
        for k, v in items:
            err = libbpf.int_error(fn(fd, k, v, BPF_ANY))
            if err:
                raise BpfError(f"map {self.name}: update failed: {lb.strerror(err)}")

    def lookup(self, key) -> Optional[bytes]:
        k = _as_buffer(key, self.key_size, "key")
        v = ctypes.create_string_buffer(self._value_buf_size())
        ret = lib().bpf_map_lookup_elem(self.fd, ctypes.byref(k), v)
        err = libbpf.int_error(ret)
        if err == 2:  # ENOENT
            return None
        if err:
            raise BpfError(f"map {self.name}: lookup failed: {lib().strerror(err)}")
        return v.raw

    def lookup_percpu(self, key) -> List[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        stride = ((self.value_size + 7) // 8) * 8
        return [raw[i:i + self.value_size] for i in range(0, len(raw), stride)]

    def delete(self, key) -> bool:
        k = _as_buffer(key, self.key_size, "key")
        err = libbpf.int_error(lib().bpf_map_delete_elem(self.fd, ctypes.byref(k)))
        if err == 2:
            return False
        if err:
            raise BpfError(f"map {self.name}: delete failed: {lib().strerror(err)}")
        return True

    def keys(self) -> Iterator[bytes]:
        cur = None
        nxt = ctypes.create_string_buffer(self.key_size)
        while True:
            ret = lib().bpf_map_get_next_key(self.fd, cur, nxt)
            if libbpf.int_error(ret):
                return
            yield nxt.raw
            cur = ctypes.create_string_buffer(nxt.raw, self.key_size)

    def items(self) -> Iterator[Tuple[bytes, bytes]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v


_EAGAIN = 11
_BUDGET_CHECK = 256       # records between looks at the clock


class RingBuffer:
    """A BPF ring buffer consumer. The callback gets each record as bytes.

    libbpf's poll goes on consuming for as long as records keep arriving, so under a sustained
    flood it would never return and the caller's other duties (signals, kill requests, the
    command's exit) would wait. With budget_s, a poll stops after about that much work: the
    callback returns -EAGAIN after a record it has handled (libbpf has already moved the consumer
    past it), and poll() reports what it consumed."""

    def __init__(self, rb_map: Map, callback: Callable[[bytes], None], raw: bool = False,
                 budget_s: Optional[float] = None):
        lb = lib()
        self._errors: List[BaseException] = []
        self._budget_s = budget_s
        self._deadline = 0.0
        self._seen = 0
        self._stopped = False
        self.budget_stops = 0    # polls cut short by the budget

        if raw:
            # For benchmarks: the ceiling of a Python callback that looks at nothing.
            def _cb(_ctx, _data, _size):
                return 0
        else:
            string_at = ctypes.string_at
            monotonic = time.monotonic

            def _cb(_ctx, data, size):
                try:
                    callback(string_at(data, size))
                except BaseException as e:  # never unwind through C; re-raised after poll
                    self._errors.append(e)
                    return -1
                if budget_s is not None:
                    self._seen += 1
                    if self._seen % _BUDGET_CHECK == 0 and monotonic() > self._deadline:
                        self._stopped = True
                        return -_EAGAIN
                return 0

        self._cb = libbpf.RING_BUFFER_SAMPLE_FN(_cb)
        ptr = lb.ring_buffer__new(rb_map.fd, self._cb, None, None)
        err = libbpf.ptr_error(ptr)
        if err:
            raise BpfError(f"ring buffer on {rb_map.name}: {lb.strerror(err)}")
        self._ptr = ptr

    def _check(self, ret: int) -> int:
        if self._stopped:
            self._stopped = False
            self.budget_stops += 1
            return self._seen
        if self._errors:
            e = self._errors[0]
            self._errors.clear()
            raise e
        if ret < 0 and libbpf.int_error(ret) != 4:  # EINTR: a signal arrived, not an error
            raise BpfError(f"ring buffer poll failed: {lib().strerror(libbpf.int_error(ret))}")
        return max(ret, 0)

    def _start(self, budgeted: bool) -> None:
        self._seen, self._stopped = 0, False
        if self._budget_s is not None:
            self._deadline = time.monotonic() + self._budget_s if budgeted else float("inf")

    def poll(self, timeout_ms: int) -> int:
        self._start(True)
        return self._check(lib().ring_buffer__poll(self._ptr, timeout_ms))

    def consume(self) -> int:
        """Everything there is (no budget): the last drain."""
        self._start(False)
        return self._check(lib().ring_buffer__consume(self._ptr))

    def epoll_fd(self) -> int:
        return lib().ring_buffer__epoll_fd(self._ptr)

    def close(self) -> None:
        if self._ptr:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None


class Object:
    """A BPF object file: open, choose programs, size maps, load, attach. A context manager."""

    def __init__(self, path: str):
        lb = lib()
        libbpf.raise_memlock()
        ptr = lb.bpf_object__open_file(str(path).encode(), None)
        err = libbpf.ptr_error(ptr)
        if err:
            raise BpfError(f"cannot open BPF object {path}: {lb.strerror(err)}")
        self._ptr = ptr
        self.path = str(path)
        self.links: List[Link] = []
        self.programs: Dict[str, Program] = {p.name: p for p in self._iter(Program)}
        self.maps: Dict[str, Map] = {m.name: m for m in self._iter(Map)}
        self.loaded = False

    def _iter(self, kind):
        lb = lib()
        if kind is Program:
            nxt = lb.bpf_object__next_program
            step = (lambda prev: nxt(self._ptr, prev)) if nxt else (lambda prev: lb.bpf_program__next(prev, self._ptr))
        else:
            nxt = lb.bpf_object__next_map
            step = (lambda prev: nxt(self._ptr, prev)) if nxt else (lambda prev: lb.bpf_map__next(prev, self._ptr))
        cur = step(None)
        while cur and not libbpf.ptr_error(cur):
            yield kind(self, cur)
            cur = step(cur)

    def __enter__(self) -> "Object":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self) -> None:
        err = libbpf.int_error(lib().bpf_object__load(self._ptr))
        if err:
            raise BpfError(f"loading {self.path} failed: {lib().strerror(err)} "
                           "(--log-level info shows libbpf's log and the verifier's)")
        self.loaded = True

    def attach(self, names=None) -> List[Link]:
        """Attaches the named programs (default: every program that was loaded)."""
        progs = [self.programs[n] for n in names] if names else [p for p in self.programs.values() if p.autoload]
        attached = {link.program.name for link in self.links}
        for p in progs:
            if p.name not in attached:  # attached earlier (an enforcer's decisions): once is enough
                self.links.append(p.attach())
        return self.links

    def close(self) -> None:
        destroy_all(self.links)
        self.links.clear()
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None
