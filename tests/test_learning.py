"""Learning mode: record format, profile merge (idempotent, order-free, locked), Wilson gate, generate."""
from __future__ import annotations

import itertools
import json
import multiprocessing
import os

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assay import learning as L
from assay.errors import AssayError, InputError

FP = L.fingerprint("sha256:" + "0" * 64, {"mode": "command"}, ["open", "connect", "exec"])
OTHER_FP = L.fingerprint(None, {"mode": "all"}, ["open"])


def make_run(run_id, started, items, fp=FP):
    its = {}
    for kind, value, *hits in items:
        it = L.RunItem(kind, value, hits[0] if hits else 1)
        its[it.key] = it
    return L.Run(L.RunHeader(run_id, L.canonical_time(started), "test", fp), tuple(sorted(its.values())))


def write_run(tmp_path, run, name=None):
    p = tmp_path / (name or f"{run.header.run_id}.jsonl")
    p.write_text(L.dump_run(run))
    return str(p)


def profile_of(counts, total):
    """A profile with `total` runs where entry value v was seen in counts[v] of them."""
    runs = tuple(L.RunInfo(f"2025-01-01T00:00:{i:02d}Z", f"r{i:02d}") for i in range(total))
    entries = tuple(L.Entry(kind, v, n, n, "2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z")
                    for (kind, v), n in sorted(counts.items()))
    return L.Profile("t", FP, runs, entries)


# ------------------------------------------------------------------------------------------ Wilson

@pytest.mark.parametrize("k,n,expected", [(1, 1, 0.21), (9, 10, 0.60), (10, 10, 0.72), (16, 16, 0.81)])
def test_wilson_worked_values(k, n, expected):
    assert round(L.wilson_lower_bound(k, n, 1.96), 2) == expected
    assert L.score(k, n) == expected


def test_wilson_edges():
    assert L.wilson_lower_bound(0, 0) == 0.0
    assert L.wilson_lower_bound(0, 5) == 0.0
    # seen in every run: the bound is n / (n + z^2), so 9 clean runs are needed for 0.7 at z = 1.96
    for n in range(1, 30):
        assert L.wilson_lower_bound(n, n) == pytest.approx(n / (n + 1.96 ** 2))
    assert L.score(8, 8) < 0.7 <= L.score(9, 9)
    assert L.wilson_lower_bound(9, 10, z=1.0) > L.wilson_lower_bound(9, 10, z=1.96)


# ------------------------------------------------------------------------------------ gating table

GATING = [
    # case,            seen, total, min_runs, bucket without --new-is-risky, bucket with
    ("stable",          10,   10,    1,        "allow",        "allow"),
    ("borderline",       9,   10,    1,        "needs_review", "needs_review"),
    ("unstable",         5,   10,    1,        "deny",         "deny"),
    ("new",              1,   10,    1,        "deny",         "deny"),
    ("below-min-runs",   3,    3,    5,        "skipped",      "needs_review"),
]


@pytest.mark.parametrize("case,seen,total,min_runs,plain,risky", GATING, ids=[g[0] for g in GATING])
@pytest.mark.parametrize("new_is_risky", [False, True])
def test_gating_table(case, seen, total, min_runs, plain, risky, new_is_risky):
    e = L.Entry(L.FILE_OPEN, "/x", seen, seen, "2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z")
    d = L.gate(e, total, min_runs=min_runs, new_is_risky=new_is_risky)
    assert d.bucket == (risky if new_is_risky else plain)
    assert (d.runs_seen, d.total_runs) == (seen, total)


@pytest.mark.parametrize("new_is_risky", [False, True])
def test_gating_table_in_generated_policy(new_is_risky):
    prof = profile_of({(L.FILE_OPEN, "/stable"): 10, (L.FILE_OPEN, "/borderline"): 9,
                       (L.FILE_OPEN, "/unstable"): 5, (L.FILE_OPEN, "/new"): 1}, 10)
    text, rep = L.generate(prof, new_is_risky=new_is_risky, mode="enforce")
    assert {d.value: d.bucket for d in rep.decisions} == {
        "/stable": "allow", "/borderline": "needs_review", "/unstable": "deny", "/new": "deny"}
    policy_part, _, comments = text.partition("# needs_review")
    assert '"/stable"' in policy_part and "/borderline" not in policy_part
    assert '"/borderline"  runs 9/10  wilson 0.60' in comments


