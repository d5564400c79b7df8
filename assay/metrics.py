"""--metrics-addr: a Prometheus endpoint (prometheus_client) over the monitor's live state.

Nothing is updated per event for it: a custom collector reads, at scrape time, the counts the
monitor keeps anyway (its summary), the kernel's counters, the scope map's count and the sizes of
the rule maps' contents (userspace writes every rule entry, so it knows them without a walk).
"""
from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from socketserver import ThreadingMixIn
from typing import Dict, Iterator, Optional, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import attrs
from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from assay import __version__
from assay.errors import UsageError

DEFAULT_HOST = "127.0.0.1"
# The maps a policy's rules live in, and the scope map: each one's occupancy against its capacity.
RULE_MAPS = ("file_deny", "file_deny_dirs", "file_allow", "file_allow_dirs", "file_deny_names",
             "exec_deny", "exec_deny_dirs", "exec_allow", "exec_allow_dirs", "exec_deny_names",
             "name_dirs", "subtree_devs", "net_deny4", "net_deny6", "net_allow4", "net_allow6")
SCOPE_MAP = "scope_pids"
# Kernel counters that are events lost (the rest are losses of another kind, by cause).
DROP_CAUSES = {"ringbuf_drop": "ringbuf_full"}


def parse_addr(text: str) -> Tuple[str, int]:
    """HOST:PORT, [V6]:PORT, :PORT or PORT (loopback) -> (host, port)."""
    t = text.strip()
    host, sep, port = t.rpartition(":")
    if not sep:
        host, port = "", t
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise UsageError(f"--metrics-addr {text!r}: write an IPv6 address in brackets, e.g. [::1]:9464")
    try:
        num = int(port)
    except ValueError:
        raise UsageError(f"--metrics-addr {text!r}: the port must be a number (HOST:PORT, e.g. 127.0.0.1:9464)") from None
    if not 0 <= num <= 65535:
        raise UsageError(f"--metrics-addr {text!r}: port {num} is out of range 0-65535")
    return host or DEFAULT_HOST, num


@attrs.frozen
class Snapshot:
    """The monitor's state at one scrape (Monitor.snapshot)."""
    events: Dict[str, int]
    rule_hits: Dict[Tuple[str, str, str], int]
    kernel: Dict[str, int]
    output_lost: int
    output_errors: Dict[str, int]
    enforcer: Optional[str]
    rules_by_type: Dict[str, int]
    policy: Optional[str]
    map_entries: Dict[str, int]
    map_capacity: Dict[str, int]
    ringbuf_bytes: int
    reload_outcomes: Dict[str, int]
    last_reload_success: Optional[float]
    last_reload_ok: bool


class MonitorCollector:
    """Metric families from a Snapshot, taken when Prometheus asks."""

    def __init__(self, snapshot):
        self._snapshot = snapshot

    def collect(self) -> Iterator:
        s: Optional[Snapshot] = self._snapshot()
        if s is None:  # loading, or closing down
            return
        yield from families(s)


