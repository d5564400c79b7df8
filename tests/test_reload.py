"""Policy reload: the diff and its order (pure), checked against a model of the file decision."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from assay import abi, enforce, reload
from assay.errors import BpfError
from assay.policy import parse_policy

A = abi.Action
BLOCKING = {int(A.DENY), int(A.KILL_IMMEDIATE), int(A.KILL_GRACEFUL)}


def ref(rule: int, action: A) -> bytes:
    return struct.pack("<II", rule, int(action))


def policy(rules: str, kill_switch: str = "") -> object:
    return parse_policy('version: "2.0"\nname: t\nruntime_monitor:\n  enabled: true\n  rules:\n' + rules
                        + kill_switch, "p.yaml")


# ---------------------------------------------------------------- a model of the file decision
#
# One small tree: /d1/d2/d3/f1, /d1/d2/f2, /d1/f3. Keys are abstract (the diff never looks at
# them); the model reads them the way CHECK_INODE in bpf/src/file.bpf.h does: the exact deny,
# then the deny by name (behind its parent's gate), then the nearest subtree deny; an exception
# (exact: depth 0, or the nearest allowed directory) nearer than the deny lifts it.

FILES = {b"f1": [b"d3", b"d2", b"d1"], b"f2": [b"d2", b"d1"], b"f3": [b"d1"]}
NAME_OF = {b"f1": b"n1", b"f2": b"n2", b"f3": b"n3"}
PARENT_OF_NAME = {b"n1": b"d3", b"n2": b"d2", b"n3": b"d1"}
DIRS = [b"d1", b"d2", b"d3"]


def blocked(state, f: bytes) -> bool:
    dirs = FILES[f]
    hit, depth = state.get("file_deny", {}).get(f), 0
    if hit is None:
        gate = state.get("name_dirs", {}).get(dirs[0])
        if gate is not None and int.from_bytes(gate, "little") & 1:
            hit = state.get("file_deny_names", {}).get(NAME_OF[f])
    if hit is None:
        for i, d in enumerate(dirs, start=1):
            if d in state.get("file_deny_dirs", {}):
                hit, depth = state["file_deny_dirs"][d], i
                break
    if hit is None:
        return False
    allow_depth = 0 if f in state.get("file_allow", {}) else next(
        (i for i, d in enumerate(dirs, start=1) if d in state.get("file_allow_dirs", {})), 99)
    if depth >= 1 and allow_depth < depth:
        return False
    return int.from_bytes(hit[4:8], "little") & 0xFF in BLOCKING


class ModelMap:
    """A map of the model: every single write or delete is one step the checker looks at."""

    def __init__(self, name, state, step):
        self.name, self._state, self._step = name, state, step

    def _d(self):
        return self._state.setdefault(self.name, {})

    def update(self, k, v):
        self._d()[k] = v
        self._step()

    def update_many(self, items):
        for k, v in items:
            self.update(k, v)

    def delete(self, k):
        found = self._d().pop(k, None) is not None
        self._step()
        return found


def model_maps(state, step):
    names = ("file_deny", "file_deny_names", "file_deny_dirs", "file_allow", "file_allow_dirs", "name_dirs")
    return {n: ModelMap(n, state, step) for n in names}


refs = st.builds(ref, st.integers(1, 4), st.sampled_from([A.LOG, A.ALERT, A.DENY, A.KILL_IMMEDIATE]))


def entries(keys):
    return st.dictionaries(st.sampled_from(keys), refs, max_size=len(keys))


@st.composite
def contents(draw):
    c = {"file_deny": draw(entries(list(FILES))), "file_deny_names": draw(entries(list(PARENT_OF_NAME))),
         "file_deny_dirs": draw(entries(DIRS)), "file_allow": draw(entries(list(FILES))),
         "file_allow_dirs": draw(entries(DIRS))}
    gates = {}
    for n in c["file_deny_names"]:   # as the planner writes them: a gate per parent of a name
        gates[PARENT_OF_NAME[n]] = 1 | draw(st.sampled_from([0, 2]))
    c["name_dirs"] = {k: struct.pack("<I", v) for k, v in gates.items()}
    return {k: v for k, v in c.items() if v}


def copy(c):
    return {k: dict(v) for k, v in c.items()}


def clean(c):
    return {k: v for k, v in c.items() if v}


@settings(max_examples=400, deadline=None)
@given(contents(), contents())
def test_what_both_policies_deny_stays_denied_after_every_map_operation(old, new):
    state = copy(old)
    both = [f for f in FILES if blocked(old, f) and blocked(new, f)]
    steps = []

    def step():
        steps.append(1)
        for f in both:
            assert blocked(state, f), f"{f!r} let through after step {len(steps)}: {state}"

    bits = []
    reload.swap_maps(old, new, model_maps(state, step), bits.append, reload.Bits(file=1), reload.Bits(file=2))
    assert clean(state) == clean(new)
    assert bits == [reload.Bits(file=3), reload.Bits(file=2)]  # the union during the swap, then the new


@settings(max_examples=200, deadline=None)
@given(contents(), contents(), st.integers(0, 40))
def test_a_failure_part_way_puts_the_old_policy_back(old, new, fail_at):
    state = copy(old)
    calls = []

    def step():
        calls.append(1)
        if len(calls) == fail_at:
            raise BpfError("map file_deny: update failed: Cannot allocate memory")

    bits = []
    try:
        reload.swap_maps(old, new, model_maps(state, step), bits.append, reload.Bits(file=1), reload.Bits(file=2))
    except BpfError as e:
        assert "the old policy is in force" in str(e)
        assert clean(state) == clean(old)
        assert bits[-1] == reload.Bits(file=1)
    else:
        assert clean(state) == clean(new)


def test_unchanged_keys_are_not_touched_and_counts_add_up():
    old = {"file_deny": {b"a": ref(1, A.DENY), b"b": ref(2, A.DENY)}, "file_allow": {b"x": ref(1, A.DENY)}}
    new = {"file_deny": {b"a": ref(1, A.DENY), b"c": ref(3, A.DENY), b"b": ref(2, A.ALERT)}}
    s = reload.diff(old, new)
    assert [(w.map, w.key) for w in s.deny_writes] == [("file_deny", b"c"), ("file_deny", b"b")]  # blocking first
    assert [(d.map, d.key) for d in s.allow_deletes] == [("file_allow", b"x")]
    assert (s.added, s.updated, s.removed) == (1, 1, 1)
    assert reload.diff(new, new) == reload.Swap()


def test_name_gates_get_the_union_first_and_lose_bits_last():
    old = {"name_dirs": {b"p": struct.pack("<I", 1)}}
    new = {"name_dirs": {b"p": struct.pack("<I", 2)}}
    s = reload.diff(old, new)
    assert [w.value for w in s.deny_writes] == [struct.pack("<I", 3)]
    assert [w.value for w in s.gate_narrowing] == [struct.pack("<I", 2)]
    assert [p for p, ops in s.phases() if ops] == ["deny_writes", "gate_narrowing"]


def test_deny_deletes_reporting_entries_first_and_gates_last():
    old = {"file_deny_dirs": {b"d": ref(1, A.DENY), b"e": ref(2, A.ALERT)}, "name_dirs": {b"p": struct.pack("<I", 1)},
           "subtree_devs": {b"\1\0\0\0": struct.pack("<I", 1)}}
    s = reload.diff(old, {})
    assert [d.key for d in s.deny_deletes] == [b"e", b"d", b"p", b"\1\0\0\0"]


def test_over_capacity_counts_old_and_new_side_by_side():
    old = {"file_deny": {b"a": b"", b"b": b""}}
    new = {"file_deny": {b"b": b"", b"c": b""}}
    assert reload.over_capacity(old, new, {"file_deny": 3}) == []
    assert reload.over_capacity(old, new, {"file_deny": 2}) == ["file_deny needs 3 entries during the swap, holds 2"]


def test_rule_numbers_never_change_meaning():
    first = policy("    - id: a\n      type: net_connect\n      match: { dest_globs: ['22'] }\n"
                   "    - id: b\n      type: net_connect\n      match: { dest_globs: ['23'] }\n")
    ids = enforce.rule_ids(first)
    assert ids == {"a": 1, "b": 2}
    # b first now, a gone, c new: b keeps 2, c gets 3 (never 1: an entry for 1 meant a)
    second = policy("    - id: b\n      type: net_connect\n      match: { dest_globs: ['23'] }\n"
                    "    - id: c\n      type: net_connect\n      match: { dest_globs: ['24'] }\n")
    ids2 = enforce.rule_ids(second, ids)
    assert ids2 == {"a": 1, "b": 2, "c": 3}
    plan = enforce.plan_net(second, ids=ids2)
    rules = set()
    for v in plan.maps["net_deny4"].values():
        val = abi.NetValue.from_buffer_copy(v)
        rules |= {val.ranges[i].rule_id for i in range(val.count)}
    assert rules == {2, 3}
    assert enforce.plan(second, ids=ids2).rule_names == {2: "b", 3: "c"}
    assert reload.merged_names(ids2) == {1: "a", 2: "b", 3: "c"}


def test_rule_changes_by_id():
    old = policy("    - id: keep\n      type: net_connect\n      match: { dest_globs: ['22'] }\n      action: deny\n"
                 "    - id: edit\n      type: net_connect\n      match: { dest_globs: ['23'] }\n      action: deny\n"
                 "    - id: gone\n      type: net_connect\n      match: { dest_globs: ['24'] }\n")
    new = policy("    - id: new\n      type: net_connect\n      match: { dest_globs: ['25'] }\n"
                 "    - id: keep\n      type: net_connect\n      match: { dest_globs: ['22'] }\n      action: deny\n"
                 "    - id: edit\n      type: net_connect\n      match: { dest_globs: ['23'] }\n      action: alert\n")
    c = reload.rule_changes(old, new)
    assert c == reload.RuleChanges(added=("new",), removed=("gone",), changed=("edit",), unchanged=("keep",))
    # the kill switch changes what a rule does
    killed = policy("    - id: keep\n      type: net_connect\n      match: { dest_globs: ['22'] }\n      action: deny\n",
                    "kill_switch: { enabled: true, triggers: [ { on_rule: keep } ] }\n")
    assert reload.rule_changes(old, killed).changed == ("keep",)


def test_missing_decisions_name_the_hooks():
    loaded = {"task_alloc", "file_open", "inode_rename", "inode_link"}
    assert reload.missing_decisions(["file"], loaded) == {}
    assert reload.missing_decisions(["file", "net"], loaded) == {
        "net": ["sctp_bind_connect", "socket_connect", "socket_sendmsg", "socket_setsockopt"]}


def test_refusal_without_an_enforcer_and_without_the_decisions(tmp_path):
    pol = policy("    - id: n\n      type: net_connect\n      match: { dest_globs: ['22'] }\n      action: deny\n")
    ids = enforce.rule_ids(pol)
    plan, net = enforce.plan(pol, ids=ids), enforce.plan_net(pol, ids=ids)
    new = reload.Loaded(pol, ids, plan, net, enforce.contents(plan, net))
    assert "started without an enforcer" in reload.refusal(new, False, set(), {}, {})
    why = reload.refusal(new, True, {"task_alloc", "file_open"}, {}, {})
    assert "net_connect rules need sctp_bind_connect, socket_connect" in why and "--decisions all" in why
    assert reload.refusal(new, True, set(reload.enforcers.HOOKS_FOR["net"]), {}, {}) is None
    assert reload.refusal(new, True, set(reload.enforcers.HOOKS_FOR["net"]), {}, {}, "fmod_ret") is None
    assert "the other backend cannot be reloaded" in reload.refusal(new, True, set(), {}, {}, "other")


def test_result_events():
    r = reload.Result("invalid", "/etc/assay/p.yaml", "/etc/assay/p.yaml:7:9: rule 'x': unknown key 'acton'")
    ev = r.event("2026-01-01T00:00:00.000000Z")
    assert ev == {"type": "policy_reload_failed", "ts": "2026-01-01T00:00:00.000000Z", "path": "/etc/assay/p.yaml",
                  "outcome": "invalid", "error": "/etc/assay/p.yaml:7:9: rule 'x': unknown key 'acton'"}
    ok = reload.Result("success", "p.yaml", policy="t", rules=reload.RuleChanges(added=("a",), unchanged=("b",)),
                       swap=reload.diff({}, {"file_deny": {b"k": ref(1, A.DENY)}}), duration_s=0.01234)
    ev = ok.event("ts")
    assert (ev["type"], ev["added"], ev["removed"], ev["changed"], ev["rules_added"]) == ("policy_reloaded", 1, 0, 0, ["a"])
    assert ev["entries"] == {"added": 1, "updated": 0, "removed": 0} and ev["duration_s"] == 0.012
    assert "1 rules added" in ok.message()


def test_history_counts_outcomes():
    h = reload.History()
    h.loaded(100.0)
    h.record(reload.Result("invalid", "p"), 200.0)
    assert (h.last_success, h.last_ok, h.outcomes["invalid"]) == (100.0, False, 1)
    h.record(reload.Result("success", "p"), 300.0)
    assert (h.last_success, h.last_ok) == (300.0, True)


@pytest.mark.parametrize("text,want", [("9464", ("127.0.0.1", 9464)), (":9464", ("127.0.0.1", 9464)),
                                       ("0.0.0.0:80", ("0.0.0.0", 80)), ("[::1]:9464", ("::1", 9464)),
                                       ("localhost:1", ("localhost", 1))])
def test_metrics_addr(text, want):
    from assay.metrics import parse_addr

    assert parse_addr(text) == want


@pytest.mark.parametrize("text,msg", [("::1:80", "in brackets"), ("host:http", "must be a number"),
                                      ("1.2.3.4:70000", "out of range")])
def test_metrics_addr_errors(text, msg):
    from assay.errors import UsageError
    from assay.metrics import parse_addr

    with pytest.raises(UsageError, match=msg):
        parse_addr(text)


def test_policy_events_as_text():
    from assay import events

    ok = reload.Result("success", "p.yaml", policy="t", rules=reload.RuleChanges(added=("a",), removed=("b", "c")),
                       swap=reload.diff({}, {"file_deny": {b"k": ref(1, A.DENY)}}))
    assert events.to_text(ok.event("ts")) == "POLICY RELOADED p.yaml (t): +1 -2 ~0 rules; entries +1 ~0 -0"
    bad = reload.Result("invalid", "p.yaml", "p.yaml:3:1: boom")
    assert events.to_text(bad.event("ts")) == "POLICY RELOAD INVALID p.yaml: p.yaml:3:1: boom"