def test_below_min_runs_allows_nothing():
    prof = profile_of({(L.FILE_OPEN, "/a"): 3}, 3)
    text, rep = L.generate(prof, min_runs=5)
    assert rep.counts()["skipped"] == 1 and "\n        not:" not in text
    assert any("min-runs" in w for w in rep.warnings)
    _, rep = L.generate(prof, min_runs=5, new_is_risky=True)
    assert rep.counts()["needs_review"] == 1


def test_generate_rejects_bad_parameters():
    prof = profile_of({(L.FILE_OPEN, "/a"): 1}, 1)
    for kw in ({"mode": "block"}, {"review_threshold": 0.8, "min_stability": 0.7}, {"z": 0}):
        with pytest.raises(AssayError):
            L.generate(prof, **kw)
    with pytest.raises(AssayError, match="no entries"):
        L.generate(L.Profile("empty"))


# ----------------------------------------------------------------------------- generated policy

def _learned_profile():
    items = [(L.FILE_OPEN, "/etc/hosts", 3), (L.FILE_OPEN, "/"), (L.FILE_OPEN, "/usr/lib/libc.so.6"),
             (L.PROC_EXEC, "/usr/bin/python3"), (L.NET_CONNECT, "10.0.0.1:443"),
             (L.NET_CONNECT, "[2001:db8::1]:53"), (L.FILE_OPEN, "/odd[1].txt"), (L.FILE_OPEN, "rel/x")]
    prof = L.Profile("ci-job")
    for i in range(10):
        extra = [(L.FILE_OPEN, f"/only-run-{i}")] if i < 2 else []
        prof = L.merge_run(prof, make_run(f"r{i}", f"2025-01-01T00:{i:02d}:00Z", items + extra)).profile
    return prof


@pytest.mark.parametrize("mode,action", [("audit", "alert"), ("enforce", "deny")])
def test_generated_policy_loads_in_the_monitor_schema(mode, action):
    policy = pytest.importorskip("assay.policy")
    text, rep = L.generate(_learned_profile(), mode=mode)
    pol = policy.parse_policy(text, "generated.yaml")
    rules = {r.id: r for r in pol.rules}
    assert set(rules) == {"learned-file-open", "learned-proc-exec", "learned-net-connect"}
    assert {r.action for r in pol.rules} == {action}
    fo = rules["learned-file-open"]
    assert {str(p) for p in fo.paths} == {"/", "/**"}
    assert {str(p) for p in fo.not_paths} == {"/", "/etc/hosts", "/usr/lib/libc.so.6"}
    assert {str(p) for p in rules["learned-proc-exec"].not_paths} == {"/usr/bin/python3"}
    net = rules["learned-net-connect"]
    assert {str(d) for d in net.dests} == {"0.0.0.0/0", "::/0"}
    assert {str(d) for d in net.not_dests} == {"10.0.0.1:443", "[2001:db8::1]:53"}
    # what the loader could not take, and what was not stable, is left to a human, as comments
    review = {d.value: d.reason for d in rep.bucket("needs_review")}
    assert set(review) == {"/odd[1].txt", "rel/x"}
    assert {d.value for d in rep.bucket("deny")} == {"/only-run-0", "/only-run-1"}
    assert '#   file_open   "/odd[1].txt"' in text


def test_generated_policy_round_trips_through_dump_policy():
    policy = pytest.importorskip("assay.policy")
    text, _ = L.generate(_learned_profile(), mode="enforce")
    pol = policy.parse_policy(text, "a.yaml")
    assert policy.parse_policy(policy.dump_policy(pol), "b.yaml") == pol


def test_generated_policy_quotes_hostile_names():
    policy = pytest.importorskip("assay.policy")
    odd = '/srv/a "quoted" #not-a-comment\\ é\u2028'
    prof = profile_of({(L.FILE_OPEN, odd): 10, (L.FILE_OPEN, "/srv/\udcff"): 10}, 10)
    pol = policy.parse_policy(L.generate(prof)[0], "g.yaml")
    assert {p.path for p in pol.rules[0].not_paths} == {odd, "/srv/\udcff"}


# ----------------------------------------------------------------------------- generalisation

