"""Generalisation: values that differ from run to run by construction map to one learned key."""
from __future__ import annotations

import re

from assay.learning.constants import PATH_CLASSES


_PROC_PID = re.compile(r"^/proc/(?:\d+|self|thread-self)(?:/|$)")
_PTS = re.compile(r"^/dev/pts/\d+$")
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")


def generalise(kind: str, value: str) -> str:
    """Map a recorded value to the profile key it is learned under (see docs/learning.md).

    Only what differs from run to run by construction is collapsed, and only to forms the policy
    schema can express (an exact path or a /dir/** subtree):
      /proc/<pid>/..., /proc/self/..., /proc/thread-self/...  -> /proc/**
      /dev/pts/<n>                                            -> /dev/pts/**
      anything below /tmp, /var/tmp, /dev/shm                 -> /tmp/** (etc.): files created by the
                                                                 workload are new inodes every run
    """
    if kind not in PATH_CLASSES or not value.startswith("/"):
        return value
    if _PROC_PID.match(value):
        return "/proc/**"
    if _PTS.match(value):
        return "/dev/pts/**"
    for d in SCRATCH_DIRS:
        if value.startswith(d + "/"):
            return d + "/**"
    return value


def is_relative(kind: str, value: str) -> bool:
    return kind in PATH_CLASSES and not value.startswith("/")
