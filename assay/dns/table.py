"""The addresses names resolved to, as /32 and /128 entries in the net tries, each until its TTL.

An LPM value must list every range of every prefix covering its key (enforce._closed_values):
the kernel makes one longest-prefix lookup. A /32 covers nothing but itself, so inserting one
changes no other value; its own value is closed over the plan's static items plus the dynamic
items held at that address."""
from __future__ import annotations

import collections
import ipaddress
import threading
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from assay import abi, enforce
from assay.errors import BpfError

DEFAULT_FLOOR_S = 10.0      # a TTL of 0 or 1 must outlive the connect that follows the answer
DEFAULT_CEILING_S = 3600.0  # an answer never keeps an address open longer than an hour
MAX_NAMES = 65536           # address -> name memory, for net_blocked events and --record

ItemKey = Tuple[int, int, int, int]     # rule_index, lo, hi, action


def clamp_ttl(ttl: int, floor: float, ceiling: float) -> float:
    return min(max(float(ttl), floor), ceiling)


def address_network(addr: str):
    """A /32 or /128; an IPv4-mapped IPv6 answer is the IPv4 address (the kernel matches it so)."""
    ip = ipaddress.ip_address(addr)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ipaddress.ip_network(ip)


class DynamicTable:
    """Thread-safe: the proxy's threads add, the monitor's loop expires."""

    def __init__(self, maps, net_plan: enforce.NetPlan, floor: float = DEFAULT_FLOOR_S,
                 ceiling: float = DEFAULT_CEILING_S, clock: Callable[[], float] = time.monotonic,
                 warn: Callable[[str], None] = lambda _m: None):
        self.maps = maps
        self.static: Dict[str, Tuple[enforce.NetItem, ...]] = dict(net_plan.items)
        self.floor, self.ceiling, self.clock, self.warn = floor, ceiling, clock, warn
        self._dyn: Dict[Tuple[str, object], Dict[ItemKey, float]] = {}
        self._names: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self.inserted = 0          # entries written (new or refreshed)
        self.expired = 0
        self.dropped = 0           # entries that could not be written (trie full, too many ranges)

    # ---------------------------------------------------------------- names
    def remember(self, addr: str, name: str) -> None:
        key = str(address_network(addr).network_address)
        with self._lock:
            self._names[key] = name
            self._names.move_to_end(key)
            while len(self._names) > MAX_NAMES:
                self._names.popitem(last=False)

    def name_of(self, addr: str) -> Optional[str]:
        """The last name that resolved to this address, if one did."""
        try:
            key = str(address_network(addr).network_address)
        except ValueError:
            return None
        with self._lock:
            return self._names.get(key)

    # ---------------------------------------------------------------- entries
    def add(self, addr: str, ttl: int, items: Iterable) -> int:
        """Puts `addr` into the tries of `items` (names.NameItem) for clamp(ttl); returns the
        entries written. Returns only once the kernel holds them."""
        net = address_network(addr)
        until = self.clock() + clamp_ttl(ttl, self.floor, self.ceiling)
        written = 0
        with self._lock:
            touched = set()
            for it in items:
                m = f"net_{it.map_kind}{net.version}"
                held = self._dyn.setdefault((m, net), {})
                k = (it.rule_index, it.lo, it.hi, int(it.action))
                held[k] = max(held.get(k, 0.0), until)
                touched.add(m)
            for m in touched:
                written += self._write(m, net)
        return written

    def expire(self, now: Optional[float] = None) -> int:
        """Takes out every item whose time is up; returns how many."""
        now = self.clock() if now is None else now
        gone = 0
        with self._lock:
            for (m, net), held in list(self._dyn.items()):
                late = [k for k, t in held.items() if t <= now]
                if not late:
                    continue
                for k in late:
                    del held[k]
                gone += len(late)
                if not held:
                    del self._dyn[(m, net)]
                self._write(m, net)
            self.expired += gone
        return gone

    def rebase(self, net_plan: enforce.NetPlan) -> None:
        """A reload changed the static items: every dynamic value is closed again over them."""
        with self._lock:
            self.static = dict(net_plan.items)
            for (m, net) in list(self._dyn):
                self._write(m, net)

    def entries(self) -> List[Tuple[str, str, float]]:
        with self._lock:
            return [(m, str(net), max(h.values())) for (m, net), h in self._dyn.items()]

    def _write(self, m: str, net) -> int:
        """The closed value for `net` in map `m`, or its removal (restoring a static /32 if the
        policy itself lists this address). Lock held."""
        static = list(self.static.get(m, ()))
        held = self._dyn.get((m, net), {})
        dynamic = [enforce.NetItem(net, lo, hi, idx, abi.Action(act)) for (idx, lo, hi, act) in held]
        have = {(i.rule_index, i.lo, i.hi, int(i.action)) for i in enforce.covering(net, static)}
        items = enforce.covering(net, static + [i for i in dynamic if (i.rule_index, i.lo, i.hi,
                                                                       int(i.action)) not in have])
        key = enforce.lpm_key(net)
        try:
            if not dynamic:
                if any(i.network == net for i in static):
                    self.maps[m].update(key, enforce.net_value(items))
                else:
                    self.maps[m].delete(key)
                return 0
            if len(items) > abi.NET_RANGES:
                self.dropped += len(items) - abi.NET_RANGES
                self.warn(f"{net}: more than {abi.NET_RANGES} ranges apply; the weakest were left out")
                items = items[:abi.NET_RANGES]
            self.maps[m].update(key, enforce.net_value(items))
        except (BpfError, OSError) as e:
            self.dropped += 1
            self.warn(f"could not write {net} into {m}: {e}")
            return 0
        self.inserted += 1
        return 1