@pytest.mark.parametrize("kind,value,expected", [
    (L.FILE_OPEN, "/proc/1234/status", "/proc/**"),
    (L.FILE_OPEN, "/proc/self/fd/3", "/proc/**"),
    (L.FILE_OPEN, "/proc/thread-self/attr/current", "/proc/**"),
    (L.FILE_OPEN, "/proc/meminfo", "/proc/meminfo"),
    (L.FILE_OPEN, "/dev/pts/7", "/dev/pts/**"),
    (L.FILE_OPEN, "/dev/ptmx", "/dev/ptmx"),
    (L.FILE_OPEN, "/tmp/tmpk2j_x9/out.txt", "/tmp/**"),
    (L.FILE_OPEN, "/tmp", "/tmp"),
    (L.FILE_OPEN, "/tmpfoo", "/tmpfoo"),
    (L.FILE_OPEN, "/var/tmp/x", "/var/tmp/**"),
    (L.FILE_OPEN, "/dev/shm/sem.x", "/dev/shm/**"),
    (L.PROC_EXEC, "/proc/self/exe", "/proc/**"),
    (L.FILE_OPEN, "rel/tmp/x", "rel/tmp/x"),
    (L.NET_CONNECT, "1.2.3.4:443", "1.2.3.4:443"),
])
def test_generalise(kind, value, expected):
    assert L.generalise(kind, value) == expected


def test_generalised_entries_count_runs_not_members():
    prof = L.Profile("p")
    for i in range(3):
        run = make_run(f"r{i}", f"2025-01-01T00:00:0{i}Z",
                       [(L.FILE_OPEN, f"/proc/{100 + i}/status"), (L.FILE_OPEN, f"/proc/{200 + i}/stat", 2)])
        prof = L.merge_run(prof, run).profile
    (e,) = prof.entries
    assert (e.value, e.runs_seen, e.hits_total) == ("/proc/**", 3, 9)


# ---------------------------------------------------------------------------------- fingerprint

def test_fingerprint_is_canonical():
    a = L.fingerprint("sha256:ab", {"x": 1, "y": [1, 2]}, ["open", "exec"])
    b = L.fingerprint("sha256:ab", {"y": [1, 2], "x": 1}, ["exec", "open", "open"])
    assert a == b and a.startswith("sha256:") and len(a) == 7 + 64
    assert a != L.fingerprint("sha256:ac", {"x": 1, "y": [1, 2]}, ["open", "exec"])
    assert a != L.fingerprint("sha256:ab", {"x": 2, "y": [1, 2]}, ["open", "exec"])
    assert a != L.fingerprint("sha256:ab", {"x": 1, "y": [1, 2]}, ["open"])
    assert a != L.fingerprint(None, {"x": 1, "y": [1, 2]}, ["open", "exec"])
    assert L.digest_text("abc") == L.digest_text(b"abc")


# ------------------------------------------------------------------------------------ recording

