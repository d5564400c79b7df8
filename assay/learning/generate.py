"""Generate: gate every profile entry and write a policy for `assay monitor --policy`.

The loop is record (RunRecorder) -> profile_update (merge) -> generate (Wilson gate) -> monitor --policy.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import attrs

from assay.errors import AssayError, UsageError
from assay.learning.constants import BUCKETS, CLASSES, FILE_OPEN, MODES, NET_CONNECT, PATH_CLASSES, PROC_EXEC
from assay.learning.gate import Decision, gate, runs_needed, score
from assay.learning.profile import Profile


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
