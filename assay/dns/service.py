"""The DNS side of one monitor run: the proxy, its table, the resolv.conf the command sees."""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional

import attrs

from assay.dns import names as names_mod
from assay.dns.proxy import Proxy
from assay.dns.table import DEFAULT_CEILING_S, DEFAULT_FLOOR_S, DynamicTable
from assay.dns.upstream import Addr, host_upstream, scope_resolv_conf
from assay.errors import AssayError, EXIT_BPF

RESOLV_CONF = "/etc/resolv.conf"


@attrs.frozen
class DnsOptions:
    upstream: Optional[Addr] = None     # None: the host's first nameserver
    block: bool = False                 # --dns-block: names on no allow-list get NXDOMAIN
    floor: float = DEFAULT_FLOOR_S
    ceiling: float = DEFAULT_CEILING_S


def names_for_run(policy, dynamic: bool):
    """The policy as the monitor enforces it. With the proxy (`-- CMD`), names stay names and are
    followed as they resolve; without it, a name is resolved once now (as before) and a wildcard,
    which cannot be resolved, is an error at its FILE:LINE:COL."""
    from assay.policy import resolve_hosts

    if policy is None or dynamic:
        return policy
    for d in policy.name_dests():
        if d.wildcard:
            raise policy.error_at(d, f"'{d}': a wildcard name is followed through the DNS proxy, which "
                                     "needs `-- COMMAND` (with --pid, --cgroup or --all names are resolved "
                                     "once at start, and a wildcard cannot be); see docs/egress.md")
    return resolve_hosts(policy)


class DnsService:
    def __init__(self, opts: DnsOptions, warn: Callable[[str], None], timestamp: Callable[[int], str]):
        self.opts, self.warn, self.timestamp = opts, warn, timestamp
        self.upstream = opts.upstream or host_upstream(RESOLV_CONF)
        self.proxy: Optional[Proxy] = None
        self.table: Optional[DynamicTable] = None
        self.address: Optional[str] = None
        self.resolv_conf: Optional[str] = None
        self._dir: Optional[str] = None

    def bind(self) -> str:
        """Takes the proxy's address (before the net plan, which excepts it) and writes the
        resolv.conf that the command's mount namespace will see."""
        self.table = DynamicTable({}, _empty_plan(), self.opts.floor, self.opts.ceiling, warn=self.warn)
        self.proxy = Proxy(self.upstream, names_mod.NameRules(), self.table, self.opts.block, self.warn)
        try:
            self.address = self.proxy.bind()
        except OSError as e:
            raise AssayError(f"cannot start the DNS proxy: {e}", EXIT_BPF) from None
        try:
            with open(RESOLV_CONF, encoding="utf-8", errors="replace") as f:
                original = f.read()
        except OSError:
            original = ""
        self._dir = tempfile.mkdtemp(prefix="assay-dns-")
        self.resolv_conf = os.path.join(self._dir, "resolv.conf")
        with open(self.resolv_conf, "w", encoding="utf-8") as f:
            f.write(scope_resolv_conf(original, self.address))
        os.chmod(self._dir, 0o755)
        os.chmod(self.resolv_conf, 0o644)
        return self.address

    def start(self, maps, net_plan, rules: names_mod.NameRules) -> None:
        """The kernel maps exist and hold the static plan: answers may now insert."""
        self.table.maps = maps
        self.table.rebase(net_plan)
        self.proxy.rules = rules
        self.proxy.start()

    def rebase(self, net_plan, rules: names_mod.NameRules) -> None:
        self.proxy.rules = rules
        self.table.rebase(net_plan)

    def tick(self, write: Callable[[dict], None]) -> None:
        self.table.expire()
        while self.proxy.events:
            ev = self.proxy.events.popleft()
            ev["ts"] = self.timestamp(ev["ts"])   # formatted here: the decoder's clock is not thread-safe
            write(ev)

    def name_of(self, addr: str) -> Optional[str]:
        return self.table.name_of(addr) if self.table else None

    def counters(self) -> dict:
        p, t = self.proxy, self.table
        return {"proxy": f"{self.address}:53", "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
                "upstream_failures": p.failures, "malformed": p.malformed, "inserted": t.inserted,
                "expired": t.expired, "dropped": t.dropped}

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self._dir is not None:
            for f in (self.resolv_conf,):
                try:
                    os.unlink(f)
                except OSError:
                    pass
            try:
                os.rmdir(self._dir)
            except OSError:
                pass


def _empty_plan():
    from assay.enforce import NetPlan
    return NetPlan({})
