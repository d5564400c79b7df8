"""Turns a policy's file and exec rules into inode-identity map entries (seed section 3)."""
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import ipaddress
import os
import stat
import struct
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import attrs

from assay import abi, system
from assay.policy import is_below
from assay.errors import InputError

FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)
_KEY = struct.Struct(abi.struct_format(abi.InodeKey))
_REF = struct.Struct(abi.struct_format(abi.RuleRef))

# Stronger actions win when two rules name the same inode.
_STRENGTH = {abi.Action.KILL_IMMEDIATE: 5, abi.Action.KILL_GRACEFUL: 4, abi.Action.DENY: 3,
             abi.Action.ALERT: 2, abi.Action.LOG: 1}


@attrs.frozen
class InodeId:
    dev: int            # st_dev, the new_encode_dev form
    ino: int
    gen: Optional[int]  # None: the filesystem has no generation ioctl (tmpfs, initramfs)
    is_dir: bool
    # The superblock's device as the kernel has it (i_sb->s_dev, which /proc/self/mountinfo shows),
    # where stat(2) says otherwise: a btrfs subvolume reports a device of its own.
    sb_dev: Optional[int] = None

    def devs(self) -> Tuple[int, ...]:
        """st_dev in both encodings the kernel may compare with: new_encode_dev and major<<20|minor,
        and the superblock's device in both where it differs."""
        out = []
        for dev in (self.dev, self.sb_dev) if self.sb_dev not in (None, self.dev) else (self.dev,):
            major, minor = os.major(dev), os.minor(dev)
            out += [dev & 0xFFFFFFFF, ((major << 20) | minor) & 0xFFFFFFFF]
        return tuple(dict.fromkeys(out))

    def keys(self) -> List[bytes]:
        """Both dev encodings, with the generation and with the gen=0 fallback (seed section 3),
        packed as struct assay_inode_key."""
        gens = (self.gen, 0) if self.gen else (0,)
        return list(dict.fromkeys(_KEY.pack(self.ino, d, g) for g in gens for d in self.devs()))


def identify(path: str) -> InodeId:
    """open(O_PATH|O_NOFOLLOW) then fstat: the identity of exactly this file, never a swapped link."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    sb = superblock_dev(path, st.st_dev) if os.major(st.st_dev) == 0 else None
    return InodeId(dev=st.st_dev, ino=st.st_ino, gen=_generation(path, st), is_dir=stat.S_ISDIR(st.st_mode),
                   sb_dev=sb)


@functools.lru_cache(maxsize=1)
def _mountinfo() -> Tuple[Tuple[str, int], ...]:
    """(mount point, superblock dev), longest mount point first; of two on one point, the one on
    top. Read once per plan()."""
    top = {m.point: m.dev for m in system.mounts()}
    return tuple(sorted(top.items(), key=lambda m: -len(m[0])))


def superblock_dev(path: str, st_dev: int) -> Optional[int]:
    """The device of the filesystem `path` is on, as its superblock (and so the kernel's decisions)
    has it: where stat(2) shows an anonymous device of its own (btrfs subvolumes), mountinfo
    still shows the superblock's. None where it cannot be told, or is the same."""
    real = os.path.realpath(path)
    for point, dev in _mountinfo():
        if real == point or real.startswith(point.rstrip("/") + "/"):
            return dev if dev != st_dev else None
    return None


_NO_GEN_DEVS: set = set()  # filesystems that answered ENOTTY: no need to ask them again


def _generation(path: str, st: os.stat_result) -> Optional[int]:
    # ioctls do not work on O_PATH descriptors; reopen only regular files and directories, and
    # trust the answer only if it is still the same inode.
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or st.st_dev in _NO_GEN_DEVS:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError:
        return None
    try:
        st2 = os.fstat(fd)
        if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):
            return None
        buf = fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8)
        return struct.unpack("<q", buf)[0] & 0xFFFFFFFF
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            _NO_GEN_DEVS.add(st.st_dev)
        return None
    finally:
        os.close(fd)


@attrs.frozen
class Entry:
    map_name: str
    inode: InodeId
    rule_index: int
    action: abi.Action
    path: str


