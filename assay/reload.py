"""Policy reload on SIGHUP with no enforcement gap (docs/service.md, Reload).

The new file is parsed, validated and resolved completely before anything is touched. The maps
then go from the old policy's content to the new one's in an order in which no entry of a rule
both policies share is ever missing, and no exception of the new policy is in force before the
denies it must not lift:

1. the config's rule bits become the union of the old and the new ones;
2. deny-side entries are added or updated: first the gates (name_dirs, where a bit is only
   added: the union of old and new; subtree_devs), then blocking entries (deny, kill), then
   reporting ones (log, alert), and the deny tries. An update of an existing key is one atomic
   replacement in the kernel: a lookup sees the old value or the new one, never none;
3. exception entries (allow maps and tries) are added or updated;
4. stale exception entries are deleted (this only ever denies more);
5. stale deny-side entries are deleted: reporting ones, then blocking ones, then gates;
6. name gates that lose a bit get their new value;
7. the config's rule bits become the new ones.

A decision stops at the nearest entry it finds, so the orders inside steps 2 and 5 matter: an
alert entry in force before the deny it lies below, or left after it, would let through what
both policies deny. tests/test_reload.py checks, against a model of the file decision, that
whatever both policies deny stays denied after every single map operation.

Rule numbers never change meaning: enforce.rule_ids keeps one number per rule id for the
monitor's life. A failure part-way runs the reverse diff (new to old) in the same order.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import attrs
import structlog

from assay import enforce, enforcers
from assay.errors import AssayError, BpfError

log = structlog.get_logger("assay.reload")

Contents = Mapping[str, Mapping[bytes, bytes]]   # map name -> {key: value}

OUTCOMES = ("success", "invalid", "refused", "failed")


def is_exception_map(name: str) -> bool:
    """Maps whose entries lift denies (file/exec *_allow*, net_allow*): in force last, gone first."""
    return "_allow" in name


# ---------------------------------------------------------------- the diff (pure)

@attrs.frozen
class Write:
    map: str
    key: bytes
    value: bytes
    old: Optional[bytes] = None     # None: the key is new


@attrs.frozen
class Delete:
    map: str
    key: bytes
    old: bytes


@attrs.frozen
class Swap:
    """The map operations of one reload, in the phases they must run in."""
    deny_writes: Tuple[Write, ...] = ()
    allow_writes: Tuple[Write, ...] = ()
    allow_deletes: Tuple[Delete, ...] = ()
    deny_deletes: Tuple[Delete, ...] = ()
    gate_narrowing: Tuple[Write, ...] = ()   # name gates losing a bit: their final value, last

    def phases(self) -> Tuple[Tuple[str, tuple], ...]:
        return (("deny_writes", self.deny_writes), ("allow_writes", self.allow_writes),
                ("allow_deletes", self.allow_deletes), ("deny_deletes", self.deny_deletes),
                ("gate_narrowing", self.gate_narrowing))

    @property
    def added(self) -> int:
        return sum(1 for w in self.deny_writes + self.allow_writes if w.old is None)

    @property
    def updated(self) -> int:
        return len({(w.map, w.key) for w in self.deny_writes + self.allow_writes + self.gate_narrowing
                    if w.old is not None})

    @property
    def removed(self) -> int:
        return len(self.allow_deletes) + len(self.deny_deletes)


GATE_MAPS = ("name_dirs", "subtree_devs")   # they turn deny lookups on; their values are not rules


def _int(v: bytes) -> int:
    return int.from_bytes(v, "little")


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")
_BLOCKING = {int(a) for a in (enforce.abi.Action.DENY, enforce.abi.Action.KILL_IMMEDIATE,
                              enforce.abi.Action.KILL_GRACEFUL)}


def _rank(name: str, value: bytes) -> int:
    """Deny-side order: gates (0) before blocking entries (1) before reporting ones (2); deletes
    the other way round. The
    decisions stop at the nearest entry they find, so an alert entry in force before the deny it
    lies below (or left in force after it) would let through what both policies deny."""
    if name in GATE_MAPS or name.startswith("net_"):
        return 0 if name in GATE_MAPS else 1
    action = int.from_bytes(value[4:8], "little") & 0xFF
    return 1 if action in _BLOCKING else 2


def diff(old: Contents, new: Contents) -> Swap:
    """The writes and deletes that turn `old` into `new`, by phase, each phase in its safe order
    (deny writes: gates, blocking, reporting; deny deletes the other way round); keys whose
    value does not change are not touched at all."""
    phases: Dict[str, List] = {"deny_writes": [], "allow_writes": [], "allow_deletes": [], "deny_deletes": [],
                               "gate_narrowing": []}
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, {}), new.get(name, {})
        side = "allow" if is_exception_map(name) else "deny"
        for key, value in after.items():
            prev = before.get(key)
            if prev == value:
                continue
            if name in GATE_MAPS and prev is not None:
                # A gate's bits say which names maps to look into: the union first, the new
                # value only once the names entries it stops covering are gone.
                union = _u32(_int(prev) | _int(value))
                if union != prev:
                    phases["deny_writes"].append(Write(name, key, union, prev))
                if union != value:
                    phases["gate_narrowing"].append(Write(name, key, value, union))
            else:
                phases[f"{side}_writes"].append(Write(name, key, value, prev))
        for key, value in before.items():
            if key not in after:
                phases[f"{side}_deletes"].append(Delete(name, key, value))
    phases["deny_writes"].sort(key=lambda w: _rank(w.map, w.value))
    phases["deny_deletes"].sort(key=lambda d: -_rank(d.map, d.old))
    return Swap(**{k: tuple(v) for k, v in phases.items()})


def over_capacity(old: Contents, new: Contents, capacity: Mapping[str, int]) -> List[str]:
    """Maps that cannot hold the old and the new entries side by side, as the swap needs."""
    out = []
    for name in sorted(set(old) | set(new)):
        need = len(set(old.get(name, {})) | set(new.get(name, {})))
        cap = capacity.get(name)
        if cap is not None and need > cap:
            out.append(f"{name} needs {need} entries during the swap, holds {cap}")
    return out


@attrs.frozen
class Bits:
    """The config map's per-map bits: which rule maps the decisions look into."""
    file: int = 0
    exec: int = 0
    net: int = 0

    def __or__(self, other: "Bits") -> "Bits":
        return Bits(self.file | other.file, self.exec | other.exec, self.net | other.net)

    @classmethod
    def of(cls, plan_: enforce.Plan, net_plan: enforce.NetPlan) -> "Bits":
        return cls(plan_.rule_bits("file"), plan_.rule_bits("exec"), net_plan.bits)


