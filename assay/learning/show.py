"""`assay profile show`: each entry's runs seen out of total runs and its Wilson score, as text, json or yaml."""
from __future__ import annotations

import io
import json
from typing import List

from assay.errors import UsageError
from assay.learning.gate import score
from assay.learning.profile import Profile, _yaml


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
