"""Learning mode: record runs, merge them into a stability profile, and generate an enforceable policy.

The loop is record (RunRecorder) -> profile_update (merge) -> generate (Wilson gate) -> monitor --policy.
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import io
import ipaddress
import json
import math
import os
import re
import secrets
import tempfile
import threading
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from assay import __version__
from assay.errors import AssayError, InputError, UsageError

FILE_OPEN, NET_CONNECT, PROC_EXEC = "file_open", "net_connect", "proc_exec"
CLASSES = (FILE_OPEN, PROC_EXEC, NET_CONNECT)          # also the order of the generated rules
PATH_CLASSES = (FILE_OPEN, PROC_EXEC)
PROFILE_FORMAT = "assay-profile/1"
AT_FDCWD = -100
BUCKETS = ("allow", "needs_review", "deny", "skipped")
MODES = ("audit", "enforce")

Key = Tuple[str, str]


# ---------------------------------------------------------------------------------------------- time

def _parse_time(text: str) -> datetime.datetime:
    """ISO 8601 -> aware UTC datetime. Accepts a trailing Z (fromisoformat only does from 3.11)."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected an ISO 8601 timestamp string")
    s = text.strip()
    if s[-1:] in ("Z", "z"):
        s = s[:-1] + "+00:00"
    dt = datetime.datetime.fromisoformat(s)
    if dt.tzinfo is None:       # naive times are taken as UTC rather than the local zone of the reader
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.astimezone(datetime.timezone.utc)


def _fmt_time(dt: datetime.datetime) -> str:
    spec = "microseconds" if dt.microsecond else "seconds"
    return dt.astimezone(datetime.timezone.utc).isoformat(timespec=spec).replace("+00:00", "Z")


def canonical_time(text: str) -> str:
    """One spelling per instant, so equal times compare equal as strings too."""
    return _fmt_time(_parse_time(text))


def now_utc() -> str:
    return _fmt_time(datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))


# ------------------------------------------------------------------------------------- fingerprint

