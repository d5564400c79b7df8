"""Reading an event log (`--output`), a run record (`--record`) and the monitor's stderr, strictly."""
from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

import attrs

from assay.errors import AssayError, InputError
from assay.learning.run import Run, parse_run

# Per event type: the fields the report reads, and their JSON types (int never means bool).
_STR, _INT, _LIST = "string", "integer", "list of strings"
_COMMON = {"pid": _INT, "ppid": _INT, "comm": _STR}
_RULE = {"rule": _STR, "action": _STR}
FIELDS: Dict[str, Dict[str, str]] = {
    "exec": {"filename": _STR, "argv": _LIST},
    "exit": {"exit_code": _INT, "signal": _INT},
    "fork": {"child_pid": _INT},
    "open": {"path": _STR, "flags": _STR, "ret": _INT},
    "connect": {"family": _STR, "addr": _STR, "port": _INT, "ret": _INT},
    "file_blocked": {**_RULE, "path": _STR}, "exec_blocked": {**_RULE, "path": _STR},
    "file_alert": {**_RULE, "path": _STR}, "exec_alert": {**_RULE, "path": _STR},
    "net_blocked": {**_RULE, "family": _STR, "addr": _STR, "port": _INT},
    "net_alert": {**_RULE, "family": _STR, "addr": _STR, "port": _INT},
    "tamper_blocked": {"what": _STR},
    "process_killed": {"signal": _STR},
}
# The monitor's `assay: note: HOST resolved to A, B` lines (policy host names).
_RESOLVED = re.compile(r"^assay: note: (\S+) resolved to (.+)$")


@attrs.frozen
class EventLog:
    """What a file held: events (dicts, as the monitor wrote them) or a run record, and the
    monitor's summary and the host names it resolved, where known."""
    path: str
    events: Tuple[dict, ...] = ()
    run: Optional[Run] = None
    summary: Optional[dict] = None
    hosts: Tuple[Tuple[str, str], ...] = ()    # (address, host name)


def _type_ok(value: Any, kind: str) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    return isinstance(value, list) and all(isinstance(a, str) for a in value)


def check_event(ev: dict) -> Optional[str]:
    """Why ev is not an event the report can read, or None. Unknown types pass (newer monitors)."""
    want = {**_COMMON, **FIELDS.get(ev["type"], {})}
    for field, kind in want.items():
        if field not in ev:
            return f"{ev['type']} event without field {field!r}"
        if not _type_ok(ev[field], kind):
            return f"{ev['type']} event: field {field!r} must be a {kind}"
    return None


def _check_summary(rec: dict) -> Optional[str]:
    s = rec["summary"]
    if not isinstance(s, dict):
        return "field 'summary' must be an object"
    for field in ("dropped", "total", "output_lost"):
        if field in s and not _type_ok(s[field], _INT):
            return f"summary: field {field!r} must be an integer"
    for field in ("events", "lost"):
        if field in s and not (isinstance(s[field], dict) and all(_type_ok(v, _INT) for v in s[field].values())):
            return f"summary: field {field!r} must be an object of integers"
    return None


def _lines(data: bytes, path: str):
    """(line number, parsed JSON object) for each non-blank line; InputError on the first bad one."""
    lines = data.split(b"\n")
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        last = lineno == len(lines)    # no newline after it: the writer may have been cut off
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(path, lineno, e.start + 1, "not valid UTF-8") from None
        try:
            rec = json.loads(text)
        except (ValueError, RecursionError) as e:   # RecursionError: nesting too deep
            col = getattr(e, "colno", 1)
            why = getattr(e, "msg", str(e))
            cut = " (the last line has no newline: was the file cut off?)" if last else ""
            raise InputError(path, lineno, col, f"not valid JSON: {why}{cut}") from None
        if not isinstance(rec, dict):
            raise InputError(path, lineno, 1, "expected a JSON object (one event per line)")
        yield lineno, rec


def parse_events(data: bytes, path: str = "<events>") -> EventLog:
    """Parses an event log, or a run record when its first line is a run header."""
    first = data.lstrip()[:40]
    if first.startswith(b'{"type":"header"'):
        return EventLog(path, run=parse_run(data, path))
    events: List[dict] = []
    summary = None
    for lineno, rec in _lines(data, path):
        if "summary" in rec and "type" not in rec:
            why = _check_summary(rec)
            if why:
                raise InputError(path, lineno, 1, why)
            summary = rec["summary"]
            continue
        if not isinstance(rec.get("type"), str):
            raise InputError(path, lineno, 1, 'expected an event: a JSON object with a string "type"')
        if rec["type"] == "header":
            raise InputError(path, lineno, 1, "a run header may only be the first line")
        why = check_event(rec)
        if why:
            raise InputError(path, lineno, 1, why)
        events.append(rec)
    return EventLog(path, events=tuple(events), summary=summary)


def parse_monitor_log(data: bytes, path: str = "<monitor log>") -> Tuple[Optional[dict], Tuple[Tuple[str, str], ...]]:
    """The monitor's stderr: its last `{"summary": ...}` line, and the policy's resolved host names.
    Other lines are messages for people and are skipped; a broken summary line is an error."""
    summary = None
    hosts: List[Tuple[str, str]] = []
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        text = raw.decode("utf-8", "replace").strip()
        m = _RESOLVED.match(text)
        if m:
            hosts += [(a.strip(), m.group(1)) for a in m.group(2).split(",") if a.strip()]
        if not text.startswith('{"summary"'):
            continue
        try:
            rec = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InputError(path, lineno, getattr(e, "colno", 1), f"summary line is not valid JSON: "
                                                                   f"{getattr(e, 'msg', e)}") from None
        why = _check_summary(rec) if isinstance(rec, dict) and "summary" in rec else "expected {\"summary\": {...}}"
        if why:
            raise InputError(path, lineno, 1, why)
        summary = rec["summary"]
    return summary, tuple(hosts)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise AssayError(f"cannot read {what} {path}: {e.strerror}") from None


def load(path: str, monitor_log: Optional[str] = None) -> EventLog:
    log = parse_events(_read(path, "event log"), path)
    if monitor_log:
        summary, hosts = parse_monitor_log(_read(monitor_log, "monitor log"), monitor_log)
        log = attrs.evolve(log, summary=summary or log.summary, hosts=log.hosts + hosts)
    return log
