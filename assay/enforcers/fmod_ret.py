"""fmod_ret: the same decisions as BPF_MODIFY_RETURN programs on the kernel's security_* functions.

Works where `bpf` is not an active LSM (stock Ubuntu, GitHub's hosted runners): the kernel allows
fmod_ret on every security_* function (5.7+); it needs BTF and BPF trampolines, nothing else.
"""
from __future__ import annotations

from typing import Optional

from assay.enforcers.base import Backend


def _precheck() -> Optional[str]:
    return None  # nothing to read beforehand: only loading and attaching tells


def _refused_fix() -> str:
    return ("this kernel refuses BPF trampoline programs (fentry/fmod_ret): they need CONFIG_DEBUG_INFO_BTF "
            "and a JIT with trampolines (x86_64 5.7+, arm64 6.0+), and lockdown=confidentiality forbids the "
            "kernel reads the decisions make")


BACKEND = Backend("fmod_ret", "fmod_ret/", "BTF and BPF trampolines (x86_64 5.7+, arm64 6.0+); no LSM list change",
                  _precheck, _refused_fix)