@attrs.frozen
class RuleChanges:
    added: Tuple[str, ...] = ()
    removed: Tuple[str, ...] = ()
    changed: Tuple[str, ...] = ()
    unchanged: Tuple[str, ...] = ()


def _meaning(policy, rule) -> tuple:
    action = enforce.rule_action(policy, rule)
    grace = policy.kill_switch.grace_period_ms if action is enforce.abi.Action.KILL_GRACEFUL else None
    return (rule, action, grace, policy.enabled)


def rule_changes(old_policy, new_policy) -> RuleChanges:
    """Rules by id: only in the new policy, only in the old, in both but different (match,
    action, kill switch), in both and the same."""
    old = {r.id: _meaning(old_policy, r) for r in old_policy.rules}
    new = {r.id: _meaning(new_policy, r) for r in new_policy.rules}
    return RuleChanges(
        added=tuple(i for i in new if i not in old),
        removed=tuple(i for i in old if i not in new),
        changed=tuple(i for i in new if i in old and new[i] != old[i]),
        unchanged=tuple(i for i in new if i in old and new[i] == old[i]))


def kinds_of(plan_: enforce.Plan, net_plan: enforce.NetPlan) -> List[str]:
    return [k for k, bits in (("file", plan_.rule_bits("file")), ("exec", plan_.rule_bits("exec")),
                              ("net", net_plan.bits)) if bits]


def missing_decisions(kinds: Iterable[str], loaded: Set[str]) -> Dict[str, List[str]]:
    """Kind of rule -> the decisions (hooks) it needs that were not loaded at start."""
    out = {}
    for k in kinds:
        miss = sorted(enforcers.HOOKS_FOR[k] - loaded)
        if miss:
            out[k] = miss
    return out


RULE_TYPE = {"file": "file_open", "exec": "proc_exec", "net": "net_connect"}


# ---------------------------------------------------------------- running a swap

def _write(m, items: List[Tuple[bytes, bytes]]) -> None:
    if m.name.startswith("net_"):
        for k, v in items:   # LPM tries have no batch update
            m.update(k, v)
    else:
        m.update_many(items)


def _runs(ops: Sequence) -> Iterable[Tuple[str, List]]:
    """Consecutive operations on one map, in order (a batch per run, the order kept)."""
    run: List = []
    for op in ops:
        if run and run[-1].map != op.map:
            yield run[0].map, run
            run = []
        run.append(op)
    if run:
        yield run[0].map, run


