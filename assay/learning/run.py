"""Run records: the config fingerprint, and the JSON-lines run file (dump, parse, read)."""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
from typing import Dict, Iterable, Mapping, Optional, Tuple

import attrs

from assay.errors import AssayError, InputError
from assay.learning.constants import CLASSES, NET_CONNECT, Key
from assay.learning.times import _parse_time, canonical_time


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
    if sep and not v6 and not host.replace(".", "").isdigit():
        return _name_dest(dest, host, port)
    try:
        if not sep:
            raise ValueError("no port")
        addr = ipaddress.IPv6Address(host) if v6 else ipaddress.IPv4Address(host)
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535):
            raise ValueError(f"bad port {port!r}")
    except ValueError as e:
        raise ValueError(f"bad dest {dest!r} ({e}): expected IPV4:PORT, [IPV6]:PORT or NAME:PORT") from None
    return format_dest(str(addr), int(port))


def _name_dest(dest: str, host: str, port: str) -> str:
    """NAME:PORT: a destination a name led to (the DNS proxy), kept as the name."""
    from assay.policy import parse_dest   # the loader is the one judge of its grammar

    try:
        net, lo, hi, name = parse_dest(dest)
    except ValueError as e:
        raise ValueError(f"bad dest {dest!r} ({e})") from None
    if name is None or name.startswith("*") or lo != hi:
        raise ValueError(f"bad dest {dest!r}: expected IPV4:PORT, [IPV6]:PORT or NAME:PORT")
    return format_name_dest(name, lo)


def format_name_dest(name: str, port: int) -> str:
    name = name.lower()
    return f"{name[:-1] if name.endswith('.') else name}:{port}"


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
