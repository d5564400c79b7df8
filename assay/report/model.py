"""The report's content, computed from an event log by pure functions: what renderers show."""
from __future__ import annotations

import collections
import os
import posixpath
from typing import Dict, Iterable, List, Optional, Tuple

import attrs

from assay.report.load import EventLog

BLOCKED = ("file_blocked", "exec_blocked", "net_blocked", "tamper_blocked")
ALERTED = ("file_alert", "exec_alert", "net_alert")
WRITE_FLAGS = ("O_WRONLY", "O_RDWR", "O_CREAT", "O_TRUNC", "O_APPEND")
OUTSIDE = "(outside the log)"   # a parent the log never showed (the scope's root, e.g. the runner)
CHAIN_MAX = 16          # ancestors shown per incident (a pid loop in a hand-made log stops here too)
FILES_PER_DIR = 3       # example files named per directory


@attrs.frozen
class Link:
    """One process in a parent chain."""
    pid: int
    name: str                       # the executable's path where an exec was seen, else comm


@attrs.frozen
class Incident:
    """A blocked or alerted event."""
    ts: str
    verdict: str                    # blocked | alerted
    kind: str                       # file | exec | net | tamper
    rule: str
    action: str
    target: str                     # path, address:port, or what was tampered with
    chain: Tuple[Link, ...]         # the process first, then its parent, up to the log's first


@attrs.frozen
class RuleCount:
    rule: str
    kind: str
    blocked: int
    alerted: int


@attrs.frozen
class Proc:
    pid: int
    depth: int                      # in the tree, 0 for a root
    name: str
    argv: Tuple[str, ...]
    exit: Optional[str]             # the exit code, "signal N", or None where no exit was seen


@attrs.frozen
class Dest:
    endpoint: str                   # 1.2.3.4:443 or [::1]:443
    host: Optional[str]             # the host name the policy resolved to this address, if any
    attempts: int
    failed: int                     # connects that returned an error (blocked ones included)
    blocked: int
    comms: Tuple[str, ...]


@attrs.frozen
class DirCount:
    directory: str
    opens: int
    files: int                      # distinct files
    examples: Tuple[str, ...]


@attrs.frozen
class Written:
    path: str
    relative: bool                  # relative to a working directory the log does not show
    opens: int
    comms: Tuple[str, ...]


@attrs.frozen
class Counts:
    events: Tuple[Tuple[str, int], ...]
    total: int
    known: bool                     # a summary line was read (else dropped/lost are unknown)
    dropped: Optional[int] = None
    lost: Tuple[Tuple[str, int], ...] = ()
    output_lost: Optional[int] = None
    enforcer: Optional[str] = None
    duration_s: Optional[float] = None
    exit_status: Optional[int] = None


@attrs.frozen
class Report:
    source: str
    kind: str                       # events | record
    workspace: Optional[str]
    rules: Tuple[RuleCount, ...]
    incidents: Tuple[Incident, ...]
    procs: Tuple[Proc, ...]         # the tree, depth-first
    execs: Tuple[Tuple[str, int], ...]   # executable, times (run records have no tree)
    dests: Tuple[Dest, ...]
    dirs: Tuple[DirCount, ...]
    written: Tuple[Written, ...]
    counts: Counts
    failed_opens: int

    @property
    def blocked(self) -> int:
        return sum(r.blocked for r in self.rules)

    @property
    def alerted(self) -> int:
        return sum(r.alerted for r in self.rules)


