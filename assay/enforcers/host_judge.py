"""The file and exec rules' verdict in userspace, for the host backend: the same order as
bpf/src/file.bpf.h's CHECK_INODE (exact inode, place, nearest subtree; an exception nearer lifts)."""
from __future__ import annotations

import os

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import attrs

from assay import abi

Ident = Tuple[int, int]                 # (st_dev, st_ino)
UNPROVABLE_DEPTH = 0xFFF0               # as the kernel's UNPROVABLE: farther than any real entry

_STRENGTH = {abi.Action.KILL_IMMEDIATE: 5, abi.Action.KILL_GRACEFUL: 4, abi.Action.DENY: 3,
             abi.Action.ALERT: 2, abi.Action.LOG: 1}


@attrs.frozen
class Match:
    rule_index: int        # 0: the built-in refusal (a walk that could not finish)
    action: abi.Action
    depth: int             # steps from the file to the entry (0: the file itself)

    @property
    def blocks(self) -> bool:
        return self.action not in (abi.Action.LOG, abi.Action.ALERT)


@attrs.frozen
class Place:
    """Where a file is, as one name of it shows: its parent's identity and name, and the identities
    of its ancestors from the parent up (None: the walk could not reach the root)."""
    parent: Optional[Ident]
    name: bytes
    ancestors: Optional[Tuple[Ident, ...]]


def _stronger(a: Optional[Tuple[int, abi.Action]], b: Tuple[int, abi.Action]) -> Tuple[int, abi.Action]:
    return b if a is None or _STRENGTH[b[1]] > _STRENGTH[a[1]] else a


@attrs.define
class KindRules:
    """One kind's (file or exec) entries, keyed by identity."""
    deny: Dict[Ident, Tuple[int, abi.Action]] = attrs.Factory(dict)
    allow: set = attrs.Factory(set)
    deny_dirs: Dict[Ident, Tuple[int, abi.Action]] = attrs.Factory(dict)
    allow_dirs: set = attrs.Factory(set)
    names: Dict[Tuple[Ident, bytes], Tuple[int, abi.Action]] = attrs.Factory(dict)
    # what lay below a subtree deny at the start (or arrived there since), by file handle: it
    # keeps its rule when it is moved or linked out, which this backend cannot refuse
    members: Dict[Tuple[int, int, bytes], Tuple[int, abi.Action]] = attrs.Factory(dict)

    def __bool__(self) -> bool:
        return bool(self.deny or self.deny_dirs or self.names)

    def add(self, map_suffix: str, ident: Ident, rule_index: int, action: abi.Action) -> None:
        if map_suffix == "deny":
            self.deny[ident] = _stronger(self.deny.get(ident), (rule_index, action))
        elif map_suffix == "deny_dirs":
            self.deny_dirs[ident] = _stronger(self.deny_dirs.get(ident), (rule_index, action))
        elif map_suffix == "allow":
            self.allow.add(ident)
        elif map_suffix == "allow_dirs":
            self.allow_dirs.add(ident)


def judge(rules: KindRules, ident: Ident, places: Sequence[Place], handle: Optional[Tuple[int, int, bytes]] = None,
          on_subtree_fs: bool = False) -> Optional[Match]:
    """The verdict on one file reached by any of `places` (the name it was opened by, and the
    name the filesystem gives it): the strongest match over them, so no name is a way around."""
    best: Optional[Match] = None
    for p in places:
        m = _judge_one(rules, ident, p, on_subtree_fs)
        if m is not None and (best is None or _STRENGTH[m.action] > _STRENGTH[best.action]):
            best = m
    if best is None and handle is not None and ident not in rules.allow:
        r = rules.members.get(handle)
        if r is not None:
            best = Match(r[0], r[1], 0)
    return best


def _judge_one(rules: KindRules, ident: Ident, place: Place, on_subtree_fs: bool) -> Optional[Match]:
    r = rules.deny.get(ident)
    m = Match(r[0], r[1], 0) if r else None
    if m is None and place.parent is not None:
        r = rules.names.get((place.parent, place.name))
        m = Match(r[0], r[1], 0) if r else None
    if m is None and rules.deny_dirs:
        if place.ancestors is None:
            m = Match(0, abi.Action.DENY, UNPROVABLE_DEPTH) if on_subtree_fs else None
        else:
            for i, a in enumerate(place.ancestors):
                r = rules.deny_dirs.get(a)
                if r is not None:
                    m = Match(r[0], r[1], i + 1)
                    break
    if m is None:
        return None
    if m.depth and ident in rules.allow:
        return None
    if m.depth > 1 and rules.allow_dirs and place.ancestors is not None:
        for j, a in enumerate(place.ancestors):
            if j + 1 >= m.depth:
                break
            if a in rules.allow_dirs:
                return None
    return m


def from_plan(plan) -> Dict[str, KindRules]:
    """{'file': KindRules, 'exec': KindRules} from an enforce.Plan."""
    out = {"file": KindRules(), "exec": KindRules()}
    for e in plan.entries:
        kind, suffix = e.map_name.split("_", 1)
        out[kind].add(suffix, (e.inode.dev, e.inode.ino), e.rule_index, e.action)
    for n in plan.names:
        kind = n.map_name.split("_", 1)[0]
        key = ((n.parent.dev, n.parent.ino), n.name)
        out[kind].names[key] = _stronger(out[kind].names.get(key), (n.rule_index, n.action))
    return out


def ancestors_of(path: str) -> Optional[Tuple[Ident, ...]]:
    """The identities of a path's ancestors, parent first, as a lookup in this mount namespace
    sees them (a mount point is its mounted root). None where one cannot be read."""
    out: List[Ident] = []
    d = os.path.dirname(path)
    while True:
        try:
            st = os.stat(d, follow_symlinks=False)
        except OSError:
            return None
        out.append((st.st_dev, st.st_ino))
        if d == "/":
            return tuple(out)
        up = os.path.dirname(d)
        if up == d:
            return None
        d = up


def members_below(rules: KindRules, roots: Iterable[Tuple[str, int, abi.Action]], handle_of, limit: int,
                  on_member=None) -> List[str]:
    """Indexes what lies below each subtree deny (path, rule, action) by file handle; returns a
    note for each subtree too large to index."""
    notes = []
    for root, index, action in roots:
        count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                p = os.path.join(dirpath, n)
                try:
                    st = os.stat(p, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in rules.allow or (st.st_dev, st.st_ino) in rules.allow_dirs:
                        continue
                    htype, h = handle_of(p)
                except OSError:
                    continue
                rules.members[(st.st_dev, htype, h)] = (index, action)
                count += 1
                if on_member is not None:
                    on_member(p)
            dirnames[:] = [d for d in dirnames if ident_of(os.path.join(dirpath, d)) not in rules.allow_dirs]
            if count > limit:
                notes.append(f"{root}: more than {limit} entries below it; a file moved or linked out of it "
                             "after this point is judged by its new place only")
                break
    return notes


def ident_of(path: str) -> Optional[Ident]:
    """(st_dev, st_ino) of the path itself (a symlink is not followed), None if it is gone."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return None
    return st.st_dev, st.st_ino
