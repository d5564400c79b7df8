"""The profile: merge runs into per-entry stability counts; read, write, init and update profile files."""
from __future__ import annotations

import contextlib
import datetime
import io
import os
from typing import Dict, Optional, Tuple

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError

from assay.errors import AssayError, InputError
from assay.learning.atomic import atomic_write, file_lock
from assay.learning.constants import CLASSES, PROFILE_FORMAT, Key
from assay.learning.generalisation import generalise
from assay.learning.run import Run, read_run
from assay.learning.times import _fmt_time, _parse_time, canonical_time


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