def test_recorder_dedups_counts_and_resolves(tmp_path):
    cwds = {10: "/work/src"}
    fds = {(10, 5): "/etc"}
    out = tmp_path / "run.jsonl"
    rec = L.RunRecorder(str(out), FP, run_id="run-1", started="2025-03-01T12:00:00+02:00",
                        cwd_of=cwds.get, fd_path_of=lambda pid, fd: fds.get((pid, fd)))
    events = [
        {"type": "open", "path": "/etc/hosts", "ret": 3, "pid": 10, "dfd": -100},
        {"type": "open", "path": "/etc/../etc//hosts", "ret": 4, "pid": 10, "dfd": -100},
        {"type": "open", "path": "//etc/passwd", "ret": 4, "pid": 10, "dfd": -100},
        {"type": "open", "path": "/missing", "ret": -2, "pid": 10, "dfd": -100},
        {"type": "open", "path": "data/../conf.ini", "ret": 3, "pid": 10, "dfd": -100},
        {"type": "open", "path": "group", "ret": 3, "pid": 10, "dfd": 5},
        {"type": "open", "path": "who-knows", "ret": 3, "pid": 99, "dfd": -100},
        {"type": "connect", "family": "inet", "addr": "10.0.0.1", "port": 443, "ret": -115},
        {"type": "connect", "family": "inet6", "addr": "2001:db8:0::1", "port": 53, "ret": 0},
        {"type": "connect", "family": "inet6", "addr": "::ffff:10.0.0.1", "port": 443, "ret": 0},
        {"type": "connect", "family": "unix", "addr": None, "port": 0, "ret": 0},
        {"type": "exec", "filename": "/usr/bin/env", "pid": 10},
        {"type": "exec", "filename": "./build.sh", "pid": 10},
        {"type": "fork", "pid": 10, "child_pid": 11},
    ]
    for ev in events:
        rec.feed(ev)
    run = rec.write()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"type": "header", "run_id": "run-1", "started": "2025-03-01T10:00:00Z",
                        "assay_version": L.__version__, "fingerprint": FP}
    assert lines[1:] == [
        {"type": "file_open", "path": "/etc/group", "hits": 1},
        {"type": "file_open", "path": "/etc/hosts", "hits": 2},
        {"type": "file_open", "path": "/etc/passwd", "hits": 1},
        {"type": "file_open", "path": "/work/src/conf.ini", "hits": 1},
        {"type": "file_open", "path": "who-knows", "hits": 1, "relative": True},
        {"type": "net_connect", "dest": "10.0.0.1:443", "hits": 2},
        {"type": "net_connect", "dest": "[2001:db8::1]:53", "hits": 1},
        {"type": "proc_exec", "path": "/usr/bin/env", "hits": 1},
        {"type": "proc_exec", "path": "/work/src/build.sh", "hits": 1},
    ]
    assert L.read_run(str(out)) == run
    assert os.listdir(tmp_path) == ["run.jsonl"]       # no temp file left behind


def test_recorder_default_cwd_reader_uses_proc(tmp_path):
    rec = L.RunRecorder(str(tmp_path / "r.jsonl"), FP)
    rec.feed({"type": "open", "path": "x.txt", "ret": 3, "pid": os.getpid(), "dfd": -100})
    rec.feed({"type": "open", "path": "y.txt", "ret": 3, "pid": 2 ** 22 + 12345, "dfd": -100})
    got = {(i.value, i.relative) for i in rec.run().items}
    assert got == {(os.path.join(os.getcwd(), "x.txt"), False), ("y.txt", True)}
    assert rec.run_id and L.canonical_time(rec.header.started) == rec.header.started


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(L.CLASSES), st.integers(0, 5), st.integers(1, 9)), max_size=12),
       st.text(min_size=1, max_size=8))
def test_dump_and_parse_run_round_trip(items, rid):
    vals = {L.FILE_OPEN: "/f/{}", L.PROC_EXEC: "/bin/p{}", L.NET_CONNECT: "10.0.0.{}:80"}
    run = make_run(rid, "2025-01-01T00:00:00Z", [(k, vals[k].format(v), h) for k, v, h in items])
    assert L.parse_run(L.dump_run(run)) == run


BAD_LINES = [
    ('{"type":"file_open","path":"/a","hits":1', 3, "not valid JSON"),
    ('{"type":"file_open","path":"a/b"}', 3, "absolute"),
    ('{"type":"file_open","path":"/a","hits":0}', 3, "hits"),
    ('{"type":"file_open","path":"/a","hits":true}', 3, "hits"),
    ('{"type":"net_connect","dest":"*.example.com:443"}', 3, "dest"),
    ('{"type":"net_connect","dest":"[::1]"}', 3, "dest"),
    ('{"type":"file_opened","path":"/a"}', 3, "unknown type"),
    ('["file_open"]', 3, "JSON object"),
    ('{"type":"header","run_id":"x","started":"2025-01-01T00:00:00Z","fingerprint":"f"}', 3, "first line"),
]


@pytest.mark.parametrize("bad,line,msg", BAD_LINES)
def test_malformed_line_names_the_line_and_merges_nothing(tmp_path, bad, line, msg):
    prof_path = str(tmp_path / "p.yaml")
    L.profile_init(prof_path, "p")
    L.profile_update(prof_path, write_run(tmp_path, make_run("good", "2025-01-01T00:00:00Z",
                                                              [(L.FILE_OPEN, "/a")])))
    before = open(prof_path, "rb").read()
    good = L.dump_run(make_run("bad-run", "2025-01-02T00:00:00Z", [(L.FILE_OPEN, "/b"), (L.FILE_OPEN, "/c")]))
    lines = good.splitlines()
    text = "\n".join(lines[:2] + [bad] + lines[2:]) + "\n"
    run_path = tmp_path / "bad.jsonl"
    run_path.write_text(text)
    with pytest.raises(InputError, match=msg) as ei:
        L.profile_update(prof_path, str(run_path))
    assert (ei.value.path, ei.value.line) == (str(run_path), line)
    assert ei.value.exit_code == 1 and str(ei.value).startswith(f"{run_path}:{line}:")
    assert open(prof_path, "rb").read() == before


