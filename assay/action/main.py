"""The main step: check the host, start the monitor on the job's process tree, wait until it is attached."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from typing import List, Mapping, Optional, Tuple

from assay.action import gha, procs
from assay.errors import EXIT_BPF, EXIT_USAGE, AssayError

READY_TIMEOUT_S = 120.0      # loading the decisions takes seconds on a runner, a minute under emulation


def _assay() -> List[str]:
    return [sys.executable, "-m", "assay"]


def doctor(env: Mapping[str, str]) -> Tuple[int, List[str]]:
    """Runs `assay doctor` as the monitor will run (privileged); returns its status and FAIL lines."""
    p = subprocess.run(gha.privileged_prefix(env) + _assay() + ["doctor"], capture_output=True, text=True)
    gha.say("::group::assay doctor")
    gha.say((p.stdout + p.stderr).rstrip())
    gha.say("::endgroup::")
    lines = (p.stdout + p.stderr).splitlines()
    fails = [ln.strip() for i, ln in enumerate(lines) if ln.startswith("[FAIL]") or
             (ln.strip().startswith("fix:") and i and lines[i - 1].startswith("[FAIL]"))]
    return p.returncode, fails


def _blocking_rules(policy: str) -> List[str]:
    from assay.policy import load_policy
    return [r.id for r in load_policy(policy).rules if r.blocks]


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _wait_ready(proc: subprocess.Popen, ready: str, timeout: float) -> Optional[int]:
    """The monitor's pid once it wrote the ready file; None if it exited or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(ready):
            with open(ready) as f:
                return int(f.read().strip())
        if proc.poll() is not None:
            return None
        time.sleep(0.1)
    return None


def run(env: Mapping[str, str]) -> int:
    try:
        inp = gha.read_inputs(env)
        blocking = _blocking_rules(inp.policy) if inp.policy else []
    except AssayError as e:
        gha.say(gha.command("error", f"assay: {e}"))
        return e.exit_code
    if inp.mode == "enforce" and not inp.policy:
        gha.say(gha.command("error", "assay: mode enforce needs a policy (input policy)"))
        return EXIT_USAGE
    if inp.mode == "audit" and blocking:
        gha.say(gha.command("error", f"assay: mode audit, but the policy denies ({', '.join(blocking)}): "
                                     "use mode: enforce, or give those rules action: alert"))
        return EXIT_USAGE
    scope = inp.scope_pid or procs.find_ancestor()
    if scope is None:
        gha.say(gha.command("error", f"assay: no ancestor process is named {procs.WORKER_COMM} (not on a "
                                     "GitHub runner?): set the input scope-pid"))
        return EXIT_USAGE
    status, fails = doctor(env)
    policy = inp.policy
    if status != 0 and inp.mode == "enforce":
        for line in fails:
            gha.say(gha.command("error", f"assay doctor: {line}"))
        gha.say(gha.command("error", "assay: mode enforce, but no backend can enforce on this runner (exit 40)"))
        return EXIT_BPF
    if status != 0:
        what = "monitoring without the policy (its alert rules need a backend)" if policy else "monitoring only"
        gha.say(gha.command("warning", f"assay: enforcement is unavailable on this runner; {what}"))
        policy = None

    base = os.path.join(gha.runner_temp(env), "assay")
    os.makedirs(base, mode=0o700, exist_ok=True)
    events = os.path.abspath(inp.events or os.path.join(base, "events.jsonl"))
    ready, stop, log = (os.path.join(base, n) for n in ("ready", "stop", "monitor.log"))
    for f in (ready, stop):
        if os.path.exists(f):
            os.unlink(f)
    token = secrets.token_hex(32)
    _write_private(stop, token + "\n")
    argv = gha.privileged_prefix(env) + _assay() + ["monitor", "--pid", str(scope), "-o", events,
                                                    "--ready-file", ready, "--stop-file", stop]
    if policy:
        argv += ["--policy", os.path.abspath(policy)]
    gha.say(f"assay: starting {' '.join(argv)}")
    with open(log, "wb") as logf:
        # its own session, so the end of this step does not end it; its stderr holds the summary
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=logf,
                                start_new_session=True, cwd="/")
    timeout = float(env.get("ASSAY_ACTION_READY_TIMEOUT", READY_TIMEOUT_S))
    pid = _wait_ready(proc, ready, timeout)
    with open(log, errors="replace") as f:
        text = f.read().rstrip()
    if pid is None:
        if proc.poll() is None:
            proc.kill()
            gha.say(gha.command("error", f"assay: the monitor was not ready after {timeout:.0f} s"))
            return EXIT_BPF
        gha.say(text)
        code = proc.returncode
        for line in (fails if code == EXIT_BPF else []):
            gha.say(gha.command("error", f"assay doctor: {line}"))
        gha.say(gha.command("error", f"assay: the monitor exited with status {code} before it was ready"))
        return code or EXIT_BPF
    if text:
        gha.say(text)
    st = procs.stat(pid)
    state = {"pid": pid, "start": st[2] if st else 0, "events": events, "log": log, "stop": stop,
             "token": token, "fail_on": inp.fail_on, "mode": inp.mode, "policy": policy}
    gha.append(env, "GITHUB_STATE", gha.STATE, json.dumps(state, separators=(",", ":")))
    gha.append(env, "GITHUB_ENV", "ASSAY_EVENTS", events)
    gha.append(env, "GITHUB_OUTPUT", "events", events)
    how = f"enforcing {policy}" if policy and inp.mode == "enforce" else \
        f"auditing with {policy}" if policy else "monitoring (no policy)"
    gha.say(f"assay: monitor {pid} attached: {how}; scope: process {scope} ({procs.WORKER_COMM}) "
            f"and every later step; events to {events}")
    return 0
