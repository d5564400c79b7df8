"""`assay doctor`: checks, by trying them, whether monitoring and enforcement can work here."""
from __future__ import annotations

import ctypes
import os
import platform
import resource
from typing import Callable, List, Optional

import attrs

from assay import enforcers, libbpf, system
from assay.errors import AssayError, EXIT_BPF, EXIT_OK

@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    # False: monitoring still works without it; True: enforcement cannot work without it.
    required: bool = True


def _kernel() -> Check:
    rel = platform.release()
    try:
        major, minor = (int(x) for x in rel.split(".")[:2])
    except ValueError:
        major, minor = 0, 0
    ok = (major, minor) >= (5, 10)
    return Check("kernel", ok, rel, "" if ok else "Assay needs Linux 5.10 or later")


def _btf() -> Check:
    ok = os.path.exists("/sys/kernel/btf/vmlinux")
    return Check("btf", ok, "/sys/kernel/btf/vmlinux" + ("" if ok else " missing"),
                 "" if ok else "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def _lsm() -> Check:
    # Only the lsm backend needs it: fmod_ret enforces without `bpf` in the list.
    lsms = system.active_lsms()
    if not lsms:
        return Check("bpf_lsm", False, "cannot read /sys/kernel/security/lsm", required=False)
    # The fix, where it matters, is on the enforcer_lsm line.
    return Check("bpf_lsm", "bpf" in lsms, "active LSMs: " + ",".join(lsms), required=False)


def _lockdown() -> Check:
    mode = system.lockdown_mode()
    ok = mode != "confidentiality"
    return Check("lockdown", ok, f"mode {mode or 'unknown (no lockdown LSM)'}",
                 "" if ok else "lockdown=confidentiality forbids reading kernel memory from BPF",
                 required=ok is False)


def _libbpf() -> Check:
    try:
        lb = libbpf.load()
    except AssayError as e:
        return Check("libbpf", False, str(e), "apt-get install libbpf1 (or libbpf0 >= 0.3)")
    return Check("libbpf", True, f"{lb.soname} version {lb.version}")


def _caps() -> Check:
    # CAP_BPF(39)+CAP_PERFMON(38)+CAP_SYS_ADMIN(21) or plain root; read the effective set.
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    have_admin = bool(eff & (1 << 21))
    have_bpf = bool(eff & (1 << 39)) and bool(eff & (1 << 38))
    ok = have_admin or have_bpf
    return Check("capabilities", ok, f"CapEff={eff:#x}" + (" (CAP_SYS_ADMIN)" if have_admin else ""),
                 "" if ok else "run as root (sudo assay ...)")


def _memlock() -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    fmt = lambda v: "unlimited" if v == resource.RLIM_INFINITY else f"{v // 1024} KiB"  # noqa: E731
    ok = hard == resource.RLIM_INFINITY or hard >= 64 << 20 or os.geteuid() == 0
    return Check("memlock", ok, f"RLIMIT_MEMLOCK soft={fmt(soft)} hard={fmt(hard)} (raised at load)",
                 "" if ok else "raise the hard memlock limit (ulimit -l unlimited) or run as root")


def _cgroup2() -> Check:
    mounts = system.cgroup2_mounts()
    own = system.own_cgroup2_path()
    return Check("cgroup_v2", bool(mounts), f"mounted at {', '.join(mounts)}; this process: {own}" if mounts
                 else "not mounted", "" if mounts else "mount -t cgroup2 none /sys/fs/cgroup (needed for --cgroup)",
                 required=False)


def _pid_namespace() -> Check:
    initial = system.in_initial_pid_namespace()
    if initial is False:
        return Check("pid_namespace", False, "a PID namespace of its own (a container): the kernel's process ids "
                                             "are not this process's", system.PID_NAMESPACE_FIX)
    return Check("pid_namespace", True, "the host's" if initial else "unknown (/proc/self/ns/pid unreadable)")


def _try_tracepoint(obj_path: str) -> Check:
    """Loads and attaches one tracepoint from the shipped object: monitoring works."""
    from assay.bpf import Object

    try:
        with Object(obj_path) as obj:
            prog = next(p for p in obj.programs.values() if p.section.startswith("tracepoint/"))
            for p in obj.programs.values():
                p.autoload = p is prog
            obj.load()
            if system.ensure_tracefs():
                obj.attach([prog.name])
            return Check("load_tracepoint", True, f"{prog.section} loaded and attached")
    except AssayError as e:
        return Check("load_tracepoint", False, str(e), "see the checks above")


def _try_enforcer(backend: enforcers.Backend, obj_path: str) -> Check:
    """Loads and attaches every decision program of one backend, for real: each must pass this
    kernel's verifier and attach for that backend to enforce."""
    from assay.bpf import Object

    name = f"enforcer_{backend.name}"
    why = backend.precheck()
    if why is not None:
        return Check(name, False, why, backend.refused_fix(), required=False)
    try:
        with enforcers.load_and_attach(lambda: Object(obj_path), backend) as obj:
            sections = [obj.programs[n].section for n in backend.programs(obj)]
        detail = f"{', '.join(sections)} loaded and attached"
        if backend.judges_files_in_userspace:
            detail += ("; fanotify permission events answer file and exec rules (no self-protection against "
                       "a root workload: docs/enforcers.md)")
        return Check(name, True, detail, required=False)
    except AssayError as e:
        return Check(name, False, str(e), backend.refused_fix(), required=False)


def _preemption(chosen: Optional[str]) -> Check:
    """fmod_ret programs are tracing programs: the kernel skips one on a CPU where another task was
    preempted inside it. Only kernels that preempt kernel code (full, lazy) do that."""
    model = system.preemption()
    shown = model or "unknown"
    if chosen == "fmod_ret" and model in system.PREEMPTIBLE:
        return Check("preemption", False, f"model {shown}: a task preempted inside an fmod_ret decision makes "
                     "the kernel skip that decision for the next task on its CPU (the monitor counts them as "
                     "decisions_skipped)", "use the lsm backend (add bpf to the LSM list), or boot with "
                     "preempt=voluntary", required=False)
    return Check("preemption", True, f"model {shown}", required=False)


def run_checks(obj_path: str) -> List[Check]:
    checks = [_kernel(), _btf(), _libbpf(), _caps(), _memlock(), _lsm(), _lockdown(), _cgroup2(), _pid_namespace()]
    if checks[2].ok:
        checks.append(_try_tracepoint(obj_path))
        checks += [_try_enforcer(b, obj_path) for b in enforcers.BACKENDS]
        checks.append(_preemption(enforcer(checks)))
    return checks


def enforcer(checks: List[Check]) -> Optional[str]:
    """The backend `assay monitor --enforcer auto` would pick: the first that works."""
    for b in enforcers.BACKENDS:
        if any(c.name == f"enforcer_{b.name}" and c.ok for c in checks):
            return b.name
    return None


def verdict(checks: List[Check]) -> int:
    """0 when the basics hold and at least one backend enforces; 40 otherwise."""
    basics = all(c.ok or not c.required for c in checks)
    return EXIT_OK if basics and enforcer(checks) else EXIT_BPF


def as_dict(checks: List[Check]) -> dict:
    code = verdict(checks)
    monitoring = all(c.ok for c in checks if c.name in ("kernel", "btf", "libbpf", "capabilities",
                                                      "load_tracepoint"))
    return {"checks": [attrs.asdict(c) for c in checks], "monitoring": monitoring,
            "enforcement": code == EXIT_OK, "enforcer": enforcer(checks) if code == EXIT_OK else None,
            "exit_code": code}


def as_text(checks: List[Check]) -> str:
    lines = []
    # A backend that does not work is a failure only when no other one does.
    none_enforces = enforcer(checks) is None
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required or (none_enforces and c.name.startswith("enforcer_"))
                                    else "warn")
        lines.append(f"[{mark}] {c.name:18} {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"       fix: {c.fix}")
    d = as_dict(checks)
    enforcement = f"available via {d['enforcer']}" if d["enforcement"] else "NOT available (exit 40)"
    lines.append(f"monitoring: {'available' if d['monitoring'] else 'NOT available'}; enforcement: {enforcement}")
    return "\n".join(lines)