@attrs.frozen
class NameEntry:
    """An exact deny by place: (parent directory identity, name), for a file replaced there."""
    map_name: str        # file_deny_names or exec_deny_names
    parent: InodeId
    name: bytes
    rule_index: int
    action: abi.Action
    parent_path: str = ""

    def keys(self) -> List[bytes]:
        out = []
        for dev in dict.fromkeys(self.parent.devs()):
            out.append(bytes(abi.NameKey(parent_ino=self.parent.ino, parent_dev=dev, name_len=len(self.name),
                                         name_hash=abi.name_hash(self.name))))
        return out

    def gate_keys(self) -> List[bytes]:
        return [_KEY.pack(self.parent.ino, dev, 0) for dev in dict.fromkeys(self.parent.devs())]


def name_entries(entries: Iterable[Entry]) -> List[NameEntry]:
    """Every exact deny also by its place, so a file renamed over it, or deleted and created
    again, is still denied (an inode renamed away keeps its own entry)."""
    out = []
    parents: Dict[str, Optional[InodeId]] = {}
    for e in entries:
        if e.map_name not in ("file_deny", "exec_deny"):
            continue
        parent, name = os.path.split(e.path.rstrip("/"))
        raw = os.fsencode(name)
        if not parent or not raw or len(raw) >= abi.NAME_MAX:
            continue
        if parent not in parents:
            try:
                parents[parent] = identify(parent)
            except OSError:
                parents[parent] = None  # the rules there still hold by inode
        ident = parents[parent]
        if ident is None:
            continue
        out.append(NameEntry(e.map_name + "_names", ident, raw, e.rule_index, e.action, parent))
    return out


@attrs.frozen
class Plan:
    """Everything to write into the maps, plus what to tell the user about how rules are covered."""
    entries: Tuple[Entry, ...]
    notes: Tuple[str, ...]
    rule_names: Dict[int, str]
    kill_graceful: Dict[int, int]   # rule index -> grace period ms
    names: Tuple[NameEntry, ...] = ()

    def rule_bits(self, prefix: str) -> int:
        names = {e.map_name for e in self.entries} | {n.map_name for n in self.names}
        bits = 0
        for suffix, bit in (("_deny", abi.RULES_DENY), ("_deny_dirs", abi.RULES_DENY_DIRS),
                            ("_allow", abi.RULES_ALLOW), ("_allow_dirs", abi.RULES_ALLOW_DIRS),
                            ("_deny_names", abi.RULES_DENY_NAMES)):
            if prefix + suffix in names:
                bits |= bit
        return bits

    @property
    def needs_lsm(self) -> bool:
        return bool(self.entries)


def rule_action(policy, rule) -> abi.Action:
    if rule.id in policy.kill_rule_ids():
        return abi.Action.KILL_IMMEDIATE if policy.kill_switch.mode == "immediate" else abi.Action.KILL_GRACEFUL
    return {"log": abi.Action.LOG, "alert": abi.Action.ALERT}.get(rule.action, abi.Action.DENY)


def _resolve(policy, rule, glob, notes: List[str]) -> Tuple[str, bool]:
    """(path to identify, subtree) for one glob; a missing path is an error unless allowed."""
    path, subtree = glob.path, glob.subtree
    if os.path.islink(path):
        target = os.path.realpath(path)
        notes.append(f"rule {rule.id}: {path} is a symbolic link; enforcing its target {target}")
        path = target
    if os.path.lexists(path):
        return path, subtree
    if not rule.allow_missing:
        raise policy.error_at(glob, f"rule {rule.id!r}: {glob.path} does not exist; create it, fix the path, "
                                    "or set `allow_missing: true` to cover it through its nearest existing parent")
    parent = os.path.dirname(path.rstrip("/")) or "/"
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent) or "/"
    notes.append(f"rule {rule.id}: {glob.path} does not exist; covering it through {parent.rstrip('/')}/** "
                 "(every file below that directory, present or created later)")
    return parent, True


def rule_ids(policy, previous: Optional[Mapping[str, int]] = None) -> Dict[str, int]:
    """Rule id -> the number the kernel's entries and events carry for it (rule_id). A fresh
    start numbers the rules by position from 1; a reload keeps every number it has handed out
    and gives a rule it has not seen the next unused one, so an entry written for number i never
    comes to mean another rule (docs/service.md, Reload)."""
    out = dict(previous or {})
    nxt = max(out.values(), default=0) + 1
    for r in policy.rules:
        if r.id not in out:
            out[r.id] = nxt
            nxt += 1
    return out