def endpoint(family: str, addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if family == "inet6" or ":" in addr else f"{addr}:{port}"


def _target(ev: dict) -> str:
    t = ev["type"]
    if t.startswith("net_"):
        return endpoint(ev["family"], ev["addr"], ev["port"])
    if t == "tamper_blocked":
        what = ev["what"]
        if "signal" in ev and isinstance(ev.get("target_pid"), int):
            return f"{what} {ev['signal']} to pid {ev['target_pid']}"
        obj = ev.get("id", ev.get("target_pid", "?"))
        return f"{what} {obj}"
    return ev["path"]


def _under(path: str, root: Optional[str]) -> bool:
    if not root:
        return False
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


class _Procs:
    """The process table as events stream in: pid -> (ppid, name, argv); the latest pid wins."""

    def __init__(self) -> None:
        self.parent: Dict[int, int] = {}
        self.name: Dict[int, str] = {}
        self.argv: Dict[int, Tuple[str, ...]] = {}
        self.exit: Dict[int, str] = {}
        self.order: List[int] = []      # first appearance
        self.children: Dict[int, List[int]] = collections.defaultdict(list)

    def see(self, ev: dict) -> None:
        pid = ev["pid"]
        if pid not in self.parent:
            self.order.append(pid)
            self.parent[pid] = ev["ppid"]
            self.children[ev["ppid"]].append(pid)
        self.name.setdefault(pid, ev["comm"])
        t = ev["type"]
        if t == "exec":
            self.name[pid] = ev["filename"]
            self.argv[pid] = tuple(ev["argv"])
        elif t == "exit":  # the monitor reports a process once, when its last thread exits
            self.exit[pid] = f"signal {ev['signal']}" if ev["signal"] else str(ev["exit_code"])

    def chain(self, pid: int) -> Tuple[Link, ...]:
        out: List[Link] = []
        seen = set()
        while pid not in seen and len(out) < CHAIN_MAX:
            seen.add(pid)
            if pid not in self.parent:
                out.append(Link(pid, OUTSIDE))
                break
            out.append(Link(pid, self.name[pid]))
            pid = self.parent[pid]
        return tuple(out)

    def tree(self) -> Tuple[Proc, ...]:
        out: List[Proc] = []
        placed = set()
        roots = [p for p in self.order if self.parent[p] not in self.parent]
        # a pid loop (pid reuse in a long log) has no root: start one at its first pid
        for start in roots + self.order:
            if start in placed:
                continue
            stack = [(start, 0)]
            while stack:
                pid, depth = stack.pop()
                if pid in placed:
                    continue
                placed.add(pid)
                out.append(Proc(pid, depth, self.name[pid], self.argv.get(pid, ()), self.exit.get(pid)))
                stack += [(c, depth + 1) for c in reversed(self.children.get(pid, ())) if c not in placed]
        return tuple(out)


def _dir_counts(opens: Dict[str, int]) -> Tuple[DirCount, ...]:
    by_dir: Dict[str, Dict[str, int]] = collections.defaultdict(dict)
    for path, n in opens.items():
        d = posixpath.dirname(path.rstrip("/")) or ("/" if path.startswith("/") else ".")
        by_dir[d][path] = n
    rows = []
    for d, files in by_dir.items():
        top = sorted(files.items(), key=lambda kv: (-kv[1], kv[0]))[:FILES_PER_DIR]
        rows.append(DirCount(d, sum(files.values()), len(files), tuple(p for p, _ in top)))
    return tuple(sorted(rows, key=lambda r: (-r.opens, r.directory)))


def _counts(log: EventLog, per_type: Dict[str, int]) -> Counts:
    s = log.summary
    if s is None:
        return Counts(tuple(sorted(per_type.items())), sum(per_type.values()), known=False)
    events = s.get("events") if isinstance(s.get("events"), dict) else per_type
    lost = s.get("lost") if isinstance(s.get("lost"), dict) else {}
    dur = s.get("duration_s")
    status = s.get("exit_status")
    return Counts(tuple(sorted(events.items())), sum(events.values()), known=True,
                  dropped=s.get("dropped"), lost=tuple(sorted((k, v) for k, v in lost.items() if v)),
                  output_lost=s.get("output_lost"),
                  enforcer=s.get("enforcer") if isinstance(s.get("enforcer"), str) else None,
                  duration_s=float(dur) if isinstance(dur, (int, float)) and not isinstance(dur, bool) else None,
                  exit_status=status if isinstance(status, int) and not isinstance(status, bool) else None)


def _is_write(flags: str) -> bool:
    return any(f in flags.split("|") for f in WRITE_FLAGS)


def build(log: EventLog, workspace: Optional[str] = None) -> Report:
    """The report of an event log (or of a run record, which has no processes or verdicts)."""
    if workspace:
        workspace = os.path.normpath(workspace)
    if log.run is not None:
        return _from_run(log, workspace)
    procs = _Procs()
    per_type: Dict[str, int] = collections.Counter()
    rules: Dict[Tuple[str, str], List[int]] = {}
    incidents: List[Incident] = []
    hosts = dict(log.hosts)
    dest_n: Dict[str, List] = {}
    opens: Dict[str, int] = collections.Counter()
    writes: Dict[Tuple[str, bool], List] = {}
    failed_opens = 0
    for ev in log.events:
        t = ev["type"]
        per_type[t] += 1
        procs.see(ev)
        if t in BLOCKED or t in ALERTED:
            kind = t.split("_")[0]
            verdict = "blocked" if t in BLOCKED else "alerted"
            rule = ev.get("rule") if isinstance(ev.get("rule"), str) else "self-protection"
            action = ev.get("action") if isinstance(ev.get("action"), str) else "deny"
            counts = rules.setdefault((rule, kind), [0, 0])
            counts[0 if verdict == "blocked" else 1] += 1
            incidents.append(Incident(str(ev.get("ts", "")), verdict, kind, rule, action, _target(ev),
                                      procs.chain(ev["pid"])))
            if t.startswith("net_"):
                d = dest_n.setdefault(endpoint(ev["family"], ev["addr"], ev["port"]), [0, 0, 0, set(), ev["addr"]])
                d[2] += verdict == "blocked"
                d[3].add(ev["comm"])
        elif t == "connect":
            d = dest_n.setdefault(endpoint(ev["family"], ev["addr"], ev["port"]), [0, 0, 0, set(), ev["addr"]])
            d[0] += 1
            d[1] += ev["ret"] < 0
            d[3].add(ev["comm"])
        elif t == "open":
            if ev["ret"] < 0:
                failed_opens += 1
                continue
            path = ev["path"]
            opens[path] += 1
            if _is_write(ev["flags"]):
                rel = not path.startswith("/")
                if rel or _under(path, workspace):
                    w = writes.setdefault((path, rel), [0, set()])
                    w[0] += 1
                    w[1].add(ev["comm"])
    dests = tuple(sorted((Dest(e, hosts.get(v[4]), v[0], v[1], v[2], tuple(sorted(v[3])))
                          for e, v in dest_n.items()), key=lambda d: (-(d.attempts + d.blocked), d.endpoint)))
    written = tuple(sorted((Written(p, rel, v[0], tuple(sorted(v[1]))) for (p, rel), v in writes.items()),
                           key=lambda w: (w.relative, w.path)))
    rule_rows = tuple(sorted((RuleCount(r, k, b, a) for (r, k), (b, a) in rules.items()),
                             key=lambda r: (-r.blocked, -r.alerted, r.rule, r.kind)))
    execs = collections.Counter(ev["filename"] for ev in log.events if ev["type"] == "exec")
    return Report(log.path, "events", workspace, rule_rows, tuple(incidents), procs.tree(),
                  tuple(sorted(execs.items(), key=lambda kv: (-kv[1], kv[0]))), dests,
                  _dir_counts(opens), written, _counts(log, per_type), failed_opens)


def _from_run(log: EventLog, workspace: Optional[str]) -> Report:
    items = log.run.items
    hosts = dict(log.hosts)
    opens = {i.value: i.hits for i in items if i.kind == "file_open"}
    execs = tuple(sorted(((i.value, i.hits) for i in items if i.kind == "proc_exec"), key=lambda kv: (-kv[1], kv[0])))
    dests = []
    for i in items:
        if i.kind == "net_connect":
            addr = i.value[1:].split("]")[0] if i.value.startswith("[") else i.value.rsplit(":", 1)[0]
            dests.append(Dest(i.value, hosts.get(addr), i.hits, 0, 0, ()))
    per_kind = collections.Counter()
    for i in items:
        per_kind[i.kind] += i.hits
    return Report(log.path, "record", workspace, (), (), (), execs,
                  tuple(sorted(dests, key=lambda d: (-d.attempts, d.endpoint))), _dir_counts(opens), (),
                  _counts(log, dict(per_kind)), 0)


def as_dict(r: Report) -> dict:
    """The JSON rendering: every list in full (no size bound)."""
    d = attrs.asdict(r, recurse=True)
    d["blocked"], d["alerted"] = r.blocked, r.alerted
    d["counts"]["events"] = dict(r.counts.events)
    d["counts"]["lost"] = dict(r.counts.lost)
    d["execs"] = [{"path": p, "times": n} for p, n in r.execs]
    return d


def top(items: Iterable, n: int) -> Tuple[list, int]:
    """The first n items and how many were left out."""
    items = list(items)
    return items[:n], max(0, len(items) - n)