def families(s: Snapshot) -> Iterator:
    ev = CounterMetricFamily("assay_events", "Events written to the stream, by type.", labels=["type"])
    for t, n in sorted(s.events.items()):
        ev.add_metric([t], n)
    yield ev
    dropped = CounterMetricFamily(
        "assay_events_dropped", "Events lost before the stream: ringbuf_full (the kernel's ring buffer was "
        "full; raise --ringbuf-size) and output (the output did not take them).", labels=["cause"])
    dropped.add_metric(["ringbuf_full"], s.kernel.get("ringbuf_drop", 0))
    dropped.add_metric(["output"], s.output_lost)
    yield dropped
    lost = CounterMetricFamily("assay_kernel_lost", "Other kernel-side losses, by cause (the summary's `lost`).",
                               labels=["cause"])
    for cause, n in sorted(s.kernel.items()):
        if cause not in DROP_CAUSES:
            lost.add_metric([cause], n)
    yield lost
    errs = CounterMetricFamily("assay_output_errors", "Write errors of the event output, by errno.",
                               labels=["errno"])
    for e, n in sorted(s.output_errors.items()):
        errs.add_metric([e], n)
    yield errs
    hits = CounterMetricFamily("assay_rule_events", "Blocked and alerted operations, by event type, rule id "
                               "and action.", labels=["type", "rule", "action"])
    for (t, rule, action), n in sorted(s.rule_hits.items()):
        hits.add_metric([t, rule, action], n)
    yield hits
    enf = GaugeMetricFamily("assay_enforcer_info", "The enforcement backend in use (none: no enforcing policy).",
                            labels=["enforcer"])
    enf.add_metric([s.enforcer or "none"], 1)
    yield enf
    rules = GaugeMetricFamily("assay_policy_rules", "Rules of the policy in force, by type.", labels=["type"])
    for t, n in sorted(s.rules_by_type.items()):
        rules.add_metric([t], n)
    yield rules
    if s.policy is not None:
        info = GaugeMetricFamily("assay_policy_info", "The policy in force.", labels=["name"])
        info.add_metric([s.policy], 1)
        yield info
    entries = GaugeMetricFamily("assay_map_entries", "Entries in a rule map or the scope map.", labels=["map"])
    cap = GaugeMetricFamily("assay_map_capacity_entries", "Entries a rule map or the scope map can hold.",
                            labels=["map"])
    for name in RULE_MAPS + (SCOPE_MAP,):
        if name in s.map_capacity:
            entries.add_metric([name], s.map_entries.get(name, 0))
            cap.add_metric([name], s.map_capacity[name])
    yield entries
    yield cap
    yield GaugeMetricFamily("assay_ringbuf_size_bytes", "Size of the kernel's event ring buffer.",
                            value=s.ringbuf_bytes)
    rel = CounterMetricFamily("assay_policy_reloads", "Policy reloads (SIGHUP), by outcome: success, invalid "
                              "(the file did not parse or resolve), refused (this monitor cannot enforce "
                              "it), failed (the kernel refused a map write).", labels=["outcome"])
    for outcome, n in sorted(s.reload_outcomes.items()):
        rel.add_metric([outcome], n)
    yield rel
    yield GaugeMetricFamily("assay_policy_last_reload_successful",
                            "1 if the last reload succeeded (or none was tried), else 0.",
                            value=1 if s.last_reload_ok else 0)
    if s.last_reload_success is not None:
        yield GaugeMetricFamily("assay_policy_last_reload_success_timestamp_seconds",
                                "When the policy in force was put in force (the start's load or the last "
                                "successful reload), Unix time.", value=s.last_reload_success)


def build_info() -> GaugeMetricFamily:
    from assay import libbpf

    try:
        lib_version = libbpf.load().version
    except Exception:  # noqa: BLE001  the monitor reports a missing libbpf itself
        lib_version = "unknown"
    g = GaugeMetricFamily("assay_build_info", "Assay's version, and the Python and libbpf it runs on.",
                          labels=["version", "python", "libbpf"])
    g.add_metric([__version__, "%d.%d.%d" % sys.version_info[:3], lib_version], 1)
    return g


class _Static:
    def __init__(self, *metrics):
        self._metrics = metrics

    def collect(self):
        return list(self._metrics)


class _Quiet(WSGIRequestHandler):
    def log_message(self, *_args) -> None:  # no line per scrape on stderr
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class Endpoint:
    """The HTTP endpoint, served from a daemon thread (a scrape never waits on the event loop)."""

    def __init__(self, host: str, port: int, snapshot):
        registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=registry)     # process_start_time_seconds, cpu, memory, fds
        PlatformCollector(registry=registry)    # python_info
        registry.register(_Static(build_info()))
        registry.register(MonitorCollector(snapshot))
        family = _Server
        try:
            if ipaddress.ip_address(host).version == 6:
                family = _Server6
        except ValueError:
            pass  # a host name: IPv4
        try:
            self.server = make_server(host, port, make_wsgi_app(registry), server_class=family,
                                      handler_class=_Quiet)
        except OSError as e:
            raise UsageError(f"--metrics-addr {host}:{port}: {e.strerror or e}") from None
        self.host, self.port = host, self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="assay-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def snapshot(mon) -> Snapshot:
    """A Snapshot of a running monitor (called with its lock held, the object open)."""
    import collections
    import ctypes

    kernel = mon.kernel_counters()
    raw = mon.obj.maps["scope_count"].lookup(ctypes.c_uint32(0))
    entries = {name: len(keys) for name, keys in mon.contents.items()}
    # The kernel counts the scope entries it writes; the monitor's own are in the config.
    entries[SCOPE_MAP] = max(0, int.from_bytes(raw or bytes(8), "little", signed=True) + mon._cfg.scope_user)
    pol = mon.policy
    out = mon._out
    return Snapshot(events=dict(mon.summary.counts), rule_hits=dict(mon.summary.rule_hits), kernel=kernel,
                    output_lost=out.lost if out else 0, output_errors=dict(out.errors) if out else {},
                    enforcer=mon.summary.enforcer,
                    rules_by_type=dict(collections.Counter(r.type for r in pol.rules)) if pol else {},
                    policy=pol.name if pol else None, map_entries=entries, map_capacity=mon.capacity,
                    ringbuf_bytes=mon.capacity.get("events", 0), reload_outcomes=dict(mon.reloads.outcomes),
                    last_reload_success=mon.reloads.last_success, last_reload_ok=mon.reloads.last_ok)