def digest_text(text: "str | bytes") -> str:
    """sha256 of a policy file's bytes, the form `fingerprint` expects as policy_digest."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return "sha256:" + hashlib.sha256(data).hexdigest()


def fingerprint(policy_digest: Optional[str], scope: Mapping, event_classes: Iterable[str]) -> str:
    """Config fingerprint: sha256 of canonical JSON of what shapes the observations.

    scope should hold the stable scope *options* (e.g. {"mode": "command", "follow_children": true}),
    not per-run values such as PIDs, or every run gets a different fingerprint.
    """
    doc = {"v": 1, "policy_digest": policy_digest, "scope": dict(scope),
           "event_classes": sorted(set(event_classes))}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return "sha256:" + hashlib.sha256(blob.encode("ascii")).hexdigest()


# ------------------------------------------------------------------------------------ run records

@attrs.frozen
class RunHeader:
    run_id: str
    started: str            # canonical UTC ISO 8601
    assay_version: str
    fingerprint: str


@attrs.frozen(order=True)
class RunItem:
    kind: str               # file_open | net_connect | proc_exec
    value: str              # absolute path, or "ip:port" / "[v6]:port"; a relative path when relative
    hits: int = attrs.field(default=1, order=False)
    relative: bool = attrs.field(default=False, order=False)

    @property
    def key(self) -> Key:
        return (self.kind, self.value)


@attrs.frozen
class Run:
    header: RunHeader
    items: Tuple[RunItem, ...]      # one per (kind, value), sorted


def normalise_path(path: str) -> str:
    """Absolute path, lexically normalised; POSIX keeps a leading '//' that we do not want."""
    p = os.path.normpath(path)
    if p.startswith("//"):
        p = "/" + p.lstrip("/")
    return p


def normalise_dest(dest: str) -> str:
    """'1.2.3.4:443' or '[v6]:443' in canonical spelling; ValueError if it is neither."""
    if not isinstance(dest, str):
        raise ValueError("field 'dest' must be a string")
    v6 = dest.startswith("[")
    host, sep, port = dest[1:].partition("]:") if v6 else dest.rpartition(":")
    try:
        if not sep:
            raise ValueError("no port")
        addr = ipaddress.IPv6Address(host) if v6 else ipaddress.IPv4Address(host)
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            raise ValueError(f"bad port {port!r}")
    except ValueError as e:
        raise ValueError(f"bad dest {dest!r} ({e}): expected IPV4:PORT or [IPV6]:PORT") from None
    return format_dest(str(addr), int(port))


def format_dest(addr: str, port: int) -> str:
    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped      # an AF_INET6 socket reaching an IPv4 peer: the kernel matches it as IPv4
    return f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _item_line(item: RunItem) -> dict:
    field = "dest" if item.kind == NET_CONNECT else "path"
    d = {"type": item.kind, field: item.value, "hits": item.hits}
    if item.relative:
        d["relative"] = True
    return d


def dump_run(run: Run) -> str:
    """The JSON-lines text of a run: header first, then one line per item."""
    h = run.header
    lines = [{"type": "header", "run_id": h.run_id, "started": h.started, "assay_version": h.assay_version,
              "fingerprint": h.fingerprint}]
    lines += [_item_line(i) for i in sorted(run.items)]
    # ensure_ascii keeps surrogate-escaped bytes of odd paths representable in the UTF-8 file
    return "".join(json.dumps(d, ensure_ascii=True, separators=(",", ":")) + "\n" for d in lines)


def _req_str(rec: dict, field: str) -> str:
    v = rec.get(field)
    if not isinstance(v, str) or not v:
        raise ValueError(f"field {field!r} must be a non-empty string")
    return v


def _parse_header(rec: dict) -> RunHeader:
    try:
        started = canonical_time(_req_str(rec, "started"))
    except ValueError as e:
        raise ValueError(f"field 'started': {e}") from None
    return RunHeader(run_id=_req_str(rec, "run_id"), started=started,
                     assay_version=str(rec.get("assay_version", "")), fingerprint=_req_str(rec, "fingerprint"))


def _parse_item(rec: dict) -> RunItem:
    kind = rec["type"]
    hits = rec.get("hits", 1)
    if isinstance(hits, bool) or not isinstance(hits, int) or hits < 1:
        raise ValueError("field 'hits' must be a positive integer")
    if kind == NET_CONNECT:
        return RunItem(kind, normalise_dest(_req_str(rec, "dest")), hits)
    path = _req_str(rec, "path")
    if "\0" in path:
        raise ValueError("field 'path' contains a NUL byte")
    relative = rec.get("relative", False)
    if not isinstance(relative, bool):
        raise ValueError("field 'relative' must be true or false")
    if relative:
        if path.startswith("/"):
            raise ValueError("a path marked relative must not start with '/'")
        return RunItem(kind, path, hits, True)
    if not path.startswith("/"):
        raise ValueError("field 'path' must be absolute (or the record marked \"relative\": true)")
    return RunItem(kind, normalise_path(path), hits)


def parse_run(data: "bytes | str", path: str = "<run>") -> Run:
    """Parse a run file. Any bad line raises InputError(path, line, col) and nothing is returned."""
    raw = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data
    header: Optional[RunHeader] = None
    hits: Dict[Key, RunItem] = {}
    for lineno, bline in enumerate(raw.split(b"\n"), 1):
        if not bline.strip():
            continue
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(path, lineno, e.start + 1, "not valid UTF-8") from None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(path, lineno, e.colno, f"not valid JSON: {e.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("type"), str):
            raise InputError(path, lineno, 1, 'expected a JSON object with a string "type"')
        kind = rec["type"]
        try:
            if kind == "header":
                if header is not None or hits:
                    raise ValueError("the header must be the first line, and only once")
                header = _parse_header(rec)
                continue
            if header is None:
                raise ValueError('the first line must be the header ({"type":"header","run_id":...})')
            if kind not in CLASSES:
                raise ValueError(f"unknown type {kind!r}; expected header, {', '.join(CLASSES)}")
            item = _parse_item(rec)
        except ValueError as e:
            raise InputError(path, lineno, 1, str(e)) from None
        old = hits.get(item.key)
        hits[item.key] = item if old is None else attrs.evolve(old, hits=old.hits + item.hits)
    if header is None:
        raise InputError(path, 1, 1, "empty run file: expected a header line")
    return Run(header, tuple(sorted(hits.values())))


def read_run(path: str) -> Run:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise AssayError(f"cannot read run file {path}: {e.strerror}") from None
    return parse_run(data, path)


def new_run_id(started: str) -> str:
    """Sortable and unique enough: start time plus 32 random bits."""
    return _parse_time(started).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


# ------------------------------------------------------------------------------------ atomic I/O

def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive flock on PATH.lock. The lock file is left in place: unlinking it would race."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)        # closing drops the lock


# -------------------------------------------------------------------------------------- recorder

def _proc_cwd(pid: int) -> Optional[str]:
    return _proc_link(f"/proc/{pid}/cwd")


def _proc_fd_path(pid: int, fd: int) -> Optional[str]:
    return _proc_link(f"/proc/{pid}/fd/{fd}")


def _proc_link(link: str) -> Optional[str]:
    try:
        target = os.readlink(link)
    except OSError:
        return None
    # A gone or unreachable directory reads back decorated or not absolute: unknown, not guessed.
    if not target.startswith("/") or target.endswith(" (deleted)"):
        return None
    return target


class RunRecorder:
    """Collects decoded monitor events into one run record; dedups and counts, writes atomically.

    Events are the decoder's dicts: open (path, ret, pid, dfd), connect (family, addr, port), exec (filename).
    Failed opens are not recorded: they never reach the LSM file_open hook, so a policy need not allow them.
    Connects are recorded whatever their result: the LSM connect hook runs before the result is known.
    """

    def __init__(self, path: str, fingerprint: str, *, run_id: Optional[str] = None,
                 started: Optional[str] = None, assay_version: str = __version__,
                 cwd_of: Callable[[int], Optional[str]] = _proc_cwd,
                 fd_path_of: Callable[[int, int], Optional[str]] = _proc_fd_path):
        self.path = path
        started = canonical_time(started) if started else now_utc()
        self.header = RunHeader(run_id or new_run_id(started), started, assay_version, fingerprint)
        self._cwd_of, self._fd_path_of = cwd_of, fd_path_of
        self._hits: Dict[Tuple[str, str, bool], int] = {}
        self._lock = threading.Lock()

    @property
    def run_id(self) -> str:
        return self.header.run_id

    def _resolve(self, path: str, pid: Optional[int], dfd: int = AT_FDCWD) -> Tuple[str, bool]:
        if path.startswith("/"):
            return normalise_path(path), False
        base = None
        if pid is not None:
            base = self._cwd_of(pid) if dfd == AT_FDCWD else self._fd_path_of(pid, dfd)
        if base is None:
            return path, True
        return normalise_path(os.path.join(base, path)), False

    def feed(self, ev: Mapping) -> Optional[RunItem]:
        """Count one event; returns the item it counted as, or None if it is not learned."""
        t = ev.get("type")
        if t == "open":
            path, ret = ev.get("path"), ev.get("ret", 0)
            if not path or (isinstance(ret, int) and ret < 0):
                return None
            dfd = ev.get("dfd", AT_FDCWD)
            value, rel = self._resolve(_text(path), ev.get("pid"), AT_FDCWD if dfd is None else dfd)
            return self._count(FILE_OPEN, value, rel)
        if t == "exec":
            path = ev.get("filename")
            if not path:
                return None
            value, rel = self._resolve(_text(path), ev.get("pid"))
            return self._count(PROC_EXEC, value, rel)
        if t == "connect":
            if ev.get("family") not in ("inet", "inet6") or ev.get("addr") is None:
                return None
            try:
                value = format_dest(str(ev["addr"]), int(ev.get("port", 0)))
            except ValueError:
                return None
            return self._count(NET_CONNECT, value, False)
        return None

    def _count(self, kind: str, value: str, relative: bool) -> RunItem:
        key = (kind, value, relative)
        with self._lock:
            self._hits[key] = n = self._hits.get(key, 0) + 1
        return RunItem(kind, value, n, relative)

    def run(self) -> Run:
        with self._lock:
            items = [RunItem(k, v, n, r) for (k, v, r), n in self._hits.items()]
        return Run(self.header, tuple(sorted(items)))

    def write(self) -> Run:
        run = self.run()
        atomic_write(self.path, dump_run(run).encode("ascii"))
        return run


def _text(s: "str | bytes") -> str:
    return s.decode("utf-8", "surrogateescape") if isinstance(s, bytes) else s


# --------------------------------------------------------------------------------- generalisation

_PROC_PID = re.compile(r"^/proc/(?:\d+|self|thread-self)(?:/|$)")
_PTS = re.compile(r"^/dev/pts/\d+$")
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def generalise(kind: str, value: str) -> str:
    """Map a recorded value to the profile key it is learned under (see docs/learning.md).

    Only what differs from run to run by construction is collapsed, and only to forms the policy
    schema can express (an exact path or a /dir/** subtree):
      /proc/<pid>/..., /proc/self/..., /proc/thread-self/...  -> /proc/**
      /dev/pts/<n>                                            -> /dev/pts/**
      anything below /tmp, /var/tmp, /dev/shm                 -> /tmp/** (etc.): files created by the
                                                                 workload are new inodes every run
    """
    if kind not in PATH_CLASSES or not value.startswith("/"):
        return value
    if _PROC_PID.match(value):
        return "/proc/**"
    if _PTS.match(value):
        return "/dev/pts/**"
    for d in SCRATCH_DIRS:
        if value.startswith(d + "/"):
            return d + "/**"
    return value


def is_relative(kind: str, value: str) -> bool:
    return kind in PATH_CLASSES and not value.startswith("/")


# ---------------------------------------------------------------------------------------- profile

@attrs.frozen(order=True)
class RunInfo:
    started: str
    run_id: str
    fingerprint: Optional[str] = attrs.field(default=None, order=False)  # set only when merged with --force

    def sort_key(self) -> tuple:
        return (_parse_time(self.started), self.run_id)


@attrs.frozen
class Entry:
    kind: str
    value: str
    runs_seen: int
    hits_total: int
    first_seen: str
    last_seen: str

    @property
    def key(self) -> Key:
        return (self.kind, self.value)


@attrs.frozen
class Profile:
    name: str
    fingerprint: Optional[str] = None
    runs: Tuple[RunInfo, ...] = ()          # sorted by (start time, run id): merge order does not show
    entries: Tuple[Entry, ...] = ()         # sorted by (kind, value)

    @property
    def total_runs(self) -> int:
        return len(self.runs)

    @property
    def run_ids(self) -> Tuple[str, ...]:
        return tuple(r.run_id for r in self.runs)


@attrs.frozen
class MergeOutcome:
    profile: Profile
    merged: bool
    run_id: str
    new_entries: int = 0
    items: int = 0


class FingerprintMismatch(AssayError):
    def __init__(self, run_id: str, run_fp: str, profile_fp: str, where: str = "the profile"):
        self.run_fingerprint, self.profile_fingerprint = run_fp, profile_fp
        super().__init__(
            f"scope guard: run {run_id} was recorded with a different monitor configuration than {where}\n"
            f"  profile fingerprint: {profile_fp}\n"
            f"  run fingerprint:     {run_fp}\n"
            "policy, scope options or event classes differ; re-record, or pass --force to merge anyway")


def merge_run(profile: Profile, run: Run, run_id: Optional[str] = None, force: bool = False) -> MergeOutcome:
    """Pure merge of one run. Order-independent: counts add, first_seen = min, last_seen = max of the
    runs' start times. A run id already present is a no-op (merged=False)."""
    rid = run_id or run.header.run_id
    if rid in profile.run_ids:
        return MergeOutcome(profile, False, rid)
    fp = run.header.fingerprint
    prof_fp = profile.fingerprint
    forced_fp = None
    if prof_fp is None:
        prof_fp = fp                    # the first update sets the scope
    elif fp != prof_fp:
        if not force:
            raise FingerprintMismatch(rid, fp, prof_fp)
        forced_fp = fp
    started = run.header.started
    t = _parse_time(started)
    # Generalise first, then dedup within the run, so runs_seen counts runs, not members of a collapse.
    seen: Dict[Key, int] = {}
    for it in run.items:
        k = (it.kind, generalise(it.kind, it.value))
        seen[k] = seen.get(k, 0) + it.hits
    entries = {e.key: e for e in profile.entries}
    new = 0
    for k, hits in seen.items():
        e = entries.get(k)
        if e is None:
            entries[k] = Entry(k[0], k[1], 1, hits, started, started)
            new += 1
        else:
            entries[k] = attrs.evolve(
                e, runs_seen=e.runs_seen + 1, hits_total=e.hits_total + hits,
                first_seen=started if t < _parse_time(e.first_seen) else e.first_seen,
                last_seen=started if t > _parse_time(e.last_seen) else e.last_seen)
    runs = sorted(profile.runs + (RunInfo(started, rid, forced_fp),), key=RunInfo.sort_key)
    out = Profile(profile.name, prof_fp, tuple(runs), tuple(sorted(entries.values(), key=lambda e: e.key)))
    return MergeOutcome(out, True, rid, new, len(seen))


def profile_to_dict(p: Profile) -> dict:
    runs = []
    for r in p.runs:
        d = {"id": r.run_id, "started": r.started}
        if r.fingerprint is not None:
            d["fingerprint"] = r.fingerprint
        runs.append(d)
    return {
        "format": PROFILE_FORMAT, "name": p.name, "fingerprint": p.fingerprint, "total_runs": p.total_runs,
        "runs": runs,
        "entries": [{"type": e.kind, "value": e.value, "runs_seen": e.runs_seen, "hits_total": e.hits_total,
                     "first_seen": e.first_seen, "last_seen": e.last_seen} for e in p.entries],
    }


def _yaml() -> YAML:
    y = YAML()
    y.default_flow_style = False
    y.width = 4096
    y.representer.add_representer(
        type(None), lambda r, _d: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def dump_profile(p: Profile) -> str:
    buf = io.StringIO()
    buf.write("# Assay learning profile. Written by `assay profile update`; see docs/learning.md.\n")
    _yaml().dump(profile_to_dict(p), buf)
    return buf.getvalue()


def _where(node, key, fallback: Tuple[int, int] = (1, 1)) -> Tuple[int, int]:
    """1-based line/col of key in a ruamel round-trip node, when it knows."""
    with contextlib.suppress(Exception):
        if isinstance(key, int):
            ln, col = node.lc.item(key)
        else:
            ln, col = node.lc.key(key)
        return ln + 1, col + 1
    return fallback


def _as_time(v) -> str:
    if isinstance(v, datetime.datetime):   # a hand edit that dropped the quotes
        return _fmt_time(v if v.tzinfo else v.replace(tzinfo=datetime.timezone.utc))
    return canonical_time(v)


def parse_profile(text: str, path: str = "<profile>") -> Profile:
    try:
        doc = YAML().load(text)
    except MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise InputError(path, line, col, f"not valid YAML: {e.problem or e}") from None
    if not isinstance(doc, dict):
        raise InputError(path, 1, 1, "expected a mapping (an Assay learning profile)")

    def bad(node, key, msg):
        line, col = _where(node, key)
        return InputError(path, line, col, msg)

    if doc.get("format") != PROFILE_FORMAT:
        raise bad(doc, "format", f"format must be {PROFILE_FORMAT!r}")
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise bad(doc, "name", "name must be a non-empty string")
    fp = doc.get("fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise bad(doc, "fingerprint", "fingerprint must be a string or null")
    runs, entries = [], []
    for i, r in enumerate(doc.get("runs") or []):
        try:
            runs.append(RunInfo(_as_time(r["started"]), str(r["id"]), r.get("fingerprint")))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise bad(doc["runs"], i, f"bad run record: {e}") from None
    for i, e in enumerate(doc.get("entries") or []):
        try:
            kind, value = e["type"], e["value"]
            if kind not in CLASSES or not isinstance(value, str):
                raise ValueError(f"type must be one of {', '.join(CLASSES)} and value a string")
            rs, ht = e["runs_seen"], e["hits_total"]
            if not (isinstance(rs, int) and isinstance(ht, int) and 1 <= rs <= len(runs) and ht >= rs):
                raise ValueError("runs_seen must be 1..total_runs and hits_total >= runs_seen")
            entries.append(Entry(kind, value, rs, ht, _as_time(e["first_seen"]), _as_time(e["last_seen"])))
        except (KeyError, TypeError, ValueError, AttributeError) as ex:
            raise bad(doc["entries"], i, f"bad entry: {ex}") from None
    if doc.get("total_runs", len(runs)) != len(runs):
        raise bad(doc, "total_runs", f"total_runs is {doc.get('total_runs')} but {len(runs)} runs are listed")
    if len({r.run_id for r in runs}) != len(runs):
        raise bad(doc, "runs", "a run id is listed twice")
    return Profile(name, fp, tuple(sorted(runs, key=RunInfo.sort_key)),
                   tuple(sorted(entries, key=lambda e: e.key)))


def load_profile(path: str) -> Profile:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise AssayError(f"no profile at {path}; create one with `assay profile init --profile {path}`") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise AssayError(f"cannot read profile {path}: {e}") from None
    return parse_profile(text, path)


def write_profile(path: str, profile: Profile) -> None:
    atomic_write(path, dump_profile(profile).encode("utf-8"))


def profile_init(path: str, name: Optional[str] = None) -> Profile:
    """Create an empty profile; refuses (AssayError, exit 1) if PATH exists."""
    if not name:
        name = os.path.splitext(os.path.basename(path))[0] or "assay-profile"
    prof = Profile(name)
    try:
        with file_lock(path):
            if os.path.lexists(path):
                raise AssayError(f"{path} already exists; refusing to overwrite it (remove it first)")
            write_profile(path, prof)
    except OSError as e:
        raise AssayError(f"cannot create profile {path}: {e.strerror or e}") from None
    return prof


@attrs.frozen
class UpdateResult:
    status: str             # merged | skipped
    run_id: str
    message: str
    profile: Profile


def profile_update(path: str, input: str, run_id: Optional[str] = None, force: bool = False,
                   strict: bool = False) -> UpdateResult:
    """Merge one run file into the profile at PATH, under an exclusive lock, written atomically.

    A run id already merged: skipped (status "skipped"), or AssayError with strict.
    A different fingerprint: FingerprintMismatch unless force. A bad line: InputError, nothing merged.
    """
    run = read_run(input)               # parse fully before touching the profile
    try:
        with file_lock(path):
            prof = load_profile(path)
            out = merge_run(prof, run, run_id, force)
            if out.merged:
                write_profile(path, out.profile)
    except OSError as e:
        raise AssayError(f"cannot update profile {path}: {e.strerror or e}") from None
    p = out.profile
    if not out.merged:
        msg = f"run {out.run_id} is already merged into {path}; skipped"
        if strict:
            raise AssayError(msg + " (--strict)")
        return UpdateResult("skipped", out.run_id, msg, p)
    forced = " (fingerprint differs, merged with --force)" if run.header.fingerprint != p.fingerprint else ""
    msg = (f"merged run {out.run_id} into {path}: {out.items} items, {out.new_entries} new; "
           f"total runs {p.total_runs}{forced}")
    return UpdateResult("merged", out.run_id, msg, p)


# ----------------------------------------------------------------------------------------- Wilson

def wilson_lower_bound(k: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval for k successes in n trials (0 when n is 0)."""
    if n <= 0:
        return 0.0
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


def score(k: int, n: int, z: float = 1.96) -> float:
    """The gated score: the Wilson bound rounded to 2 places, the number `profile show` prints.
    Gating on the shown number keeps 9/10 (0.5958 -> 0.60) at a 0.6 threshold, as in the worked values."""
    return round(wilson_lower_bound(k, n, z), 2)


def runs_needed(min_stability: float, z: float = 1.96, limit: int = 100000) -> Optional[int]:
    """Fewest runs after which an item seen in every run is allowed (k = n scores n / (n + z^2))."""
    if min_stability >= 1:
        return None
    # n / (n + z^2) >= s  <=>  n >= s z^2 / (1 - s); start just below and let score()'s rounding decide
    n = max(1, int(min_stability * z * z / (1 - min_stability)) - 2)
    while n <= limit:
        if score(n, n, z) >= min_stability:
            return n
        n += 1
    return None


# --------------------------------------------------------------------------------------- generate

@attrs.frozen
class Decision:
    kind: str
    value: str
    bucket: str             # allow | needs_review | deny | skipped
    score: float
    runs_seen: int
    total_runs: int
    reason: str


@attrs.frozen
class GenerateReport:
    name: str
    mode: str
    total_runs: int
    decisions: Tuple[Decision, ...]
    warnings: Tuple[str, ...] = ()

    def bucket(self, name: str) -> Tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.bucket == name)

    def counts(self) -> Dict[str, int]:
        return {b: len(self.bucket(b)) for b in BUCKETS}

    def text(self) -> str:
        c = self.counts()
        lines = [f"profile {self.name}: {self.total_runs} runs, {len(self.decisions)} entries; mode {self.mode}",
                 "  " + "  ".join(f"{b} {c[b]}" for b in BUCKETS)]
        for b in ("needs_review", "deny", "skipped"):
            for d in self.bucket(b):
                lines.append(f"  {b:<12} {d.runs_seen}/{d.total_runs} {d.score:.2f}  {d.kind} {d.value}"
                             f"  ({d.reason})")
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def gate(entry: Entry, total_runs: int, min_stability: float = 0.7, review_threshold: float = 0.6,
         min_runs: int = 1, new_is_risky: bool = False, z: float = 1.96) -> Decision:
    s = score(entry.runs_seen, total_runs, z)

    def d(bucket: str, reason: str) -> Decision:
        return Decision(entry.kind, entry.value, bucket, s, entry.runs_seen, total_runs, reason)

    if total_runs < min_runs:
        if new_is_risky:
            return d("needs_review", f"only {total_runs} runs < min-runs {min_runs} (--new-is-risky)")
        return d("skipped", f"only {total_runs} runs < min-runs {min_runs}")
    if is_relative(entry.kind, entry.value):
        return d("needs_review", "relative path: the working directory was unknown when recorded")
    why = unexpressible(entry.kind, entry.value)
    if why:
        return d("needs_review", f"cannot be written as a policy glob: {why}")
    if s >= min_stability:
        return d("allow", f"wilson {s:.2f} >= {min_stability}")
    if s >= review_threshold:
        return d("needs_review", f"{review_threshold} <= wilson {s:.2f} < {min_stability}")
    return d("deny", f"wilson {s:.2f} < {review_threshold}")


def unexpressible(kind: str, value: str) -> Optional[str]:
    """Why the policy loader would refuse VALUE as an allowed item (e.g. a file name with '*'), or None."""
    from assay.policy import parse_dest, parse_path_glob   # the loader is the one judge of its grammar

    try:
        if kind == NET_CONNECT:
            parse_dest(value)
        else:
            parse_path_glob(value)
    except ValueError as e:
        return str(e)
    return None


def _yq(s: str) -> str:
    """A YAML double-quoted scalar; anything unprintable (and surrogate-escaped bytes) is escaped."""
    out = ['"']
    for ch in s:
        c = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= c < 0x7F or (c > 0xA0 and ch.isprintable() and not 0xD800 <= c < 0xE000
                                  and c not in (0x2028, 0x2029, 0xFEFF)):
            out.append(ch)
        elif c < 0x100:
            out.append(f"\\x{c:02x}")
        elif c < 0x10000:
            out.append(f"\\u{c:04x}")
        else:
            out.append(f"\\U{c:08x}")
    out.append('"')
    return "".join(out)


_RULES = {  # class -> (rule id, match field, "everything" globs); "/**" is below "/", not "/" itself
    FILE_OPEN: ("learned-file-open", "path_globs", ["/", "/**"]),
    PROC_EXEC: ("learned-proc-exec", "path_globs", ["/", "/**"]),
    NET_CONNECT: ("learned-net-connect", "dest_globs", ["0.0.0.0/0", "::/0"]),
}


def _rule_text(kind: str, allowed: List[str], mode: str) -> List[str]:
    rid, field, everything = _RULES[kind]
    lines = [f"    - id: {rid}",
             f"      type: {kind}",
             "      match:",
             f"        {field}: [{', '.join(_yq(g) for g in everything)}]"]
    if allowed:
        lines += ["        not:", f"          {field}:"]
        lines += [f"            - {_yq(v)}" for v in allowed]
    lines += ["      severity: high", f"      action: {'deny' if mode == 'enforce' else 'alert'}"]
    if kind in PATH_CLASSES:
        lines.append("      allow_missing: true      # a learned file may be gone when the policy loads")
    return lines


def generate(profile: Profile, min_stability: float = 0.7, review_threshold: float = 0.6, min_runs: int = 1,
             new_is_risky: bool = False, z: float = 1.96, mode: str = "audit") -> Tuple[str, GenerateReport]:
    """Gate every entry and write a policy for `assay monitor --policy`: per learned class one rule that
    alerts on (audit) or denies (enforce) everything of that class except the allowed set."""
    if mode not in MODES:
        raise UsageError(f"--mode must be audit or enforce, not {mode!r}")
    if not 0 <= review_threshold <= min_stability <= 1:
        raise UsageError("need 0 <= --review-threshold <= --min-stability <= 1")
    if not z > 0 or min_runs < 0:
        raise UsageError("--wilson-z must be > 0 and --min-runs >= 0")
    if not profile.entries:
        raise AssayError(f"profile {profile.name} has no entries (total runs {profile.total_runs}); "
                         "merge recorded runs with `assay profile update` first")
    n = profile.total_runs
    decisions = tuple(gate(e, n, min_stability, review_threshold, min_runs, new_is_risky, z)
                      for e in profile.entries)
    warnings = []
    if n < min_runs:
        warnings.append(f"the profile has {n} runs, fewer than --min-runs {min_runs}: nothing is allowed, "
                        "so the rules below match every event of their class")
    classes = [k for k in CLASSES if any(d.kind == k for d in decisions)]
    for k in classes:
        if not any(d.kind == k and d.bucket == "allow" for d in decisions):
            warnings.append(f"no {k} entry is stable: rule {_RULES[k][0]} matches every {k} event")
    need = runs_needed(min_stability, z)
    if n >= min_runs and need is not None and n < need:
        warnings.append(f"an item seen in all {n} runs scores {score(n, n, z):.2f}; reaching {min_stability} at "
                        f"z={z} takes {need} runs ({need}/{need} scores {score(need, need, z):.2f}): record more "
                        "runs, or lower --min-stability")
    report = GenerateReport(profile.name, mode, n, decisions, tuple(warnings))

    out = [f"# Generated by `assay generate` from profile {_yq(profile.name)}: {n} runs,",
           f"# fingerprint {profile.fingerprint}.",
           f"# Gate: Wilson lower bound (z={z}) >= {min_stability} is allowed; >= {review_threshold} needs review;"
           f" min-runs {min_runs}{', new-is-risky' if new_is_risky else ''}.",
           f"# Mode {mode}: everything of a learned class outside its `not:` list is "
           f"{'denied' if mode == 'enforce' else 'alerted on'}.",
           'version: "2.0"',
           f"name: {_yq(profile.name + '-learned')}",
           "runtime_monitor:",
           "  enabled: true"]
    out.append("  rules:")
    for k in classes:
        allowed = [d.value for d in decisions if d.kind == k and d.bucket == "allow"]
        out += _rule_text(k, allowed, mode)
    for title, b in (("needs_review: not allowed; to allow one, move it into its rule's `not:` list", "needs_review"),
                     ("deny: below the review threshold, so not allowed", "deny"),
                     ("skipped: too few runs (--min-runs), so not allowed", "skipped")):
        ds = report.bucket(b)
        if ds:
            out.append(f"# {title}")
            out += [f"#   {d.kind:<11} {_yq(d.value)}  runs {d.runs_seen}/{d.total_runs}  wilson {d.score:.2f}"
                    for d in ds]
    out += [f"# warning: {w}" for w in warnings]
    return "\n".join(out) + "\n", report


# ------------------------------------------------------------------------------------------- show

def profile_rows(profile: Profile, z: float = 1.96) -> List[dict]:
    n = profile.total_runs
    return [{"type": e.kind, "value": e.value, "runs_seen": e.runs_seen, "total_runs": n,
             "hits_total": e.hits_total, "wilson": score(e.runs_seen, n, z),
             "first_seen": e.first_seen, "last_seen": e.last_seen} for e in profile.entries]


def show_profile(profile: Profile, fmt: str = "text", z: float = 1.96) -> str:
    """Each entry's runs seen out of total runs and its Wilson lower bound, as text, json or yaml."""
    rows = profile_rows(profile, z)
    if fmt in ("json", "yaml"):
        doc = {"name": profile.name, "fingerprint": profile.fingerprint, "total_runs": profile.total_runs,
               "run_ids": list(profile.run_ids), "wilson_z": z, "entries": rows}
        if fmt == "json":
            return json.dumps(doc, indent=2) + "\n"
        buf = io.StringIO()
        _yaml().dump(doc, buf)
        return buf.getvalue()
    if fmt != "text":
        raise UsageError(f"--format must be text, json or yaml, not {fmt!r}")
    lines = [f"profile {profile.name}: {profile.total_runs} runs, fingerprint {profile.fingerprint}",
             f"{'RUNS':>9}  {'WILSON':>6}  {'HITS':>6}  {'TYPE':<11}  VALUE"]
    w = max([len(str(profile.total_runs))] + [1])
    for r in rows:
        seen = f"{r['runs_seen']:>{w}}/{r['total_runs']:<{w}}"
        lines.append(f"{seen:>9}  {r['wilson']:>6.2f}  {r['hits_total']:>6}  {r['type']:<11}  {r['value']}")
    return "\n".join(lines) + "\n"