def run_phases(swap: Swap, maps: Mapping[str, object],
               after_op: Optional[Callable[[str], None]] = None) -> None:
    """Runs the swap's phases in order against the maps (a delete of a key already gone is
    fine, and so is a write of the value already there: a rollback may run from any point).
    after_op, if given, is called after each batch (tests look at the maps in between)."""
    for phase, ops in swap.phases():
        for name, group in _runs(ops):
            m = maps[name]
            if isinstance(group[0], Write):
                _write(m, [(w.key, w.value) for w in group])
            else:
                for d in group:
                    m.delete(d.key)
            if after_op is not None:
                after_op(phase)


def swap_maps(old: Contents, new: Contents, maps: Mapping[str, object], set_bits: Callable[[Bits], None],
              old_bits: Bits, new_bits: Bits,
              after_op: Optional[Callable[[str], None]] = None) -> Swap:
    """Turns the maps from `old` to `new` (the module docstring's steps); on a failure puts
    the old content back the same way and raises BpfError."""
    swap = diff(old, new)
    set_bits(old_bits | new_bits)
    try:
        run_phases(swap, maps, after_op)
    except BpfError as e:
        try:
            run_phases(diff(new, old), maps)
            set_bits(old_bits)
        except BpfError as e2:
            raise BpfError(f"{e}; putting the old policy back failed too ({e2}): entries of both "
                           "policies may be in force; reload again") from None
        raise BpfError(f"{e}; the old policy is in force") from None
    set_bits(new_bits)
    return swap


# ---------------------------------------------------------------- one reload

@attrs.frozen
class Result:
    outcome: str                      # one of OUTCOMES
    path: str
    error: Optional[str] = None
    policy: Optional[str] = None      # the new policy's name (success)
    rules: Optional[RuleChanges] = None
    swap: Optional[Swap] = None
    duration_s: float = 0.0

    def event(self, ts: str) -> dict:
        if self.outcome != "success":
            return {"type": "policy_reload_failed", "ts": ts, "path": self.path, "outcome": self.outcome,
                    "error": self.error}
        r, s = self.rules, self.swap
        return {"type": "policy_reloaded", "ts": ts, "path": self.path, "policy": self.policy,
                "added": len(r.added), "removed": len(r.removed), "changed": len(r.changed),
                "unchanged": len(r.unchanged), "rules_added": list(r.added), "rules_removed": list(r.removed),
                "rules_changed": list(r.changed),
                "entries": {"added": s.added, "updated": s.updated, "removed": s.removed},
                "duration_s": round(self.duration_s, 3)}

    def message(self) -> str:
        if self.outcome == "success":
            r, s = self.rules, self.swap
            return (f"assay: policy reloaded from {self.path}: {len(r.added)} rules added, {len(r.removed)} "
                    f"removed, {len(r.changed)} changed ({s.added} map entries added, {s.updated} updated, "
                    f"{s.removed} removed) in {self.duration_s:.3f}s")
        return f"assay: policy reload {self.outcome}, the previous policy stays in force: {self.error}"


@attrs.frozen
class Loaded:
    """A policy resolved for the maps, not yet written."""
    policy: object
    ids: Dict[str, int]
    plan: enforce.Plan
    net_plan: enforce.NetPlan
    contents: Dict[str, Dict[bytes, bytes]]


def prepare(path: str, previous_ids: Mapping[str, int], dns_server: Optional[str] = None,
            aliases: Optional[Mapping[str, str]] = None) -> Loaded:
    """Parses, validates and resolves a policy file (raises AssayError, FILE:LINE:COL). With the
    DNS proxy running (`dns_server`), names stay names, followed as they resolve."""
    from assay.dns.service import names_for_run
    from assay.policy import load_policy

    pol = names_for_run(load_policy(path), dynamic=dns_server is not None)
    ids = enforce.rule_ids(pol, previous_ids)
    plan_ = enforce.plan(pol, ids=ids, aliases=aliases)
    net_plan = enforce.plan_net(pol, ids=ids, dns_server=dns_server)
    return Loaded(pol, ids, plan_, net_plan, enforce.contents(plan_, net_plan))


# Backends whose decisions read exactly the maps swap_maps rewrites. A backend that also keeps
# state outside them (marks, attachments) must not be reloaded by this module: refused.
RELOADABLE_BACKENDS = ("lsm", "fmod_ret")


