"""BPF LSM: the decisions as `lsm/<hook>` programs; needs `bpf` in the active LSM list."""
from __future__ import annotations

from typing import Optional

from assay import system
from assay.enforcers.base import Backend

ENABLE_FIX = ("add `bpf` to the kernel's LSM list: boot with lsm=lockdown,capability,landlock,yama,apparmor,bpf "
              "(GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub and reboot)")


def _precheck() -> Optional[str]:
    lsms = system.active_lsms()
    if not lsms:
        return "cannot read the active LSM list (/sys/kernel/security/lsm)"
    if "bpf" not in lsms:
        return f"bpf is not an active LSM (active: {','.join(lsms)})"
    return None


def _refused_fix() -> str:
    if _precheck():
        return ENABLE_FIX
    return ("this kernel refuses BPF trampoline programs (lsm/fentry/fmod_ret): it needs CONFIG_BPF_LSM, "
            "CONFIG_DEBUG_INFO_BTF and a JIT with trampolines (x86_64; arm64 from 6.0)")


BACKEND = Backend("lsm", "lsm/", "CONFIG_BPF_LSM, `bpf` in the active LSM list (lsm= boot parameter), BTF",
                  _precheck, _refused_fix)