@pytest.mark.parametrize("text,line", [("", 1), ('{"type":"file_open","path":"/a"}\n', 1),
                                       ('{"type":"header","run_id":"x","started":"yesterday",'
                                        '"fingerprint":"f"}\n', 1),
                                       ('{"type":"header","run_id":"x","started":"2025-01-01",'
                                        '"fingerprint":"f"}\n\n\xff\n', 3)])
def test_bad_header_or_encoding(text, line):
    data = text.encode("latin-1")
    with pytest.raises(InputError) as ei:
        L.parse_run(data, "r.jsonl")
    assert ei.value.line == line


def test_lenient_input_forms():
    text = ('\n{"type":"header","run_id":"x","started":"2025-01-01T00:00:00","fingerprint":"f","extra":1}\n'
            '{"type":"file_open","path":"/a/./b","timestamp":123}\n'
            '{"type":"file_open","path":"/a/b","hits":2}\n'
            '{"type":"net_connect","dest":"[::ffff:10.0.0.1]:80"}\n')
    run = L.parse_run(text)
    assert run.header.started == "2025-01-01T00:00:00Z"
    assert [(i.value, i.hits) for i in run.items] == [("/a/b", 3), ("10.0.0.1:80", 1)]


# -------------------------------------------------------------------------------------- profile

def test_init_refuses_to_overwrite(tmp_path):
    p = str(tmp_path / "assay-profile.yaml")
    prof = L.profile_init(p)
    assert prof.name == "assay-profile" and L.load_profile(p) == prof
    before = open(p, "rb").read()
    with pytest.raises(AssayError, match="already exists") as ei:
        L.profile_init(p, "other")
    assert ei.value.exit_code == 1 and open(p, "rb").read() == before


def test_update_needs_an_existing_profile(tmp_path):
    run = write_run(tmp_path, make_run("r", "2025-01-01T00:00:00Z", [(L.FILE_OPEN, "/a")]))
    with pytest.raises(AssayError, match="profile init"):
        L.profile_update(str(tmp_path / "nope.yaml"), run)


def test_update_is_idempotent_and_strict_fails(tmp_path):
    p = str(tmp_path / "p.yaml")
    L.profile_init(p, "p")
    run = write_run(tmp_path, make_run("r1", "2025-01-01T00:00:00Z", [(L.FILE_OPEN, "/a", 2)]))
    res = L.profile_update(p, run)
    assert res.status == "merged" and res.profile.total_runs == 1
    before = open(p, "rb").read()
    res = L.profile_update(p, run)
    assert res.status == "skipped" and "already merged" in res.message
    with pytest.raises(AssayError, match="already merged") as ei:
        L.profile_update(p, run, strict=True)
    assert ei.value.exit_code == 1
    assert open(p, "rb").read() == before
    # --run-id names the run instead of its header: a different id is a different run
    res = L.profile_update(p, run, run_id="r1-again")
    assert res.profile.run_ids == ("r1", "r1-again") and res.profile.entries[0].runs_seen == 2


def test_scope_guard(tmp_path):
    p = str(tmp_path / "p.yaml")
    L.profile_init(p, "p")
    assert L.load_profile(p).fingerprint is None
    L.profile_update(p, write_run(tmp_path, make_run("r1", "2025-01-01T00:00:00Z", [(L.FILE_OPEN, "/a")])))
    assert L.load_profile(p).fingerprint == FP
    other = write_run(tmp_path, make_run("r2", "2025-01-02T00:00:00Z", [(L.FILE_OPEN, "/b")], fp=OTHER_FP))
    before = open(p, "rb").read()
    with pytest.raises(L.FingerprintMismatch) as ei:
        L.profile_update(p, other)
    assert FP in str(ei.value) and OTHER_FP in str(ei.value) and "--force" in str(ei.value)
    assert ei.value.exit_code == 1 and open(p, "rb").read() == before
    res = L.profile_update(p, other, force=True)
    assert res.status == "merged" and "--force" in res.message
    prof = L.load_profile(p)
    assert prof.fingerprint == FP and prof.total_runs == 2
    assert [r.fingerprint for r in prof.runs] == [None, OTHER_FP]     # the forced run is marked