def plan(policy, rule_types: Iterable[str] = ("file_open", "proc_exec"),
         ids: Optional[Mapping[str, int]] = None, aliases: Optional[Mapping[str, str]] = None) -> Plan:
    """Resolves every path of every rule of the given types to inode identities (rule numbers
    from `ids`, by default their positions). `aliases` maps a path to a file that the workload
    sees in its place (the DNS proxy's resolv.conf, bind-mounted over /etc/resolv.conf): that
    file gets the decision the path itself would get."""
    _mountinfo.cache_clear()
    entries: List[Entry] = []
    notes: List[str] = []
    names: Dict[int, str] = {}
    graceful: Dict[int, int] = {}
    prefix = {"file_open": "file", "proc_exec": "exec"}
    if not policy.enabled:
        return Plan((), ("runtime_monitor.enabled is false: no rule is enforced",), {}, {})
    ids = ids or rule_ids(policy)
    for rule in policy.rules:
        index = ids[rule.id]
        names[index] = rule.id
        action = rule_action(policy, rule)
        if action is abi.Action.KILL_GRACEFUL:  # any rule type: net rules kill gracefully too
            graceful[index] = policy.kill_switch.grace_period_ms
        if rule.type not in rule_types:
            continue
        for globs, kind in ((rule.paths, "deny"), (rule.not_paths, "allow")):
            for g in globs:
                path, subtree = _resolve(policy, rule, g, notes)
                try:
                    ident = identify(path)
                except OSError as e:
                    raise policy.error_at(g, f"rule {rule.id!r}: cannot open {path}: "
                                             f"{e.strerror or errno.errorcode.get(e.errno)}") from None
                if subtree and not ident.is_dir:
                    raise policy.error_at(g, f"rule {rule.id!r}: {g.path} is a subtree rule but {path} "
                                             "is not a directory")
                m = f"{prefix[rule.type]}_{kind}" + ("_dirs" if subtree else "")
                entries.append(Entry(m, ident, index, action, path))
    entries += _keep_other_rules(entries, names, notes)
    for real, alias in (aliases or {}).items():
        entries += alias_entries(entries, real, alias)
    return Plan(tuple(entries), tuple(notes), names, graceful, tuple(name_entries(entries)))


def alias_entries(entries: List[Entry], real: str, alias: str) -> List[Entry]:
    """Exact entries for `alias` (another inode, elsewhere in the tree) that repeat the decision
    nearest to `real`: an exact rule on it, else the deepest subtree holding it (at one level a
    deny beats an exception, as in the kernel)."""
    ident = identify(alias)
    out = []
    for kind in ("file", "exec"):
        best = None
        for e in entries:
            if not e.map_name.startswith(kind + "_"):
                continue
            subtree = e.map_name.endswith("_dirs")
            if subtree and is_below(real, e.path):
                level = len(e.path)
            elif not subtree and e.path == real:
                level = PATH_MAX_LEVEL
            else:
                continue
            rank = (level, "_deny" in e.map_name)
            if best is None or rank > best[0]:
                best = (rank, e)
        if best is not None:
            e = best[1]
            out.append(Entry(f"{kind}_{'deny' if best[0][1] else 'allow'}", ident, e.rule_index, e.action, alias))
    return out


PATH_MAX_LEVEL = 1 << 20   # an exact entry is nearer than any subtree


def _keep_other_rules(entries: List[Entry], names: Dict[int, str], notes: List[str]) -> List[Entry]:
    """Deny entries that stop one rule's `not` from lifting another rule's deny.

    The kernel lets the most specific entry win (an exception closer to the file than the deny
    lifts it; at the same distance the deny stays) and does not know which rule an exception
    belongs to. Where rule A's exception E lies below a deny of rule B that B itself does not
    lift at E, B's deny is repeated at E, level with the exception, so B still applies there.
    """
    added: List[Entry] = []
    by_rule: Dict[Tuple[str, int], List[Entry]] = {}
    for e in entries:
        by_rule.setdefault((e.map_name.split("_", 1)[0], e.rule_index), []).append(e)
    for exc in (e for e in entries if "_allow" in e.map_name):
        kind, subtree = exc.map_name.split("_", 1)[0], exc.map_name.endswith("_dirs")
        same_level = f"{kind}_deny" + ("_dirs" if subtree else "")
        for (k, rule), mine in by_rule.items():
            if k != kind or rule == exc.rule_index:
                continue
            if any(e.map_name == same_level and e.path == exc.path for e in mine):
                continue  # a deny at the same level: the kernel already keeps it
            above = [e for e in mine if e.map_name == f"{kind}_deny_dirs" and is_below(exc.path, e.path)]
            if not above:
                continue
            nearest = max(len(e.path) for e in above)
            lifted = [e for e in mine if "_allow" in e.map_name and (
                (e.map_name.endswith("_dirs") and is_below(exc.path, e.path) and len(e.path) > nearest)
                or (e.map_name == exc.map_name and e.path == exc.path))]
            if lifted:
                continue  # rule B excepts this path itself
            deny = next(e for e in above if len(e.path) == nearest)
            added.append(Entry(same_level, exc.inode, rule, deny.action, exc.path))
            notes.append(f"rule {names[rule]}: {exc.path}{'/**' if subtree else ''} is an exception of rule "
                         f"{names[exc.rule_index]} only; rule {names[rule]} still applies there")
    return added