def refusal(new: Loaded, enforcing: bool, loaded_hooks: Set[str], old_contents: Contents,
            capacity: Mapping[str, int], backend: Optional[str] = None) -> Optional[str]:
    """Why this monitor cannot put the new policy in force, or None."""
    kinds = kinds_of(new.plan, new.net_plan)
    if backend is not None and backend not in RELOADABLE_BACKENDS:
        return (f"the {backend} backend cannot be reloaded (only {', '.join(RELOADABLE_BACKENDS)}); "
                "restart the monitor")
    if kinds and not enforcing:
        return ("the monitor started without an enforcer (its policy enforced nothing); restart it, "
                "or start it with --decisions all")
    missing = missing_decisions(kinds, loaded_hooks)
    if missing:
        what = "; ".join(f"{RULE_TYPE[k]} rules need {', '.join(h)}" for k, h in missing.items())
        return (f"the new policy needs decisions that were not loaded at start ({what}); restart the "
                "monitor, or start it with --decisions all")
    full = over_capacity(old_contents, new.contents, capacity)
    if full:
        return "; ".join(full)
    return None


def reload(path: str, state, apply: Callable[[Loaded], Swap], clock: Callable[[], float] = time.monotonic) -> Result:
    """One reload: prepare (never touching the kernel), check, then `apply` (the swap). Never
    raises: every outcome is a Result for the event stream, the log and the metrics."""
    t0 = clock()
    try:
        new = prepare(path, state.rule_ids, getattr(state, "dns_server", None), getattr(state, "file_aliases", None))
    except AssayError as e:
        return Result("invalid", path, str(e), duration_s=clock() - t0)
    except Exception as e:  # noqa: BLE001  a reload must never take the monitor down
        log.exception("policy reload: unexpected error")
        return Result("failed", path, f"{type(e).__name__}: {e}", duration_s=clock() - t0)
    why = refusal(new, state.backend is not None, state.loaded_hooks, state.contents, state.capacity,
                  state.backend.name if state.backend is not None else None)
    if why:
        return Result("refused", path, why, duration_s=clock() - t0)
    changes = rule_changes(state.policy, new.policy)
    try:
        swap = apply(new)
    except BpfError as e:
        return Result("failed", path, str(e), duration_s=clock() - t0)
    return Result("success", path, policy=new.policy.name, rules=changes, swap=swap, duration_s=clock() - t0)


def merged_names(ids: Mapping[str, int]) -> Dict[int, str]:
    """rule number -> rule id, for every rule this monitor has known (an event already in the ring
    buffer may name a rule the last reload removed)."""
    return {n: i for i, n in ids.items()}


@attrs.define
class History:
    """What the metrics say about reloads: outcomes so far, and the last success (the start's
    load counts as one, as Prometheus counts its own configuration)."""
    outcomes: Dict[str, int] = attrs.Factory(lambda: dict.fromkeys(OUTCOMES, 0))
    last_success: Optional[float] = None   # wall-clock seconds
    last_ok: bool = True

    def loaded(self, now: float) -> None:
        self.last_success, self.last_ok = now, True

    def record(self, result: Result, now: float) -> None:
        self.outcomes[result.outcome] = self.outcomes.get(result.outcome, 0) + 1
        self.last_ok = result.outcome == "success"
        if self.last_ok:
            self.last_success = now


def put_in_force(mon, new: Loaded) -> Swap:
    """Swaps a prepared policy into a running monitor's maps (swap_maps) and makes it the
    monitor's own: decoding and graceful kills know the rules of both policies throughout."""
    import ctypes

    from assay import output

    # Numbers handed out stay handed out, even if this swap fails: entries it wrote and could not
    # take back must never come to mean another rule.
    mon.rule_ids = new.ids
    mon.decoder.rule_names = merged_names(new.ids)
    mon.kill_graceful.update(new.plan.kill_graceful)
    cfg = mon._cfg
    old_bits = Bits(cfg.file_rules, cfg.exec_rules, cfg.net_rules)

    def set_bits(b: Bits) -> None:
        cfg.file_rules, cfg.exec_rules, cfg.net_rules = b.file, b.exec, b.net
        mon.obj.maps["assay_config"].update(ctypes.c_uint32(0), cfg)

    swap = swap_maps(mon.contents, new.contents, mon.obj.maps, set_bits, old_bits, Bits.of(new.plan, new.net_plan))
    for note in new.plan.notes:
        output.say(f"assay: note: {note}")
    mon.policy, mon.plan, mon.net_plan = new.policy, new.plan, new.net_plan
    mon.contents = new.contents
    if getattr(mon, "dns", None) is not None:
        from assay.dns.names import name_rules
        mon.dns.rebase(new.net_plan, name_rules(new.policy, new.ids))
    return swap
