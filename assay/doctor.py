"""`assay doctor`: checks, by trying them, whether monitoring and enforcement can work here."""
from __future__ import annotations

import ctypes
import os
import platform
import resource
from typing import Callable, List, Optional

import attrs

from assay import libbpf, system
from assay.errors import AssayError, EXIT_BPF, EXIT_OK

LSM_FIX = ("add `bpf` to the kernel's LSM list: boot with lsm=lockdown,capability,landlock,yama,apparmor,bpf "
           "(GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub and reboot)")


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
    lsms = system.active_lsms()
    if not lsms:
        return Check("bpf_lsm", False, "cannot read /sys/kernel/security/lsm", LSM_FIX)
    ok = "bpf" in lsms
    return Check("bpf_lsm", ok, "active LSMs: " + ",".join(lsms), "" if ok else LSM_FIX)


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


def _try_load(kind: str, obj_path: str) -> Check:
    """Loads from the shipped object, by trying it: one tracepoint, or every LSM hook (each must
    pass this kernel's verifier for enforcement to work)."""
    from assay.bpf import Object

    name = "load_tracepoint" if kind == "tracepoint" else "load_lsm"
    try:
        with Object(obj_path) as obj:
            progs = [p for p in obj.programs.values() if p.is_lsm]
            if kind == "tracepoint":
                progs = [next(p for p in obj.programs.values() if p.section.startswith("tracepoint/"))]
            for p in obj.programs.values():
                p.autoload = p in progs
            obj.load()
            if kind == "lsm" or system.ensure_tracefs():
                obj.attach([p.name for p in progs])
            return Check(name, True, f"{', '.join(p.section for p in progs)} loaded and attached")
    except AssayError as e:
        fix = LSM_FIX if kind == "lsm" and not system.bpf_lsm_active() else "see `assay doctor` checks above"
        if kind == "lsm" and system.bpf_lsm_active():
            fix = ("this kernel refuses BPF trampoline programs (lsm/fentry); "
                   "check lockdown and CONFIG_BPF_LSM / CONFIG_DEBUG_INFO_BTF")
        return Check(name, False, str(e), fix)


def run_checks(obj_path: str) -> List[Check]:
    checks = [_kernel(), _btf(), _libbpf(), _caps(), _memlock(), _lsm(), _lockdown(), _cgroup2()]
    if checks[2].ok:
        checks.append(_try_load("tracepoint", obj_path))
        checks.append(_try_load("lsm", obj_path))
    return checks


def verdict(checks: List[Check]) -> int:
    return EXIT_OK if all(c.ok or not c.required for c in checks) else EXIT_BPF


def as_dict(checks: List[Check]) -> dict:
    code = verdict(checks)
    monitoring = all(c.ok for c in checks if c.name in ("kernel", "btf", "libbpf", "capabilities",
                                                      "load_tracepoint"))
    return {"checks": [attrs.asdict(c) for c in checks], "monitoring": monitoring,
            "enforcement": code == EXIT_OK, "exit_code": code}


def as_text(checks: List[Check]) -> str:
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.required else "warn")
        lines.append(f"[{mark}] {c.name:16} {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"       fix: {c.fix}")
    d = as_dict(checks)
    lines.append(f"monitoring: {'available' if d['monitoring'] else 'NOT available'}; "
                 f"enforcement: {'available' if d['enforcement'] else 'NOT available (exit 40)'}")
    return "\n".join(lines)