def file_contents(plan_: Plan) -> Dict[str, Dict[bytes, bytes]]:
    """Map name -> {key: value}: exactly what the file and exec maps hold for the plan (strongest
    action first wins a key), with the name gates (name_dirs) and subtree_devs. Pure: a reload
    diffs two of these."""
    best: Dict[str, Dict[bytes, Tuple[int, int, int]]] = {}
    for e in plan_.entries:
        strength = _STRENGTH[e.action]
        per = best.setdefault(e.map_name, {})
        for kb in e.inode.keys():
            cur = per.get(kb)
            if cur is None or strength > cur[0]:
                per[kb] = (strength, e.rule_index, int(e.action) | _map_flag(e))
    gates: Dict[bytes, int] = {}
    for n in plan_.names:
        per = best.setdefault(n.map_name, {})
        for kb in n.keys():
            cur = per.get(kb)
            if cur is None or _STRENGTH[n.action] > cur[0]:
                per[kb] = (_STRENGTH[n.action], n.rule_index, int(n.action))
        for g in n.gate_keys():
            gates[g] = gates.get(g, 0) | (1 if n.map_name.startswith("file") else 2)
    out = {m: {kb: _REF.pack(idx, act) for kb, (_, idx, act) in per.items()} for m, per in best.items()}
    if gates:
        out["name_dirs"] = {g: struct.pack("<I", bits) for g, bits in gates.items()}
    devs = subtree_devs(plan_)
    if devs:
        out["subtree_devs"] = {struct.pack("<I", d): struct.pack("<I", 1) for d in devs}
    return out


# Maps that hold a plan's structure rather than rule entries (apply's count leaves them out).
GATE_MAPS = ("name_dirs", "subtree_devs")


def apply(plan_: Plan, maps: Dict[str, object]) -> int:
    """Writes the plan into empty maps; returns the rule keys written."""
    written = 0
    for map_name, per in file_contents(plan_).items():
        maps[map_name].update_many(list(per.items()))
        if map_name not in GATE_MAPS:
            written += len(per)
    return written


def contents(plan_: Plan, net_plan: "NetPlan") -> Dict[str, Dict[bytes, bytes]]:
    """Every rule map's content for a policy (file, exec and net), empty maps left out."""
    out = file_contents(plan_)
    out.update({m: dict(e) for m, e in net_plan.maps.items() if e})
    return out


def _map_flag(e) -> int:
    """The catch-all of an allow-list (a proc_exec subtree rule on /) judges execve only: the
    shared libraries a program maps are not in the list (see bpf/src/exec.bpf.h)."""
    return abi.ACT_FLAG_NOT_MAPS if e.map_name == "exec_deny_dirs" and e.path == "/" else 0


def subtree_devs(plan_: Plan) -> List[int]:
    """The filesystems holding a subtree deny, in both dev encodings: on them a walk that cannot
    finish (too deep, a disconnected dentry) denies."""
    return sorted({d for e in plan_.entries if e.map_name.endswith("_deny_dirs") for d in e.inode.devs()})


# ---------------------------------------------------------------- net_connect rules

_ANY4 = ipaddress.ip_network("0.0.0.0/0")
_ANY6 = ipaddress.ip_network("::/0")


@attrs.frozen
class NetItem:
    network: object      # IPv4Network | IPv6Network
    lo: int
    hi: int
    rule_index: int
    action: abi.Action


def _net_items(policy, rule, index: int, dests) -> List[NetItem]:
    action = rule_action(policy, rule)
    out = []
    for d in dests:
        if d.unresolved:
            continue  # a name: its addresses arrive through the DNS proxy (assay/dns/table.py)
        nets = [d.network] if d.network is not None else [_ANY4, _ANY6]
        for n in nets:
            out.append(NetItem(n, d.port_lo, d.port_hi, index, action))
    return out