def test_seen_times_come_from_the_run_headers(tmp_path):
    prof = L.Profile("p")
    for rid, t in (("b", "2024-06-01T00:00:00Z"), ("a", "2024-01-01T00:00:00Z"), ("c", "2024-03-01T00:00:00Z")):
        prof = L.merge_run(prof, make_run(rid, t, [(L.FILE_OPEN, "/a")])).profile
    (e,) = prof.entries
    assert (e.first_seen, e.last_seen) == ("2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z")
    assert prof.run_ids == ("a", "c", "b")      # in start order, whatever the merge order


def test_profile_file_round_trip_and_errors(tmp_path):
    prof = _learned_profile()
    assert L.parse_profile(L.dump_profile(prof)) == prof
    text = L.dump_profile(prof).replace("runs_seen: 10", "runs_seen: 11", 1)
    with pytest.raises(InputError, match="runs_seen") as ei:
        L.parse_profile(text, "p.yaml")
    assert ei.value.line > 1
    with pytest.raises(InputError, match="YAML"):
        L.parse_profile("name: [unclosed\n", "p.yaml")
    with pytest.raises(InputError, match="format"):
        L.parse_profile("name: x\n", "p.yaml")


def test_show_formats():
    prof = profile_of({(L.FILE_OPEN, "/a"): 9, (L.NET_CONNECT, "10.0.0.1:443"): 10}, 10)
    text = L.show_profile(prof)
    assert "9/10    0.60" in text and "10/10    0.72" in text and "10.0.0.1:443" in text
    doc = json.loads(L.show_profile(prof, "json"))
    assert doc["total_runs"] == 10 and doc["entries"][0]["wilson"] == 0.6
    from ruamel.yaml import YAML
    assert YAML(typ="safe").load(L.show_profile(prof, "yaml")) == doc
    with pytest.raises(AssayError):
        L.show_profile(prof, "xml")


# ---------------------------------------------------------------------------- merge properties

_VALUES = st.sampled_from([(L.FILE_OPEN, "/etc/hosts"), (L.FILE_OPEN, "/a/b"), (L.FILE_OPEN, "/proc/1/stat"),
                           (L.FILE_OPEN, "/proc/2/stat"), (L.FILE_OPEN, "rel"), (L.PROC_EXEC, "/bin/sh"),
                           (L.NET_CONNECT, "10.0.0.1:443"), (L.NET_CONNECT, "[::1]:53")])
_ITEMS = st.lists(st.tuples(_VALUES, st.integers(1, 5)), max_size=6)
# few distinct seconds, so equal start times (ties) are common
_TIMES = st.integers(0, 5).map(lambda s: f"2025-01-01T00:00:0{s}Z")


@st.composite
def runs(draw, max_runs=6):
    n = draw(st.integers(1, max_runs))
    ids = draw(st.lists(st.text("abcdef0123", min_size=1, max_size=4), min_size=n, max_size=n, unique=True))
    return [make_run(rid, draw(_TIMES), [(k, v, h) for (k, v), h in draw(_ITEMS)]) for rid in ids]


def merge_all(prof, rs):
    for r in rs:
        prof = L.merge_run(prof, r).profile
    return prof


@settings(max_examples=150, deadline=None)
@given(runs(), st.randoms(use_true_random=False))
def test_merge_order_does_not_matter(rs, rnd):
    a = merge_all(L.Profile("p"), rs)
    shuffled = list(rs)
    rnd.shuffle(shuffled)
    b = merge_all(L.Profile("p"), shuffled)
    assert a == b
    assert L.dump_profile(a) == L.dump_profile(b)
    assert a.total_runs == len(rs)
    assert all(1 <= e.runs_seen <= len(rs) for e in a.entries)


@settings(max_examples=150, deadline=None)
@given(runs(), st.data())
def test_merging_a_run_twice_changes_nothing(rs, data):
    prof = merge_all(L.Profile("p"), rs)
    again = data.draw(st.sampled_from(rs))
    out = L.merge_run(prof, again)
    assert not out.merged and out.profile == prof


