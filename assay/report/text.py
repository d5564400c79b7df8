"""Plain text for a terminal or a CI log: the same sections as the Markdown, as indented lines."""
from __future__ import annotations

from typing import List

from assay.report.model import Report, top

DEFAULT_LIMIT = 20      # rows per list; the JSON form has everything


def _more(left: int, what: str) -> List[str]:
    return [f"  ... and {left} more {what}"] if left else []


def render(r: Report, limit: int = DEFAULT_LIMIT) -> str:
    c = r.counts
    out: List[str] = []
    if r.kind == "record":
        out.append(f"assay report: {r.source}: run record")
    else:
        out.append(f"assay report: {r.source}: {r.blocked} blocked, {r.alerted} alerted"
                   + (f" (enforced via {c.enforcer})" if c.enforcer else ""))
    if r.rules:
        out.append("verdict by rule:")
        out += [f"  {x.rule} ({x.kind}): blocked {x.blocked}, alerted {x.alerted}" for x in r.rules]
    if r.incidents:
        rows, left = top(r.incidents, limit * 4)
        out.append("blocked and alerted events:")
        for i in rows:
            chain = " <- ".join(f"{l.name}[{l.pid}]" for l in i.chain)
            out.append(f"  {i.ts} {i.verdict.upper()} {i.kind} {i.target} rule={i.rule} action={i.action}")
            out.append(f"      by {chain}")
        out += _more(left, "events")
    rows, left = top(r.dests, limit)
    out.append(f"network destinations ({len(r.dests)}):")
    for d in rows:
        host = f" ({d.host})" if d.host else ""
        blocked = f", blocked {d.blocked}" if d.blocked else ""
        out.append(f"  {d.endpoint}{host}: attempts {d.attempts}, failed {d.failed}{blocked}"
                   + (f" by {', '.join(d.comms)}" if d.comms else ""))
    out += _more(left, "destinations")
    if r.kind == "events":
        rows, left = top(r.written, limit)
        out.append(f"files written under {r.workspace or '(no --workspace)'} ({len(r.written)}):")
        out += [f"  {w.path}{' (relative)' if w.relative else ''}: {w.opens} opens by {', '.join(w.comms)}"
                for w in rows]
        out += _more(left, "files")
    rows, left = top(r.dirs, limit)
    out.append(f"files opened, by directory ({len(r.dirs)}):")
    out += [f"  {d.directory}: {d.opens} opens of {d.files} files (e.g. {', '.join(d.examples)})" for d in rows]
    out += _more(left, "directories")
    if r.kind == "record":
        rows, left = top(r.execs, limit)
        out.append(f"programs run ({len(r.execs)}):")
        out += [f"  {p}: {n}" for p, n in rows] + _more(left, "programs")
    else:
        rows, left = top(r.procs, limit * 2)
        out.append(f"processes ({len(r.procs)}):")
        for p in rows:
            ex = f" -> exit {p.exit}" if p.exit is not None else ""
            out.append(f"  {'  ' * p.depth}{p.name}[{p.pid}] {' '.join(p.argv[1:])}".rstrip() + ex)
        out += _more(left, "processes")
    per = ", ".join(f"{k}={v}" for k, v in c.events) or "none"
    if c.known:
        lost = ", ".join(f"{k}={v}" for k, v in c.lost) or "0"
        out.append(f"events: {c.total} ({per}); dropped={c.dropped}; lost={lost}; output_lost={c.output_lost}")
    else:
        out.append(f"events: {c.total} ({per}); dropped and lost: unknown (no summary line)")
    return "\n".join(out) + "\n"
