"""Monitor orchestration: load and scope the BPF object, run the workload, stream its events."""
from __future__ import annotations

import collections
import ctypes
import os
import signal
import sys
import time
from importlib import resources
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import attrs
import structlog

from assay import abi, enforce, enforcers, events, system
from assay.bpf import Object, RingBuffer
from assay.errors import BpfError, UsageError

log = structlog.get_logger("assay.monitor")

ALL_EVENTS = tuple(t for t in abi.EventType)
GRACE_S = 5.0


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


@attrs.define
class Summary:
    counts: Dict[str, int] = attrs.Factory(collections.Counter)
    kernel_counters: Dict[str, int] = attrs.Factory(dict)
    duration_s: float = 0.0
    exit_status: Optional[int] = None
    enforcer: Optional[str] = None    # the backend that enforced the policy, None without one

    @property
    def dropped(self) -> int:
        return self.kernel_counters.get("ringbuf_drop", 0)

    def as_dict(self) -> dict:
        return {"events": dict(sorted(self.counts.items())), "total": sum(self.counts.values()),
                "dropped": self.dropped, "lost": {k: v for k, v in self.kernel_counters.items()
                                                 if k != "ringbuf_drop" and v},
                "duration_s": round(self.duration_s, 3), "exit_status": self.exit_status,
                "enforcer": self.enforcer}

    def as_text(self) -> str:
        per = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "none"
        lost = ", ".join(f"{k}={v}" for k, v in self.kernel_counters.items() if k != "ringbuf_drop" and v)
        text = (f"assay: {sum(self.counts.values())} events ({per}); dropped={self.dropped}"
                f"{'; lost: ' + lost if lost else ''}; duration={self.duration_s:.2f}s"
                f"{'; enforcer=' + self.enforcer if self.enforcer else ''}")
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
        self._out: Optional[TextIO] = None
        self.plan: Optional[enforce.Plan] = None
        self.net_plan: Optional[enforce.NetPlan] = None
        self._kills: Dict[int, tuple] = {}   # pid -> (pidfd, SIGKILL deadline, rule)

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
            obj, self.backend, passed_over = enforcers.choose(self.opts.enforcer, open_object)
            self.decoder.enforcer = self.summary.enforcer = self.backend.name
            why = f" ({'; '.join(passed_over)})" if passed_over else ""
            print(f"assay: enforcing via {self.backend.name}{why}", file=sys.stderr)
        self.obj = obj
        return obj

    def prepare_policy(self) -> None:
        """Resolves rules to inodes before anything is loaded: a bad rule costs nothing (exit 1)."""
        if self.opts.policy is None:
            return
        self.plan = enforce.plan(self.opts.policy)
        self.net_plan = enforce.plan_net(self.opts.policy)
        for note in self.plan.notes:
            print(f"assay: note: {note}", file=sys.stderr)
        for host, addrs in self.opts.policy.resolved_hosts().items():
            print(f"assay: note: {host} resolved to {', '.join(addrs)}", file=sys.stderr)
        self.decoder.rule_names = self.plan.rule_names
        if self.plan.needs_lsm or self.net_plan.bits:
            self.enforce = True

    def configure(self, cgroup_id: Optional[int], extra: Optional[Callable[[abi.Config], None]] = None) -> None:
        cfg = abi.Config()
        cfg.scope_all = int(self.opts.scope.all)
        cfg.scope_cgroup = int(cgroup_id is not None)
        cfg.cgroup_id = cgroup_id or 0
        cfg.monitor_tgid = os.getpid()
        cfg.event_mask = sum(1 << int(t) for t in self.opts.events)
        cfg.enforce = int(self.enforce)
        if self.plan is not None:
            enforce.apply(self.plan, self.obj.maps)
            enforce.apply_net(self.net_plan, self.obj.maps)
            cfg.file_rules = self.plan.rule_bits("file")
            cfg.exec_rules = self.plan.rule_bits("exec")
            cfg.net_rules = self.net_plan.bits
        if extra:
            extra(cfg)
        self.obj.maps["assay_config"].update(ctypes.c_uint32(0), cfg)

    def add_pid(self, pid: int) -> None:
        self.obj.maps["scope_pids"].update(ctypes.c_uint32(pid), ctypes.c_uint32(1))

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
        return out

    # ------------------------------------------------------------ run
    def _spawn(self, argv: Sequence[str]) -> int:
        """Starts argv already in scope: the child waits on a pipe until its pid is in the map."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(w)
                if os.read(r, 1) != b"x":
                    os._exit(126)  # the monitor died before scoping us: never run unobserved
                os.close(r)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGPIPE, signal.SIG_DFL)
                os.execvp(argv[0], list(argv))
            except OSError as e:
                os.write(2, f"assay: cannot run {argv[0]}: {e.strerror}\n".encode())
                os._exit(127 if e.errno == 2 else 126)
            finally:
                os._exit(126)
        os.close(r)
        try:
            self.add_pid(pid)
        except BaseException:
            os.close(w)  # child sees EOF and exits without running the command
            os.waitpid(pid, 0)
            raise
        os.write(w, b"x")
        os.close(w)
        return pid

    def _handle_signal(self, signum, _frame) -> None:
        self._stop = True
        if self._child:
            try:
                os.kill(self._child, signum)
            except ProcessLookupError:
                pass

    def _emit(self, data: bytes) -> None:
        ev = self.decoder.decode(data)
        self._write(ev)
        if ev.get("action") == "kill_graceful":
            self._start_graceful_kill(ev)

    def _start_graceful_kill(self, ev: dict) -> None:
        pid = ev["pid"]
        if pid in self._kills:
            return
        try:
            pidfd = os.pidfd_open(pid)  # holds the process: a recycled pid is never signalled
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except (OSError, AttributeError) as e:
            log.warning("graceful kill failed", pid=pid, error=str(e))
            return
        grace = self.plan.kill_graceful.get(ev["rule_id"], 3000) / 1000.0 if self.plan else 3.0
        self._kills[pid] = (pidfd, time.monotonic() + grace, ev["rule"])
        self._write(self._kill_event(ev, pid, "SIGTERM"))

    def _kill_event(self, ev: dict, pid: int, sig: str) -> dict:
        return {"type": "process_killed", "ts": self.decoder.timestamp(time.monotonic_ns()), "pid": pid,
                "comm": ev.get("comm", ""), "signal": sig, "rule": ev.get("rule", "")}

    def _reap_graceful_kills(self) -> None:
        now = time.monotonic()
        for pid, (pidfd, deadline, rule) in list(self._kills.items()):
            if now < deadline:
                continue
            del self._kills[pid]
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                self._write(self._kill_event({"rule": rule}, pid, "SIGKILL"))
            except ProcessLookupError:
                pass  # it obeyed SIGTERM in time
            finally:
                os.close(pidfd)

    def _write(self, ev: dict) -> None:
        self.summary.counts[ev["type"]] += 1
        if self.on_event is not None:
            self.on_event(ev)
        if self._out is not None:
            self._out.write((events.to_json(ev) if self.opts.fmt == "json" else events.to_text(ev)) + "\n")

    def run(self, out: Optional[TextIO] = None) -> int:
        """Loads, scopes, runs; returns the exit code (the command's status when there is one)."""
        opts = self.opts
        if not (opts.scope.pids or opts.scope.cgroup or opts.scope.all or opts.command):
            raise UsageError("nothing to monitor: give --pid, --cgroup, --all or -- COMMAND")
        for pid in opts.scope.pids:
            if not os.path.exists(f"/proc/{pid}"):
                raise UsageError(f"--pid {pid}: no such process")
        self.prepare_policy()
        cgroup_id = self.resolve_cgroup()
        self.load()
        self._out = out
        start = time.monotonic()
        old = {s: signal.signal(s, self._handle_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        rb = None
        try:
            self.configure(cgroup_id)
            for pid in opts.scope.pids:
                self.add_pid(pid)
            for _ in range(2):  # a second pass catches children forked during the first
                for pid in opts.scope.pids:
                    for d in descendants(pid):
                        self.add_pid(d)
            rb = RingBuffer(self.obj.maps["events"], self._emit)
            self.obj.attach()
            log.info("monitoring", pid=os.getpid(), scope=attrs.asdict(opts.scope),
                     enforcer=self.backend.name if self.backend else None)
            if opts.command:
                self._child = self._spawn(opts.command)
            deadline = start + opts.duration if opts.duration else None
            status = None
            stop_at = None
            while True:
                rb.poll(100)
                if self._kills:
                    self._reap_graceful_kills()
                if out is not None:
                    out.flush()
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
            rb.consume()
            self.summary.exit_status = status
            return status if status is not None else 0
        except BrokenPipeError:
            # the reader went away (e.g. `| head`): stop quietly, like other CLI tools
            sys.stdout = open(os.devnull, "w")
            return 0
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.summary.duration_s = time.monotonic() - start
            try:
                self.summary.kernel_counters = self.kernel_counters()
            except BpfError:
                pass
            if rb is not None:
                rb.close()
            self.obj.close()