def test_small_permutations_exhaustively():
    rs = [make_run("x", "2025-01-01T00:00:03Z", [(L.FILE_OPEN, "/a", 2), (L.NET_CONNECT, "10.0.0.1:1")]),
          make_run("y", "2025-01-01T00:00:01Z", [(L.FILE_OPEN, "/a")]),
          make_run("z", "2025-01-01T00:00:01Z", [(L.FILE_OPEN, "/b")])]
    results = {L.dump_profile(merge_all(L.Profile("p"), perm)) for perm in itertools.permutations(rs)}
    assert len(results) == 1


# --------------------------------------------------------------------------------- concurrency

@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(2, 20), workers=st.integers(2, 6), dups=st.integers(0, 6))
def test_concurrent_updates_lose_no_run(tmp_path_factory, n, workers, dups):
    tmp = tmp_path_factory.mktemp("conc")
    p = str(tmp / "p.yaml")
    L.profile_init(p, "p")
    jobs = []
    for i in range(n):
        run = make_run(f"run-{i:02d}", f"2025-01-01T00:{i:02d}:00Z",
                       [(L.FILE_OPEN, "/common", 2), (L.FILE_OPEN, f"/only/{i}")])
        jobs.append((p, write_run(tmp, run)))
    ctx = multiprocessing.get_context("spawn")     # fork from a threaded pytest is unsafe
    with ctx.Pool(workers) as pool:
        # duplicates race their originals: exactly one of each pair merges
        results = pool.starmap(L.profile_update, jobs + jobs[:dups])
    assert [r.status for r in results].count("merged") == n
    prof = L.load_profile(p)
    assert prof.total_runs == n and sorted(prof.run_ids) == [f"run-{i:02d}" for i in range(n)]
    common = next(e for e in prof.entries if e.value == "/common")
    assert (common.runs_seen, common.hits_total) == (n, 2 * n)
    assert len(prof.entries) == n + 1
    leftovers = set(os.listdir(tmp)) - {"p.yaml", "p.yaml.lock"} - {f"run-{i:02d}.jsonl" for i in range(n)}
    assert not leftovers        # no temp files


# ------------------------------------------------------------------------------ the whole loop

def test_record_profile_generate_loop(tmp_path):
    """Recorder -> file -> profile_update x10 -> generate -> the policy loader accepts it."""
    policy = pytest.importorskip("assay.policy")
    prof_path = str(tmp_path / "assay-profile.yaml")
    L.profile_init(prof_path, "loop")
    for i in range(10):
        rec = L.RunRecorder(str(tmp_path / f"run{i}.jsonl"), FP, started=f"2025-05-01T00:00:{i:02d}Z",
                            cwd_of=lambda pid: "/srv/app")
        for ev in ({"type": "exec", "filename": "/usr/bin/python3", "pid": 1},
                   {"type": "open", "path": "config.ini", "ret": 3, "pid": 1, "dfd": -100},
                   {"type": "open", "path": f"/proc/{1000 + i}/status", "ret": 3, "pid": 1},
                   {"type": "connect", "family": "inet", "addr": "127.0.0.1", "port": 5432, "ret": 0}):
            rec.feed(ev)
        if i == 0:
            rec.feed({"type": "open", "path": "/etc/once", "ret": 3, "pid": 1})
        rec.write()
        assert L.profile_update(prof_path, rec.path).status == "merged"
    text, rep = L.generate(L.load_profile(prof_path), mode="enforce")
    pol = policy.parse_policy(text, "policy.yaml")
    allowed = {str(g) for r in pol.rules for g in r.not_paths} | {str(d) for r in pol.rules for d in r.not_dests}
    assert allowed == {"/srv/app/config.ini", "/proc/**", "/usr/bin/python3", "127.0.0.1:5432"}
    assert [d.value for d in rep.bucket("deny")] == ["/etc/once"]
    assert all(r.action == "deny" for r in pol.rules)


def test_update_result_is_picklable():
    import pickle
    r = L.UpdateResult("merged", "x", "m", _learned_profile())
    assert pickle.loads(pickle.dumps(r)) == r
    assert attrs.has(L.Profile)


# ------------------------------------------------------------------------------------------- CLI

