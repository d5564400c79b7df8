"""Enforcement backends behind one interface (base.Backend), and the choice among them."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Set, Tuple

from assay.enforcers import fmod_ret, host, lsm
from assay.enforcers.base import Backend
from assay.errors import BpfError, UsageError

# Auto tries them in this order: the LSM hook where bpf is an active LSM, then fmod_ret, then
# the host backend (cgroup programs and fanotify) where BPF trampolines are unavailable.
BACKENDS: Tuple[Backend, ...] = (lsm.BACKEND, fmod_ret.BACKEND, host.BACKEND)
CHOICES = ("auto",) + tuple(b.name for b in BACKENDS)


def candidates(choice: str) -> List[Backend]:
    if choice == "auto":
        return list(BACKENDS)
    for b in BACKENDS:
        if b.name == choice:
            return [b]
    raise UsageError(f"--enforcer: invalid value {choice!r} (choose {', '.join(CHOICES)})")


def is_enforcing(program) -> bool:
    return any(b.owns(program) for b in BACKENDS)


# The decisions each kind of rule needs, by hook (a program's name without its lsm_/fmod_ prefix).
# The scope's fork check is always needed; self-protection's while it is on.
HOOKS_FOR = {
    "file": {"file_open", "inode_rename", "inode_link"},
    "exec": {"bprm_check", "mmap_file", "file_mprotect", "inode_rename", "inode_link"},
    "net": {"socket_connect", "socket_sendmsg", "socket_setsockopt", "sctp_bind_connect"},
    "scope": {"task_alloc"},
    "protect": {"bpf", "bpf_map", "bpf_prog", "task_kill", "ptrace_access_check", "file_open", "kernel_read_file",
                "kernel_load_data", "sb_mount", "move_mount", "sb_pivotroot", "fs_context_parse_param"},
}


# The host backend's programs (cgroup hooks), by kind: its file and exec rules need none.
HOST_HOOKS_FOR = {"net": {"connect4", "connect6", "sendmsg4", "sendmsg6", "setsockopt"}}


def hook_of(program) -> str:
    return program.name.split("_", 1)[1]


def needed_hooks(kinds: Iterable[str]) -> Set[str]:
    """The hooks a policy with these kinds of rules (file, exec, net, protect) needs, for every
    backend (each loads those of its own programs)."""
    kinds = list(kinds)
    return set().union(HOOKS_FOR["scope"], *(HOOKS_FOR[k] for k in kinds),
                       *(HOST_HOOKS_FOR.get(k, set()) for k in kinds))


def select_programs(obj, backend: Optional[Backend], hooks: Optional[Set[str]] = None) -> None:
    """Loads the event programs plus `backend`'s decision programs (none for None), only those
    for `hooks` when given: each decision not loaded is one the verifier need not check."""
    for p in obj.programs.values():
        if is_enforcing(p):
            p.autoload = backend is not None and backend.owns(p) and (hooks is None or hook_of(p) in hooks)


def load_and_attach(open_object: Callable[[], object], backend: Backend, hooks: Optional[Set[str]] = None):
    """Opens a fresh object with `backend`'s programs, loads it and attaches them. The decisions
    do nothing until the config map says so, so attaching before configuring is harmless."""
    obj = open_object()
    try:
        select_programs(obj, backend, hooks)
        obj.load()
        obj.attach([p.name for p in obj.programs.values() if backend.owns(p) and p.autoload])
    except BaseException:
        obj.close()
        raise
    return obj


def choose(choice: str, open_object: Callable[[], object], hooks: Optional[Set[str]] = None,
           then: Optional[Callable[[Backend, object], None]] = None) -> Tuple[object, Backend, List[str]]:
    """The first backend of `choice` whose programs load and attach here, its loaded object, and
    why each one tried before it could not be used. Raises BpfError (exit 40) with one line per
    backend when none works: a policy is never left unenforced. `then` finishes a backend's
    set-up once its programs are attached; its BpfError passes over to the next backend."""
    reasons: List[str] = []
    for b in candidates(choice):
        why = b.precheck()
        if why is None:
            try:
                obj = load_and_attach(open_object, b, hooks)
            except BpfError as e:
                why = str(e)
            else:
                try:
                    if then is not None:
                        then(b, obj)   # what else the backend needs (the host backend's marks)
                    return obj, b, reasons
                except BpfError as e:
                    obj.close()
                    why = str(e)
        reasons.append(f"{b.name}: {why}")
    raise BpfError("no enforcement backend works on this kernel, so the policy cannot be enforced:\n  "
                   + "\n  ".join(reasons) + "\n(see `assay doctor`)")
