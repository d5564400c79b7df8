"""The interface every enforcement backend implements: where the kernel-side decisions attach."""
from __future__ import annotations

from typing import Callable, List, Optional

import attrs


@attrs.frozen
class Backend:
    """One way of attaching the shipped decision programs. The decisions themselves are the same
    BPF code for every backend (bpf/src/*.bpf.h); a backend only names the programs it loads."""

    name: str
    section_prefix: str                        # ELF section prefix of its programs in the object
    needs: str                                 # what the kernel must offer, for people
    precheck: Callable[[], Optional[str]]      # why it cannot work here without trying, or None
    refused_fix: Callable[[], str]             # what to do when the kernel refuses its programs
    judges_files_in_userspace: bool = False    # file and exec rules answered by the monitor (host)

    def owns(self, program) -> bool:
        return program.section.startswith(self.section_prefix)

    def programs(self, obj) -> List[str]:
        return [p.name for p in obj.programs.values() if self.owns(p)]