@pytest.fixture
def cli(tmp_path, monkeypatch, capsys):
    """Runs `assay ARGS...` in-process through cli.main (exit-code mapping included), in tmp_path."""
    cli_mod = pytest.importorskip("assay.cli")
    import sys
    from types import SimpleNamespace
    monkeypatch.chdir(tmp_path)

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["assay", *args])
        with pytest.raises(SystemExit) as ei:
            cli_mod.main()
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=ei.value.code, stdout=out, stderr=err)
    return run


def test_cli_profile_and_generate(cli, tmp_path):
    policy = pytest.importorskip("assay.policy")
    run = cli
    r = run("profile", "init", "--name", "job")
    assert r.returncode == 0 and (tmp_path / "assay-profile.yaml").exists(), r.stderr
    r = run("profile", "init")
    assert r.returncode == 1 and "already exists" in r.stderr
    for i in range(10):
        write_run(tmp_path, make_run(f"r{i}", f"2025-01-01T00:00:0{i}Z", [(L.FILE_OPEN, "/etc/hosts")]))
    for i in range(10):
        r = run("profile", "update", "--input", f"r{i}.jsonl")
        assert r.returncode == 0 and f"merged run r{i}" in r.stdout, r.stderr
    r = run("profile", "update", "--input", "r0.jsonl")
    assert r.returncode == 0 and "skipped" in r.stdout
    r = run("profile", "update", "--input", "r0.jsonl", "--strict")
    assert r.returncode == 1 and "already merged" in r.stderr
    (tmp_path / "bad.jsonl").write_text(L.dump_run(make_run("bad", "2025-01-02T00:00:00Z", [])) + "{oops\n")
    r = run("profile", "update", "--input", "bad.jsonl")
    assert r.returncode == 1 and "bad.jsonl:2:2: not valid JSON" in r.stderr
    write_run(tmp_path, make_run("o", "2025-01-03T00:00:00Z", [(L.FILE_OPEN, "/x")], fp=OTHER_FP))
    r = run("profile", "update", "--input", "o.jsonl")
    assert r.returncode == 1 and FP in r.stderr and OTHER_FP in r.stderr
    doc = json.loads(run("profile", "show", "--format", "json").stdout)
    assert doc["total_runs"] == 10 and doc["entries"][0]["wilson"] == 0.72
    r = run("generate", "--mode", "enforce", "-o", "policy.yaml")
    assert r.returncode == 0 and r.stdout == "" and "allow 1" in r.stderr
    pol = policy.load_policy(str(tmp_path / "policy.yaml"))
    assert [str(p) for p in pol.rules[0].not_paths] == ["/etc/hosts"]
    r = run("generate", "--mode", "block")
    assert r.returncode == 1 and "--mode" in r.stderr
    r = run("profile", "update", "--input", "o.jsonl", "--force")
    assert r.returncode == 0, r.stderr


def test_runs_needed_and_the_five_run_trap():
    assert L.runs_needed(0.7) == 9 and L.runs_needed(0.5) == 4 and L.runs_needed(1.0) is None
    for s in (0.3, 0.55, 0.7, 0.8, 0.9):
        n = L.runs_needed(s)
        assert L.score(n, n) >= s > L.score(n - 1, n - 1)
    prof = profile_of({(L.FILE_OPEN, "/a"): 5}, 5)
    _, rep = L.generate(prof)
    assert rep.counts()["allow"] == 0 and any("takes 9 runs" in w for w in rep.warnings)
    _, rep = L.generate(prof, min_stability=0.55, review_threshold=0.5)
    assert rep.counts()["allow"] == 1 and not any("takes" in w for w in rep.warnings)


def test_a_name_that_led_to_an_address_is_recorded_as_the_name():
    from assay.learning.run import normalise_dest
    rec = L.RunRecorder("/dev/null", "fp")
    assert rec.feed({"type": "connect", "family": "inet", "addr": "127.0.0.5", "port": 443,
                     "name": "API.Example.com"}).value == "api.example.com:443"
    assert rec.feed({"type": "connect", "family": "inet", "addr": "127.0.0.5", "port": 443}).value == "127.0.0.5:443"
    assert normalise_dest("Api.Example.com.:443") == "api.example.com:443"
    for bad in ("*.example.com:443", "example.com:1-2", "exa_mple.com:443", "example.com"):
        with pytest.raises(ValueError):
            normalise_dest(bad)
