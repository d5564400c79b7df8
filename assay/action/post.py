"""The post step: stop the monitor, write the job summary, and fail the job as fail-on says."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

from assay.action import gha, procs
from assay.errors import AssayError

STOP_TIMEOUT_S = 60.0
ANNOTATIONS = 10        # blocked events shown as ::error:: lines (the summary lists them all)


def _stop(state: dict) -> bool:
    """Writes the stop token where the monitor looks for it; True once the monitor has exited."""
    stop, pid, start = state["stop"], state["pid"], state["start"]
    tmp = f"{stop}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state["token"] + "\n")
    os.replace(tmp, stop)   # the monitor never reads half a token
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not procs.alive(pid, start):
            return True
        time.sleep(0.1)
    return False


def run(env: Mapping[str, str]) -> int:
    from assay import report

    raw = env.get(f"STATE_{gha.STATE}", "")
    if not raw:
        gha.say("assay: the main step started no monitor: nothing to stop or report")
        return 0
    state = json.loads(raw)
    if not _stop(state):
        gha.say(gha.command("error", f"assay: monitor {state['pid']} did not stop within {STOP_TIMEOUT_S:.0f} s"))
    try:
        with open(state["log"], errors="replace") as f:
            monitor_log = f.read().rstrip()
    except OSError:
        monitor_log = ""
    gha.say("::group::assay monitor (stderr)")
    gha.say(monitor_log)
    gha.say("::endgroup::")
    try:
        rep = report.build(report.load(state["events"], state["log"]), env.get("GITHUB_WORKSPACE") or None)
    except AssayError as e:
        gha.say(gha.command("error", f"assay report: {e}"))
        return 1
    summary = env.get("GITHUB_STEP_SUMMARY")
    if summary:
        with open(summary, "a", encoding="utf-8") as f:
            f.write(report.render(rep, "markdown"))
    gha.say(report.render(rep, "text").rstrip())
    if not rep.counts.known:
        gha.say(gha.command("warning", "assay: the monitor wrote no summary (it did not exit cleanly): "
                                       "the event log may be incomplete"))
    for i in [i for i in rep.incidents if i.verdict == "blocked"][:ANNOTATIONS]:
        who = i.chain[0] if i.chain else None
        gha.say(gha.command("error", f"assay: blocked {i.kind} {i.target} (rule {i.rule}) by "
                                     f"{who.name if who else '?'} [{who.pid if who else '?'}]"))
    gha.say(f"assay: events kept at {state['events']}")
    if state.get("fail_on") == "blocked" and rep.blocked:
        gha.say(gha.command("error", f"assay: {rep.blocked} blocked event(s): failing the job (fail-on: blocked)"))
        return 1
    return 0
