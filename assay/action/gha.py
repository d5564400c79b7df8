"""The runner's side of the contract: inputs from INPUT_*, and the GITHUB_STATE/ENV/OUTPUT files."""
from __future__ import annotations

import os
from typing import Mapping, Optional

import attrs

from assay.errors import UsageError

MODES = ("audit", "enforce")
FAIL_ON = ("blocked", "none")
STATE = "ASSAY"        # the post step reads it back as STATE_ASSAY


def _input(env: Mapping[str, str], name: str, default: str = "") -> str:
    # The runner upper-cases the name and keeps hyphens (INPUT_FAIL-ON); the launcher adds INPUT_FAIL_ON,
    # since a shell between it and us drops names with hyphens.
    key = f"INPUT_{name.upper()}"
    return (env.get(key) or env.get(key.replace("-", "_")) or "").strip() or default


@attrs.frozen
class Inputs:
    policy: Optional[str]
    mode: str
    scope_pid: Optional[int]
    fail_on: str
    events: Optional[str]


def read_inputs(env: Mapping[str, str]) -> Inputs:
    mode = _input(env, "mode", "audit")
    if mode not in MODES:
        raise UsageError(f"input mode: {mode!r} is not one of {', '.join(MODES)}")
    fail_on = _input(env, "fail-on", "blocked")
    if fail_on not in FAIL_ON:
        raise UsageError(f"input fail-on: {fail_on!r} is not one of {', '.join(FAIL_ON)}")
    pid_text = _input(env, "scope-pid")
    pid = None
    if pid_text:
        if not pid_text.isdigit() or int(pid_text) < 1:
            raise UsageError(f"input scope-pid: {pid_text!r} is not a process id")
        pid = int(pid_text)
    return Inputs(_input(env, "policy") or None, mode, pid, fail_on, _input(env, "events") or None)


def append(env: Mapping[str, str], var: str, name: str, value: str) -> bool:
    """name=value into the file $var names (GITHUB_STATE, GITHUB_ENV, GITHUB_OUTPUT), if set."""
    path = env.get(var)
    if not path:
        return False
    if "\n" in value or "\n" in name:
        raise ValueError(f"{name}: one line only")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{name}={value}\n")
    return True


def command(kind: str, message: str) -> str:
    """A workflow command line (::error::, ::warning::, ::notice::) with the data escaped as GitHub does."""
    data = message.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return f"::{kind}::{data}"


def say(line: str) -> None:
    print(line, flush=True)


def runner_temp(env: Mapping[str, str]) -> str:
    return env.get("RUNNER_TEMP") or "/tmp"


def privileged_prefix(env: Mapping[str, str]) -> list:
    """sudo, unless we are root already; PYTHONPATH survives it (sudo resets the environment)."""
    if os.geteuid() == 0:
        return []
    pre = ["sudo", "-n"]
    if env.get("PYTHONPATH"):
        pre += ["env", f"PYTHONPATH={env['PYTHONPATH']}"]
    return pre
