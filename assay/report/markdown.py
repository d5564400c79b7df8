"""GitHub-flavoured Markdown for a job summary: tables, <details> for long lists, a size bound."""
from __future__ import annotations

import html
from typing import Callable, List, Optional, Sequence, Tuple

from assay.report.model import OUTSIDE, Incident, Report, top

DEFAULT_MAX_BYTES = 64 << 10
DETAILS_AT = 10                         # lists longer than this fold into <details>
# (blocked/alerted events, rows of every other list), tried in turn until the text fits: the other
# lists shrink to nothing before the blocked events do
LIMITS = tuple((800, n) for n in (200, 100, 50, 25, 10, 5, 2, 0)) + tuple((n, 0) for n in (200, 50, 10, 2, 0))


def esc(s: object) -> str:
    """Untrusted text (paths, comm, argv) as inline code that cannot break a table or inject HTML."""
    t = html.escape(str(s), quote=True).replace("|", "&#124;").replace("\n", "\\n").replace("\r", "\\r")
    return f"<code>{t}</code>" if t else ""


def _table(head: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    if not rows:
        return []
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _fold(title: str, body: List[str], n: int) -> List[str]:
    if n <= DETAILS_AT:
        return body
    return [f"<details><summary>{title}</summary>", ""] + body + ["", "</details>"]


def _cut(notes: List[str], what: str, left: int) -> List[str]:
    if not left:
        return []
    notes.append(f"{left} {what}")
    return ["", f"_{left} more {what} not shown (cut to fit; `assay report --format json` lists all)_"]


def _chain(i: Incident) -> str:
    return " ← ".join(f"{l.name if l.name == OUTSIDE else esc(l.name)} ({l.pid})" for l in i.chain)


def _incidents(r: Report, n: int, notes: List[str]) -> List[str]:
    if not r.incidents:
        return []
    rows, left = top(r.incidents, n)
    body = _table(["time", "verdict", "rule", "what", "process ← parents"],
                  [[esc(i.ts), i.verdict, esc(i.rule), f"{i.kind} {esc(i.target)}", _chain(i)] for i in rows])
    return ["### Blocked and alerted events", ""] + _fold(f"{len(r.incidents)} events", body, len(rows)) + \
        _cut(notes, "blocked/alerted events", left) + [""]


def _rules(r: Report) -> List[str]:
    if not r.rules:
        return []
    return ["### Verdict by rule", ""] + _table(["rule", "kind", "blocked", "alerted"], [
        [esc(x.rule), x.kind, str(x.blocked), str(x.alerted)] for x in r.rules]) + [""]


def _dests(r: Report, n: int, notes: List[str]) -> List[str]:
    rows, left = top(r.dests, n)
    head = [f"### Network destinations ({len(r.dests)})", ""]
    if not r.dests:
        return head + ["None.", ""]
    if r.kind == "record":   # a run record counts connects per destination, nothing more
        body = _table(["destination", "host name", "connects"], [
            [esc(d.endpoint), esc(d.host) if d.host else "", str(d.attempts)] for d in rows])
    else:
        body = _table(["destination", "host name", "attempts", "failed", "blocked", "processes"], [
            [esc(d.endpoint), esc(d.host) if d.host else "", str(d.attempts), str(d.failed), str(d.blocked),
             ", ".join(esc(c) for c in d.comms)] for d in rows])
    return head + _fold(f"{len(r.dests)} destinations", body, len(rows)) + _cut(notes, "destinations", left) + [""]


def _written(r: Report, n: int, notes: List[str]) -> List[str]:
    if r.kind == "record":
        return []
    where = esc(r.workspace) if r.workspace else "the workspace (none given: `--workspace`)"
    head = [f"### Files written under {where} ({len(r.written)})", ""]
    if not r.written:
        return head + ["None.", ""]
    rows, left = top(r.written, n)
    body = _table(["path", "opens", "processes"], [
        [esc(w.path) + (" (relative)" if w.relative else ""), str(w.opens), ", ".join(esc(c) for c in w.comms)]
        for w in rows])
    rel = ["", "_relative: the path was opened relative to a working directory the log does not record "
               "(a step's default is the workspace)._"] if any(w.relative for w in rows) else []
    return head + _fold(f"{len(r.written)} files", body + rel, len(rows)) + _cut(notes, "written files", left) + [""]


def _dirs(r: Report, n: int, notes: List[str]) -> List[str]:
    files = sum(d.files for d in r.dirs)
    head = [f"### Files opened, by directory ({len(r.dirs)} directories, {files} files)", ""]
    if not r.dirs:
        return head + ["None.", ""]
    rows, left = top(r.dirs, n)
    body = _table(["directory", "opens", "files", "for example"], [
        [esc(d.directory), str(d.opens), str(d.files), ", ".join(esc(e) for e in d.examples)] for d in rows])
    return head + _fold(f"top {len(rows)} directories", body, len(rows)) + _cut(notes, "directories", left) + [""]


def _procs(r: Report, n: int, notes: List[str]) -> List[str]:
    if r.kind == "record":
        rows, left = top(r.execs, n)
        head = [f"### Programs run ({len(r.execs)})", ""]
        body = _table(["program", "runs"], [[esc(p), str(k)] for p, k in rows])
        return head + (_fold(f"{len(r.execs)} programs", body, len(rows)) if rows else ["None."]) + \
            _cut(notes, "programs", left) + [""]
    rows, left = top(r.procs, n * 2)   # a tree line is short
    head = [f"### Processes ({len(r.procs)})", ""]
    if not rows:
        return head + (["None."] if not r.procs else []) + _cut(notes, "processes", left) + [""]
    lines = []
    for p in rows:
        args = " ".join(p.argv[1:])
        ex = f" → exit {p.exit}" if p.exit is not None else ""
        lines.append(html.escape(f"{'  ' * p.depth}{p.name} ({p.pid}) {args}".rstrip() + ex))
    body = ["<pre>"] + lines + ["</pre>"]
    return head + _fold(f"process tree ({len(r.procs)} processes)", body, len(rows)) + \
        _cut(notes, "processes", left) + [""]


def _counts(r: Report) -> List[str]:
    c = r.counts
    out = ["### Events and losses", ""]
    if not c.known:
        out += ["**dropped and lost: unknown** (no summary line: pass the monitor's stderr with "
                "`--monitor-log`, or append its `{\"summary\": …}` line to the log)", ""]
    else:
        lost = ", ".join(f"{k} {v}" for k, v in c.lost) or "0"
        out += _table(["dropped (ring buffer full)", "lost in the kernel", "not written (output)"],
                      [[str(c.dropped), esc(lost) if c.lost else "0", str(c.output_lost)]]) + [""]
        if c.dropped or c.lost or c.output_lost:
            out += ["**Warning:** the log is incomplete: some events never reached it.", ""]
    per = ", ".join(f"{k} {v}" for k, v in c.events) or "none"
    out += [f"{c.total} events: {per}." + (f" {r.failed_opens} failed opens are not listed above."
                                           if r.failed_opens else ""), ""]
    return out


def _header(r: Report) -> List[str]:
    if r.kind == "record":
        title = "## Assay: run record"
    elif r.blocked or r.alerted:
        title = f"## Assay: {r.blocked} blocked, {r.alerted} alerted"
    else:
        title = "## Assay: nothing blocked or alerted"
    c = r.counts
    facts = [f"log {esc(r.source)}"]
    if c.enforcer:
        facts.append(f"enforced via {c.enforcer}")
    elif c.known and r.kind == "events":
        facts.append("no enforcement (monitoring only)")
    if c.duration_s is not None:
        facts.append(f"{c.duration_s:.1f} s")
    return [title, "", "; ".join(facts) + ".", ""]


def _render(r: Report, limits: Tuple[int, int]) -> Tuple[str, List[str]]:
    notes: List[str] = []
    k, n = limits
    parts: List[Callable[[], List[str]]] = [
        lambda: _header(r), lambda: _rules(r), lambda: _incidents(r, k, notes), lambda: _dests(r, n, notes),
        lambda: _written(r, n, notes), lambda: _dirs(r, n, notes), lambda: _procs(r, n, notes),
        lambda: _counts(r)]
    lines: List[str] = []
    for p in parts:
        lines += p()
    return "\n".join(lines).rstrip("\n") + "\n", notes


def render(r: Report, max_bytes: Optional[int] = DEFAULT_MAX_BYTES) -> str:
    """The Markdown, at most max_bytes of UTF-8: lists are shortened until it fits, and say so."""
    if max_bytes is None:
        return _render(r, (1 << 30, 1 << 30))[0]
    text = ""
    for limits in LIMITS:
        text, notes = _render(r, limits)
        if notes:
            text += f"\n_Cut to fit {max_bytes} bytes: {'; '.join(notes)} not shown._\n"
        if len(text.encode()) <= max_bytes:
            return text
    # even without list rows it does not fit (a huge rule table): cut the text itself
    note = f"\n\n_… cut at {max_bytes} bytes; `assay report --format json` has everything._\n"
    room = max(0, max_bytes - len(note.encode()))
    head = text.encode()[:room].decode("utf-8", "ignore")
    return head[:head.rfind("\n") + 1] + note if "\n" in head else head + note