def covering(net, items: Iterable[NetItem]) -> List[NetItem]:
    """The items whose prefix covers `net`, in the order a value lists them: strongest first."""
    return sorted((i for i in items if i.network.version == net.version and net.subnet_of(i.network)),
                  key=lambda i: (-_STRENGTH[i.action], i.rule_index, i.lo))


def lpm_key(net) -> bytes:
    key = abi.Lpm4Key(prefixlen=net.prefixlen) if net.version == 4 else abi.Lpm6Key(prefixlen=net.prefixlen)
    key.addr[:] = list(net.network_address.packed)
    return bytes(key)


def net_value(applicable: List[NetItem]) -> bytes:
    val = abi.NetValue(count=len(applicable))
    for j, i in enumerate(applicable):
        val.ranges[j] = abi.PortRange(lo=i.lo, hi=i.hi, rule_id=i.rule_index, action=int(i.action))
    return bytes(val)


def _closed_values(policy, items: List[NetItem], rule_of: Dict[int, object]) -> Dict[bytes, bytes]:
    """LPM key -> value holding every range of every prefix covering the key's prefix, strongest
    first, so the single longest-prefix match the kernel makes sees all that applies."""
    out: Dict[bytes, bytes] = {}
    for net in {i.network for i in items}:
        applicable = covering(net, items)
        if len(applicable) > abi.NET_RANGES:
            raise policy.error_at(rule_of[applicable[abi.NET_RANGES].rule_index],
                                  f"more than {abi.NET_RANGES} address/port items apply to {net}; "
                                  "merge port ranges or split the rule")
        out[lpm_key(net)] = net_value(applicable)
    return out


@attrs.frozen
class NetPlan:
    maps: Dict[str, Dict[bytes, bytes]]   # map name -> {key: value}
    # The static items per map, which the DNS table closes its /32 and /128 values over, and the
    # tries that names will fill at run time (so their decisions load and their bits are set).
    items: Dict[str, Tuple[NetItem, ...]] = attrs.Factory(dict)
    name_maps: Tuple[str, ...] = ()

    @property
    def bits(self) -> int:
        names = {"net_deny4": abi.NET_DENY4, "net_deny6": abi.NET_DENY6,
                 "net_allow4": abi.NET_ALLOW4, "net_allow6": abi.NET_ALLOW6}
        return sum(bit for name, bit in names.items() if self.maps.get(name) or name in self.name_maps)


def plan_net(policy, ids: Optional[Mapping[str, int]] = None, dns_server=None) -> NetPlan:
    """net_connect rules to LPM trie entries. Host names still unresolved are left to the DNS
    proxy; `dns_server` (an address) is then excepted on port 53 in every net_connect rule, so
    the workload can always ask its resolver."""
    deny: List[NetItem] = []
    allow: List[NetItem] = []
    rule_of = {}
    name_maps: List[str] = []
    ids = ids or rule_ids(policy)
    if policy.enabled:
        for rule in policy.rules:
            index = ids[rule.id]
            if rule.type != "net_connect":
                continue
            rule_of[index] = rule
            deny += _net_items(policy, rule, index, rule.dests)
            allow += _net_items(policy, rule, index, rule.not_dests)
            if dns_server is not None:
                allow.append(NetItem(ipaddress.ip_network(dns_server), 53, 53, index, rule_action(policy, rule)))
            for kind, dests in (("deny", rule.dests), ("allow", rule.not_dests)):
                if any(d.unresolved for d in dests):
                    name_maps += [f"net_{kind}4", f"net_{kind}6"]
    maps = {}
    items = {}
    for kind, sel_items in (("deny", deny), ("allow", allow)):
        for version in (4, 6):
            sel = [i for i in sel_items if i.network.version == version]
            maps[f"net_{kind}{version}"] = _closed_values(policy, sel, rule_of) if sel else {}
            items[f"net_{kind}{version}"] = tuple(sel)
    return NetPlan(maps, items, tuple(dict.fromkeys(name_maps)))


def apply_net(plan_: NetPlan, maps: Dict[str, object]) -> int:
    for name, entries in plan_.maps.items():
        for k, v in entries.items():
            maps[name].update(k, v)  # LPM tries have no batch update
    return sum(len(e) for e in plan_.maps.values())
