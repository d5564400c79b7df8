"""Monitor orchestration: load and scope the BPF object, run the workload, stream its events."""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import struct
import threading
import time
from importlib import resources
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import attrs
import structlog

from assay import abi, enforce, enforcers, events, notify, output, reaper, reload, spawn, system
from assay.bpf import Object, RingBuffer
from assay.errors import BpfError, UsageError

log = structlog.get_logger("assay.monitor")

ALL_EVENTS = tuple(t for t in abi.EventType)
RULE_EVENTS = ("file_blocked", "exec_blocked", "net_blocked", "file_alert", "exec_alert", "net_alert")
GRACE_S = 5.0
POLL_BUDGET_S = 0.2   # event decoding per loop turn, at most, before signals and kills get their turn
DEFAULT_MAX_SCOPE = 65536


def scope_limit(capacity: int) -> int:
    """Entries past which forks in the scope are refused: room is kept for forks already under
    way (between the kernel's check and its insert), so the map never has to lose one."""
    return capacity - max(16, capacity // 64)


def default_object_path() -> str:
    return str(resources.files("assay") / "data" / "assay.bpf.o") if hasattr(resources, "files") else \
        os.path.join(os.path.dirname(__file__), "data", "assay.bpf.o")


@attrs.frozen
class Scope:
    pids: tuple = ()
    cgroup: Optional[str] = None
    all: bool = False

    def fingerprint_options(self, command: Sequence[str]) -> dict:
        """What defines the scope across runs (never pids, which change every run)."""
        return {"pids": bool(self.pids), "cgroup": self.cgroup, "all": self.all,
                "command": list(command)}


@attrs.frozen
class MonitorOptions:
    scope: Scope = Scope()
    command: tuple = ()
    duration: Optional[float] = None
    fmt: str = "json"
    output: Optional[str] = None
    ebpf: Optional[str] = None
    ringbuf_size: Optional[int] = None
    events: tuple = ALL_EVENTS
    policy: Optional[object] = None   # assay.policy.Policy
    enforcer: str = "auto"            # auto, or one backend of assay.enforcers
    wait_all: bool = False            # after the command exits, wait for the rest of its scope
    scope_grace: float = 3.0          # otherwise: SIGTERM it, and SIGKILL after this many seconds
    max_scope: int = DEFAULT_MAX_SCOPE  # scope_pids capacity (processes and threads of the scope)
    protect: bool = True              # self-protection while a policy enforces (--no-protect)
    protect_mounts: bool = True       # with subtree rules, the scope may not mount (--allow-mounts)
    ready_file: Optional[str] = None  # written (our pid) once programs are attached and the scope is set
    stop_file: Optional[str] = None   # holds a token at start; the same token written there later stops us
    decisions: str = "policy"         # which decisions load: those the policy needs, or "all" (any reload)
    metrics: Optional[Tuple[str, int]] = None  # --metrics-addr (host, port)
    dns: Optional[object] = None      # assay.dns.service.DnsOptions: run the scope's DNS proxy (-- CMD)


@attrs.define
class Summary:
    counts: Dict[str, int] = attrs.Factory(collections.Counter)
    kernel_counters: Dict[str, int] = attrs.Factory(dict)
    duration_s: float = 0.0
    exit_status: Optional[int] = None
    enforcer: Optional[str] = None    # the backend that enforced the policy, None without one
    output_lost: int = 0              # events that never reached --output / stdout
    output_errors: Dict[str, int] = attrs.Factory(dict)
    scope_survivors: int = 0          # processes still alive after the end of scope (should be 0)
    rule_hits: Dict[Tuple[str, str, str], int] = attrs.Factory(collections.Counter)  # (type, rule, action)
    dns: Dict[str, object] = attrs.Factory(dict)   # the DNS proxy's counters, when it ran

    @property
    def dropped(self) -> int:
        return self.kernel_counters.get("ringbuf_drop", 0)

    def as_dict(self) -> dict:
        return {"events": dict(sorted(self.counts.items())), "total": sum(self.counts.values()),
                "dropped": self.dropped, "lost": {k: v for k, v in self.kernel_counters.items()
                                                 if k != "ringbuf_drop" and v},
                "duration_s": round(self.duration_s, 3), "exit_status": self.exit_status,
                "enforcer": self.enforcer, "output_lost": self.output_lost,
                **({"output_errors": dict(self.output_errors)} if self.output_errors else {}),
                **({"scope_survivors": self.scope_survivors} if self.scope_survivors else {}),
                **({"dns": dict(self.dns)} if self.dns else {})}

    def as_text(self) -> str:
        per = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        lost = ", ".join(f"{k}={v}" for k, v in self.kernel_counters.items() if k != "ringbuf_drop" and v)
        text = (f"assay: {sum(self.counts.values())} events ({per}); dropped={self.dropped}"
                f"{'; lost: ' + lost if lost else ''}; duration={self.duration_s:.2f}s"
                f"{'; enforcer=' + self.enforcer if self.enforcer else ''}"
                f"{f'; output_lost={self.output_lost}' if self.output_lost else ''}")
        if self.dns:
            text += "; dns: " + ", ".join(f"{k}={v}" for k, v in self.dns.items())
        if self.exit_status is not None:
            text += f"; command exit status={self.exit_status}"
        return text


def parse_duration(text: str) -> float:
    """'10s', '500ms', '2m', '1h' or plain seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    for suffix in ("ms", "s", "m", "h"):
        if t.endswith(suffix):
            num, mult = t[: -len(suffix)], units[suffix]
            break
    else:
        num, mult = t, 1
    try:
        value = float(num) * mult
    except ValueError:
        raise UsageError(f"invalid duration {text!r}: use e.g. 10s, 500ms, 2m, 1h") from None
    if value <= 0:
        raise UsageError(f"invalid duration {text!r}: must be positive")
    return value


def descendants(pid: int) -> List[int]:
    """Existing descendants of pid, from /proc (children forked later are tracked by the kernel)."""
    children: Dict[int, List[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children[ppid].append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


def exit_status(wait_status: int) -> int:
    if os.WIFSIGNALED(wait_status):
        return 128 + os.WTERMSIG(wait_status)
    return os.WEXITSTATUS(wait_status)


def skip_missing_tracepoints(obj: Object, tracefs: str) -> List[str]:
    """Turns off programs whose tracepoint this kernel lacks; returns their names.

    e.g. open(2) on arm64: the syscall, and so its tracepoints, do not exist there.
    """
    skipped = []
    for p in obj.programs.values():
        if p.section.startswith("tracepoint/") and not os.path.isdir(
                os.path.join(tracefs, "events", p.section.split("/", 1)[1])):
            p.autoload = False
            skipped.append(p.name)
    return skipped


class Monitor:
    """Owns the loaded object for one run. Nothing is pinned: when this process dies, so does BPF."""

    def __init__(self, opts: MonitorOptions, enforce: bool = False,
                 on_event: Optional[Callable[[dict], None]] = None):
        self.opts = opts
        self.enforce = enforce
        self.on_event = on_event
        self.summary = Summary()
        self.decoder = events.Decoder()
        self.obj: Optional[Object] = None
        self.backend: Optional[enforcers.Backend] = None
        self._stop = False
        self._child: Optional[int] = None
        self._out: Optional[output.EventWriter] = None
        self.plan: Optional[enforce.Plan] = None
        self.net_plan: Optional[enforce.NetPlan] = None
        self._cfg: Optional[abi.Config] = None
        self.agent = None                 # the host backend's fanotify side, while it runs
        self._stop_token: Optional[str] = None
        # The policy in force, and what a reload needs to change it (assay/reload.py).
        self.policy = opts.policy
        self.rule_ids: Dict[str, int] = {}
        self.contents: Dict[str, Dict[bytes, bytes]] = {}
        self.kill_graceful: Dict[int, int] = {}
        self.loaded_hooks: set = set()
        self.capacity: Dict[str, int] = {}
        self.reloads = reload.History()
        self._hup = self._usr1 = False
        self.lock = threading.Lock()      # held while the object closes: metrics scrapes read it
        self.dns = None                   # assay.dns.service.DnsService, with opts.dns

    # ------------------------------------------------------------ setup
    def load(self) -> Object:
        """Opens and loads the object: the event programs, plus one enforcer's decision programs
        (attached at once) when the policy enforces."""
        tracefs = system.ensure_tracefs()
        if tracefs is None:
            raise BpfError("tracefs is not available (mount -t tracefs tracefs /sys/kernel/tracing)")
        path = self.opts.ebpf or default_object_path()
        if not os.path.exists(path):
            raise BpfError(f"BPF object not found: {path} (run `make bpf`, or reinstall the wheel)")

        def open_object() -> Object:
            obj = Object(path)
            try:
                skip_missing_tracepoints(obj, tracefs)
                obj.maps["scope_pids"].set_max_entries(self.opts.max_scope)
                if self.opts.ringbuf_size:
                    obj.maps["events"].set_max_entries(self.opts.ringbuf_size)
            except BaseException:
                obj.close()
                raise
            return obj

        if not self.enforce:
            obj = open_object()
            try:
                enforcers.select_programs(obj, None)
                obj.load()
            except BaseException:
                obj.close()
                raise
        else:
            obj, self.backend, passed_over = enforcers.choose(self.opts.enforcer, open_object, self.hooks(),
                                                              then=self._start_agent)
            self.decoder.enforcer = self.summary.enforcer = self.backend.name
            why = f" ({'; '.join(passed_over)})" if passed_over else ""
            output.say(f"assay: enforcing via {self.backend.name}{why}")
            if self.backend.judges_files_in_userspace and self.opts.protect:
                output.say("assay: note: the host backend cannot keep a root process in the scope away from the "
                           "monitor (signals, ptrace, bpf()); see docs/enforcers.md")
            model = system.preemption() if self.backend.name == "fmod_ret" else None
            if model in system.PREEMPTIBLE:
                output.say(f"assay: warning: this kernel preempts kernel code ({model}), so it can skip an "
                           "fmod_ret decision; skipped ones are counted (decisions_skipped). See docs/enforcers.md")
        self.obj = obj
        self.loaded_hooks = {enforcers.hook_of(p) for p in obj.programs.values()
                             if enforcers.is_enforcing(p) and p.autoload}
        self.capacity = {name: int(m.info.max_entries) for name, m in obj.maps.items()}
        return obj

    def hooks(self) -> set:
        """The decisions this run needs (the others are not loaded: start-up is verification),
        or every decision with --decisions all, so that any policy can be reloaded."""
        if self.opts.decisions == "all":
            kinds = ["file", "exec", "net"]
        else:
            kinds = reload.kinds_of(self.plan, self.net_plan) if self.plan else []
        if self.opts.protect:
            kinds.append("protect")
        return enforcers.needed_hooks(kinds)

    def prepare_policy(self) -> None:
        """Resolves rules to inodes before anything is loaded: a bad rule costs nothing (exit 1)."""
        if self.opts.policy is None:
            return
        self.rule_ids = enforce.rule_ids(self.opts.policy)
        self.plan = enforce.plan(self.opts.policy, ids=self.rule_ids, aliases=self.file_aliases)
        self.net_plan = enforce.plan_net(self.opts.policy, ids=self.rule_ids, dns_server=self.dns_server)
        self.kill_graceful = dict(self.plan.kill_graceful)
        for note in self.plan.notes:
            output.say(f"assay: note: {note}")
        for host, addrs in self.opts.policy.resolved_hosts().items():
            output.say(f"assay: note: {host} resolved to {', '.join(addrs)}")
        self.decoder.rule_names = self.plan.rule_names
        if self.plan.needs_lsm or self.net_plan.bits or self.opts.decisions == "all":
            self.enforce = True

    @property
    def file_aliases(self) -> Dict[str, str]:
        """The command sees the proxy's resolv.conf as /etc/resolv.conf: rules on one cover the other."""
        if self.dns is None:
            return {}
        return {os.path.realpath("/etc/resolv.conf"): self.dns.resolv_conf}

    @property
    def dns_server(self) -> Optional[str]:
        return self.dns.address if self.dns is not None else None

    def configure(self, cgroup_id: Optional[int], extra: Optional[Callable[[abi.Config], None]] = None) -> None:
        cfg = abi.Config()
        cfg.scope_all = int(self.opts.scope.all)
        cfg.scope_cgroup = int(cgroup_id is not None)
        cfg.cgroup_id = cgroup_id or 0
        cfg.monitor_tgid = os.getpid()
        cfg.event_mask = sum(1 << int(t) for t in self.opts.events)
        cfg.enforce = int(self.enforce)
        cfg.scope_limit = scope_limit(self.opts.max_scope)
        cfg.protect = int(self.enforce and self.opts.protect)
        if cfg.protect:
            self.register_own_objects()
            if self.plan is not None:
                cfg.protect_mounts = int(self.opts.protect_mounts and bool(enforce.subtree_devs(self.plan)))
                self.register_block_devices()
        if self.plan is not None:
            enforce.apply(self.plan, self.obj.maps)
            enforce.apply_net(self.net_plan, self.obj.maps)
            self.contents = enforce.contents(self.plan, self.net_plan)
            self.reloads.loaded(time.time())
            cfg.file_rules = self.plan.rule_bits("file")
            cfg.exec_rules = self.plan.rule_bits("exec")
            cfg.net_rules = self.net_plan.bits
        if self.dns is not None:
            from assay.dns.names import name_rules
            self.dns.start(self.obj.maps, self.net_plan or enforce.NetPlan({}), name_rules(self.policy, self.rule_ids))
        if extra:
            extra(cfg)
        self._cfg = cfg
        self.obj.maps["assay_config"].update(ctypes.c_uint32(0), cfg)

    def register_own_objects(self) -> None:
        """Every map and loaded program of this object, for the tamper decisions."""
        one = struct.pack("<I", 1)
        keys = [abi.own_key(abi.Tamper.BPF_MAP, m.info.id) for m in self.obj.maps.values()]
        keys += [abi.own_key(abi.Tamper.BPF_PROG, p.id) for p in self.obj.programs.values() if p.fd >= 0]
        self.obj.maps["own_objects"].update_many([(struct.pack("<Q", k), one) for k in keys])

    def register_own_links(self) -> None:
        """Every link of this object (decisions and tracepoints): an fd of one detaches it."""
        if not (self._cfg is not None and self._cfg.protect):
            return
        one = struct.pack("<I", 1)
        keys = [abi.own_key(abi.Tamper.BPF_LINK, i) for i in (link.id() for link in self.obj.links) if i]
        if keys:
            self.obj.maps["own_objects"].update_many([(struct.pack("<Q", k), one) for k in keys])

    def register_block_devices(self) -> None:
        """The block devices under the filesystems that hold rules: opening one raw would read the
        protected files' blocks."""
        one = struct.pack("<I", 1)
        devs = system.block_devices_below({e.inode.dev for e in self.plan.entries})
        if devs:
            self.obj.maps["protected_bdevs"].update_many([(struct.pack("<I", (ma << 20) | mi), one) for ma, mi in devs])

    def set_watchdog(self, pid: int) -> None:
        if self._cfg is not None:
            self._cfg.watchdog_tgid = pid
            self.obj.maps["assay_config"].update(ctypes.c_uint32(0), self._cfg)

    def add_pid(self, pid: int) -> None:
        if self.obj.maps["scope_pids"].insert(ctypes.c_uint32(pid), ctypes.c_uint32(1)) and self._cfg is not None:
            # The kernel counts the entries it writes; ours are counted here, for its fork check.
            self._cfg.scope_user += 1
            self.obj.maps["assay_config"].update(ctypes.c_uint32(0), self._cfg)

    def resolve_cgroup(self) -> Optional[int]:
        if not self.opts.scope.cgroup:
            return None
        try:
            return system.cgroup_id(self.opts.scope.cgroup)
        except (OSError, ValueError) as e:
            raise BpfError(f"cannot resolve cgroup {self.opts.scope.cgroup}: {e}") from None

    def kernel_counters(self) -> Dict[str, int]:
        m = self.obj.maps["counters"]
        out = {}
        for c in abi.Counter:
            if c is abi.Counter.MAX:
                continue
            vals = m.lookup_percpu(ctypes.c_uint32(int(c)))
            out[c.name.lower()] = sum(int.from_bytes(v, "little") for v in vals)
        out["decisions_skipped"] = self.decisions_skipped()
        return out

    def decisions_skipped(self) -> int:
        """Runs of the decision programs the kernel skipped (fmod_ret: a task preempted inside one
        makes the next task on that CPU pass unjudged; see docs/enforcers.md)."""
        if self.backend is None:
            return 0
        total = 0
        for link in self.obj.links:
            if enforcers.is_enforcing(link.program):
                try:
                    total += link.program.recursion_misses()
                except BpfError:
                    pass
        return total

    def kill_requests(self) -> List[Tuple[int, int]]:
        """Graceful kills the kernel asked for (pid, rule id), taken off the map."""
        m = self.obj.maps["kill_requests"]
        out = []
        for k in list(m.keys()):
            v = m.lookup(k)
            m.delete(k)
            if v is not None:
                out.append((int.from_bytes(k, "little"), int.from_bytes(v, "little")))
        return out

    def scope_members(self) -> List[int]:
        """Live processes the scope map tracks (the command's tree, --pid trees)."""
        return reaper.members((int.from_bytes(k, "little") for k in self.obj.maps["scope_pids"].keys()),
                              exclude=(os.getpid(),))

    # ------------------------------------------------------------ run
    def _handle_hup(self, _signum, _frame) -> None:
        self._hup = True      # reload the policy and reopen --output, in the loop (not in a handler)

    def _handle_usr1(self, _signum, _frame) -> None:
        self._usr1 = True     # reopen --output only (logrotate)

    def _service_signals(self) -> None:
        hup, self._hup, self._usr1 = self._hup, False, False
        if self._out is not None:
            err = self._out.reopen()
            if err:
                output.say(f"assay: warning: --output: {err}")
        if hup:
            self.reload_policy()

    def reload_policy(self) -> reload.Result:
        """SIGHUP: the --policy file again, in force with no gap, or the old one stays."""
        if self.policy is None:
            output.say("assay: SIGHUP: no --policy was given, nothing to reload (--output was reopened)")
            return reload.Result("refused", "", "no --policy was given at start")
        notify.sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        result = reload.reload(self.policy.path, self, lambda new: reload.put_in_force(self, new))
        self.reloads.record(result, time.time())
        self._write(result.event(self._now()))
        output.say(result.message())
        notify.sd_notify("READY=1")
        return result

    def _handle_signal(self, signum, _frame) -> None:
        self._stop = True
        if self._child:
            try:
                os.kill(self._child, signum)
            except ProcessLookupError:
                pass

    def _now(self) -> str:
        return self.decoder.timestamp(time.monotonic_ns())

    def _emit(self, data: bytes) -> None:
        self._write(self.decoder.decode(data))

    def _start_graceful_kills(self) -> None:
        host = self.backend is not None and self.backend.name == "host"
        if not (self.kill_graceful or host):
            return  # no trigger_kill rule can write a request
        requests = self.kill_requests()
        if self.agent is not None:
            while self.agent.kills:
                requests.append(self.agent.kills.popleft())
        for pid, rule_id in requests:
            if rule_id & abi.KILL_NOW:  # a cgroup program's immediate kill: it cannot signal itself
                reaper.kill_now(pid)
                continue
            grace = self.kill_graceful.get(rule_id, 3000) / 1000.0
            self._graceful.start(pid, self.decoder.rule_names.get(rule_id, str(rule_id)), grace)

    def _write(self, ev: dict) -> None:
        if self.dns is not None and ev["type"] in ("connect", "net_blocked", "net_alert") and ev.get("addr"):
            name = self.dns.name_of(str(ev["addr"]))
            if name is not None:
                ev["name"] = name     # the last name that resolved to this address
        self.summary.counts[ev["type"]] += 1
        if "rule" in ev and ev["type"] in RULE_EVENTS:
            self.summary.rule_hits[(ev["type"], ev["rule"], ev["action"])] += 1
        if self.on_event is not None:
            self.on_event(ev)
        if self._out is not None:
            self._out.write(events.to_json(ev) if self.opts.fmt == "json" else events.to_text(ev))

    def _tick(self, rb: RingBuffer) -> None:
        """One turn of the event loop: events, kill requests, pending output."""
        rb.poll(20 if self.agent is not None and self.agent.active else 100)
        self._drain_agent()
        if self.dns is not None:
            self.dns.tick(self._write)
        if self._hup or self._usr1:
            self._service_signals()
        self._start_graceful_kills()
        self._graceful.reap()
        if self._out is not None:
            self._out.flush(0.05)

    def run(self, out: Optional[output.EventWriter] = None) -> int:
        """Loads, scopes, runs; returns the exit code (the command's status when there is one)."""
        opts = self.opts
        if not (opts.scope.pids or opts.scope.cgroup or opts.scope.all or opts.command):
            raise UsageError("nothing to monitor: give --pid, --cgroup, --all or -- COMMAND")
        if system.in_initial_pid_namespace() is False:
            raise BpfError("this process runs in a PID namespace of its own: the kernel names processes by "
                           "other ids than it sees, so no scope would match and nothing would be enforced; "
                           + system.PID_NAMESPACE_FIX)
        for pid in opts.scope.pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise UsageError(f"--pid {pid}: no such process")
        if opts.stop_file:
            try:
                self._stop_token = notify.take_stop_token(opts.stop_file)
            except OSError as e:
                raise UsageError(f"--stop-file {opts.stop_file}: {e.strerror}") from None
            except ValueError as e:
                raise UsageError(f"--stop-file {opts.stop_file}: {e}") from None
        endpoint = None
        try:
            if opts.dns is not None and opts.command:
                from assay.dns.service import DnsService
                self.dns = DnsService(opts.dns, lambda m: output.say(f"assay: warning: {m}"), self.decoder.timestamp)
                self.dns.bind()   # first: the net plan excepts the proxy's address
                output.say(f"assay: DNS proxy for the command on {self.dns.address}:53, upstream "
                           f"{self.dns.upstream[0]}:{self.dns.upstream[1]}")
            self.prepare_policy()
            cgroup_id = self.resolve_cgroup()
            if opts.metrics:
                from assay.metrics import Endpoint  # binds now: a taken port is an error before anything loads
                endpoint = Endpoint(*opts.metrics, snapshot=self.snapshot)
                output.say(f"assay: metrics on {endpoint.url}")
            self.load()
        except BaseException:
            if endpoint is not None:
                endpoint.close()
            if self.dns is not None:
                self.dns.stop()
            raise
        self._out = out
        self._graceful = reaper.GracefulKills(self._write, self._now)
        start = time.monotonic()
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._handle_hup)
        old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, self._handle_usr1)
        rb = watchdog = None
        status = None
        clean = False
        try:
            self.configure(cgroup_id)
            rb = RingBuffer(self.obj.maps["events"], self._emit, budget_s=POLL_BUDGET_S)
            # Fork tracking first, then the scan: a child forked during the scan is caught by
            # one or the other.
            self.obj.attach()
            self.register_own_links()
            for pid in opts.scope.pids:
                self.add_pid(pid)
            for _ in range(2):  # a second pass catches children forked during the first
                for pid in opts.scope.pids:
                    for d in descendants(pid):
                        self.add_pid(d)
            log.info("monitoring", pid=os.getpid(), scope=attrs.asdict(opts.scope),
                     enforcer=self.backend.name if self.backend else None)
            self._ready()
            if opts.command:
                watchdog = reaper.Watchdog(self.scope_members)
                self.set_watchdog(watchdog.pid)
                self._child = spawn.spawn_in_scope(opts.command, self.add_pid,
                                                   self.dns.resolv_conf if self.dns is not None else None)
            deadline = start + opts.duration if opts.duration else None
            stop_at = None
            while True:
                self._tick(rb)
                if self._stop_token and not self._stop:
                    self._check_stop_file()
                if self._child:
                    pid, wstatus = os.waitpid(self._child, os.WNOHANG)
                    if pid:
                        status = exit_status(wstatus)
                        break
                    if self._stop and stop_at is None:
                        stop_at = time.monotonic() + GRACE_S
                    if stop_at and time.monotonic() > stop_at:
                        os.kill(self._child, signal.SIGKILL)
                elif self._stop:
                    break
                if deadline and time.monotonic() >= deadline and not self._stop:
                    if not self._child:
                        break
                    # --duration bounds the command too: stop it as a signal would
                    self._handle_signal(signal.SIGTERM, None)
            if opts.command:
                self._end_scope(rb)
            clean = True
            rb.consume()
            self._stop_agent()
            self.summary.exit_status = status
            return status if status is not None else 0
        finally:
            if opts.command and not clean and self.obj is not None:
                # A fatal error takes the same way out: nothing of the scope outlives enforcement.
                try:
                    reaper.ScopeEnd(self.scope_members, self._write, self._now, 0).kill_all(self.scope_members())
                except Exception as e:  # noqa: BLE001  the original error matters more
                    log.error("could not end the scope", error=str(e))
            if self.agent is not None:
                self.agent.stop()
            if self.dns is not None:
                if clean:
                    self.dns.tick(self._write)   # the last answers' events
                self.dns.stop()
                self.summary.dns = self.dns.counters()
            if watchdog is not None:
                watchdog.stand_down()
            if endpoint is not None:
                endpoint.close()
            for s, h in old.items():
                signal.signal(s, h)
            self.summary.duration_s = time.monotonic() - start
            try:
                self.summary.kernel_counters = self.kernel_counters()
            except BpfError:
                pass
            if self.agent is not None:
                self.summary.kernel_counters.update(host_events_dropped=self.agent.dropped,
                                                    host_errors=self.agent.errors)
            with self.lock:
                if rb is not None:
                    rb.close()
                self.obj.close()

    def snapshot(self):
        """The live state for a metrics scrape (another thread); None before the maps exist or
        once they are closed."""
        from assay.metrics import snapshot

        with self.lock:
            if self.obj is None or not self.obj.loaded or self.obj._ptr is None or self._cfg is None:
                return None
            return snapshot(self)

    def _start_agent(self, backend: enforcers.Backend, obj: Object) -> None:
        """The host backend's file and exec rules: fanotify marks, answered on a thread. Until the
        config is written, in_scope() holds nobody in the scope, so every open is let through."""
        if not backend.judges_files_in_userspace or self.plan is None:
            return
        from assay.enforcers.host import HostAgent

        agent = HostAgent(self.plan, self.in_scope, self.decoder.rule_names)
        agent.start()
        self.obj, self.agent = obj, agent   # in_scope() reads the scope map
        for note in agent.notes:
            output.say(f"assay: note: {note}")

    def _drain_agent(self) -> None:
        if self.agent is not None:
            while self.agent.events:
                self._emit(self.agent.events.popleft())

    def _stop_agent(self) -> None:
        """The scope has ended: no answer is owed any more; what the thread judged last is written."""
        if self.agent is not None:
            self.agent.stop()
            self._drain_agent()
            self._start_graceful_kills()

    def in_scope(self, pid: int) -> bool:
        """The kernel's in_scope() (bpf/src/scope.bpf.h), for decisions made here."""
        cfg = self._cfg
        if cfg is None or self.obj is None or pid == cfg.monitor_tgid:
            return False
        if cfg.scope_all:
            return True
        if self.obj.maps["scope_pids"].lookup(ctypes.c_uint32(pid)) is not None:
            return True
        if cfg.scope_cgroup and system.in_cgroup_subtree(pid, self.opts.scope.cgroup):
            self.add_pid(pid)  # seen in the subtree: it stays in scope, as the kernel keeps it
            return True
        return False

    def _ready(self) -> None:
        """Programs are attached and the given pids are in the scope: a launcher may go on."""
        if self.opts.ready_file:
            try:
                notify.write_ready_file(self.opts.ready_file, os.getpid())
            except OSError as e:
                raise UsageError(f"--ready-file {self.opts.ready_file}: {e.strerror}") from None
        notify.sd_notify(f"READY=1\nMAINPID={os.getpid()}")

    def _check_stop_file(self) -> None:
        asked = notify.stop_requested(self.opts.stop_file, self._stop_token)
        if asked:
            self._handle_signal(signal.SIGTERM, None)   # the same way out as SIGTERM
        elif asked is False:
            output.say(f"assay: warning: {self.opts.stop_file} did not hold the stop token: ignored and removed")

    def _end_scope(self, rb: RingBuffer) -> None:
        """The command has exited: wait for what is left in its scope (--wait-all), or end it."""
        if self.opts.wait_all:
            while self.scope_members():
                self._tick(rb)
            return
        end = reaper.ScopeEnd(self.scope_members, self._write, self._now, self.opts.scope_grace)
        end.start()
        while not end.step():
            self._tick(rb)
        self.summary.scope_survivors = end.survivors
