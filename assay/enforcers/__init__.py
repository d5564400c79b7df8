"""Enforcement backends behind one interface (base.Backend), and the choice among them."""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from assay.enforcers import fmod_ret, lsm
from assay.enforcers.base import Backend
from assay.errors import BpfError, UsageError

# Auto tries them in this order: the LSM hook where bpf is an active LSM, then fmod_ret.
BACKENDS: Tuple[Backend, ...] = (lsm.BACKEND, fmod_ret.BACKEND)
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


def select_programs(obj, backend: Optional[Backend]) -> None:
    """Loads the event programs plus only `backend`'s decision programs (none for None)."""
    for p in obj.programs.values():
        if is_enforcing(p):
            p.autoload = backend is not None and backend.owns(p)


def load_and_attach(open_object: Callable[[], object], backend: Backend):
    """Opens a fresh object with `backend`'s programs, loads it and attaches them. The decisions
    do nothing until the config map says so, so attaching before configuring is harmless."""
    obj = open_object()
    try:
        select_programs(obj, backend)
        obj.load()
        obj.attach(backend.programs(obj))
    except BaseException:
        obj.close()
        raise
    return obj


def choose(choice: str, open_object: Callable[[], object]) -> Tuple[object, Backend, List[str]]:
    """The first backend of `choice` whose programs load and attach here, its loaded object, and
    why each one tried before it could not be used. Raises BpfError (exit 40) with one line per
    backend when none works: a policy is never left unenforced."""
    reasons: List[str] = []
    for b in candidates(choice):
        why = b.precheck()
        if why is None:
            try:
                return load_and_attach(open_object, b), b, reasons
            except BpfError as e:
                why = str(e)
        reasons.append(f"{b.name}: {why}")
    raise BpfError("no enforcement backend works on this kernel, so the policy cannot be enforced:\n  "
                   + "\n  ".join(reasons) + "\n(see `assay doctor`)")
