"""Policy reload on SIGHUP in real kernels: no gap for what both policies deny, new rules in force
once the reload completes, a bad file leaves the old policy in force (docs/service.md)."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from test_vm_net_exec import loopback_up

pytestmark = pytest.mark.vm
LOOPER = os.path.join(os.path.dirname(__file__), "looper.py")
PY = sys.executable
RELOADS = 50
# The swap is userspace over map syscalls the same on every kernel; the decisions that read the
# maps are each backend's. One lsm and one fmod_ret row prove both, and keep the matrix short.
RELOAD_SERIES = ("6.1",)


def policy_a(d):
    return f"""version: "2.0"
name: reload-a
runtime_monitor:
  enabled: true
  rules:
    - id: both
      type: file_open
      match: {{ path_globs: ["{d}/both.txt"] }}
      action: deny
    - id: old-only
      type: file_open
      match: {{ path_globs: ["{d}/old.txt"] }}
      action: deny
    - id: tree
      type: file_open
      match:
        path_globs: ["{d}/tree/**"]
        not: {{ path_globs: ["{d}/tree/pub/**"] }}
      action: deny
"""


def policy_b(d, typo=False):
    # Other rules first: by position, "both" would now be rule 3 and rule 1 "new-only".
    return f"""version: "2.0"
name: reload-b
runtime_monitor:
  enabled: true
  rules:
    - id: new-only
      type: file_open
      match: {{ path_globs: ["{d}/new.txt"] }}
      action: deny
    - id: watch
      type: file_open
      match: {{ path_globs: ["{d}/tree/pub/watched.txt"] }}
      {"acton" if typo else "action"}: alert
    - id: no-discard
      type: net_connect
      match: {{ dest_globs: ["127.0.0.1:9"] }}
      action: deny
    - id: tree
      type: file_open
      match:
        path_globs: ["{d}/tree/**"]
        not: {{ path_globs: ["{d}/tree/pub/**"] }}
      action: deny
    - id: both
      type: file_open
      match: {{ path_globs: ["{d}/both.txt"] }}
      action: deny
"""


TYPO_LINE = 13   # the `acton:` line of policy_b(typo=True)


def put(path: pathlib.Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def wait_for(pred, timeout, what, proc=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"monitor exited ({proc.returncode}) while waiting for {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Stream:
    """Reads the monitor's stdout as it comes: keeps the policy events, checks a sample of the
    rule events (and keeps some below tmp_path, for the enforcer check every guest test gets)."""

    def __init__(self, pipe, sample_path, rule_of_path):
        self.policy_events = []
        self.rule_events = 0
        self.misnamed = []
        self._pipe, self._sample, self._rule_of = pipe, open(sample_path, "wb"), rule_of_path
        self._kept = 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        for line in self._pipe:
            if b'"type":"policy_' in line:
                self.policy_events.append(json.loads(line))
            elif b'"type":"file_blocked"' in line or b'"type":"file_alert"' in line:
                self.rule_events += 1
                if self.rule_events % 50 == 1:
                    ev = json.loads(line)
                    if self._rule_of.get(ev["path"], ev["rule"]) != ev["rule"]:
                        self.misnamed.append(ev)
                    if self._kept < 500:
                        self._sample.write(line)
                        self._kept += 1
        self._sample.close()

    def join(self):
        self._t.join(30)


@pytest.fixture
def tree():
    # Outside pytest's tmp_path (0700 parents), as in test_vm_enforce.
    d = pathlib.Path(tempfile.mkdtemp(prefix="assay-reload-", dir="/tmp"))
    os.chmod(d, 0o755)
    for name in ("both.txt", "old.txt", "new.txt", "tree/x.txt", "tree/pub/y.txt", "tree/pub/watched.txt"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(name)
    return d


def test_reload_50_times_under_a_tight_open_loop(assay_cmd, tmp_path, tree, vm_row, expected_enforcer):
    if vm_row["kernel_series"] not in RELOAD_SERIES:
        pytest.skip(f"reload runs on the {', '.join(RELOAD_SERIES)} rows (lsm and fmod_ret) only, to keep the matrix short")
    d = tree
    both, tree_x = str(d / "both.txt"), str(d / "tree/x.txt")
    (d / "loop_paths.json").write_text(json.dumps([both, tree_x]))
    (d / "final_paths.json").write_text(json.dumps({
        "paths": [both, tree_x, str(d / "new.txt"), str(d / "old.txt"), str(d / "tree/pub/y.txt"),
                  str(d / "tree/pub/watched.txt")], "connect": 9}))
    pol = d / "policy.yaml"
    put(pol, policy_a(d))
    ready = tmp_path / "ready"
    err = open(tmp_path / "stderr.txt", "w+")
    loopback_up()   # the metrics are scraped over it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(assay_cmd + ["monitor", "--policy", str(pol), "--decisions", "all", "--ready-file",
                                         str(ready), "--metrics-addr", f"127.0.0.1:{port}", "--",
                                         PY, LOOPER, str(d)],
                            stdout=subprocess.PIPE, stderr=err)
    rule_of = {both: "both", tree_x: "tree", str(d / "new.txt"): "new-only", str(d / "old.txt"): "old-only",
               str(d / "tree/pub/watched.txt"): "watch"}
    stream = Stream(proc.stdout, tmp_path / "rule-events-sample.jsonl", rule_of)
    try:
        wait_for(ready.exists, 300, "the monitor's ready file", proc)
        wait_for((d / "looping.json").exists, 60, "the open loop", proc)
        t0 = time.monotonic()
        for i in range(RELOADS):
            put(pol, policy_b(d) if i % 2 else policy_a(d))   # ends with B; the first is A again (no change)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(stream.policy_events) > i, 60, f"reload {i + 1}", proc)
            assert stream.policy_events[i]["type"] == "policy_reloaded", stream.policy_events[i]
        reload_s = time.monotonic() - t0
        (d / "stop").touch()
        wait_for((d / "final.json").exists, 60, "the checks after the reloads", proc)
        # A bad file: the error names its line, and B stays in force.
        put(pol, policy_b(d, typo=True))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(stream.policy_events) > RELOADS, 60, "the bad reload", proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            metrics = r.read().decode()
        (d / "bad-done").touch()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stream.join()
    err.seek(0)
    stderr = err.read()
    assert proc.returncode == 0, stderr
    loop = json.loads((d / "loop.json").read_text())
    print(f"\n{RELOADS} reloads in {reload_s:.1f}s while the loop made {loop['attempts']} open attempts; "
          f"reload durations (s): {[e['duration_s'] for e in stream.policy_events[:RELOADS]]}")
    assert loop["opened"] == {both: 0, tree_x: 0}, loop
    assert min(loop["attempts"].values()) > 1000, loop   # the loop ran all along
    assert stream.misnamed == [], stream.misnamed[:3]
    # The A -> B swaps: rules by id, and map entries both ways.
    ab = stream.policy_events[1]
    assert (ab["policy"], ab["rules_added"], ab["rules_removed"], ab["unchanged"]) == \
        ("reload-b", ["new-only", "watch", "no-discard"], ["old-only"], 2), ab
    assert ab["entries"]["added"] > 0 and ab["entries"]["removed"] > 0, ab
    assert stream.policy_events[0]["entries"] == {"added": 0, "updated": 0, "removed": 0}   # A again: nothing moves
    want = {both: "EPERM", tree_x: "EPERM", str(d / "new.txt"): "EPERM", str(d / "old.txt"): "ok",
            str(d / "tree/pub/y.txt"): "ok", str(d / "tree/pub/watched.txt"): "ok", "connect:9": "EPERM"}
    assert json.loads((d / "final.json").read_text()) == want
    bad = stream.policy_events[RELOADS]
    assert bad["type"] == "policy_reload_failed" and bad["outcome"] == "invalid", bad
    assert bad["error"].startswith(f"{pol}:{TYPO_LINE}:"), bad
    assert f"{pol}:{TYPO_LINE}:" in stderr and "the previous policy stays in force" in stderr
    assert json.loads((d / "after_bad.json").read_text()) == want
    print("the A -> B event:", json.dumps(ab))
    print("the bad reload's event:", json.dumps(bad))
    print("\n".join([l for l in stderr.splitlines() if "reload" in l][-3:]))
    print("\n".join(l for l in metrics.splitlines() if l.startswith("assay_") and not l.endswith(" 0.0")))
    enforcer = expected_enforcer
    for line in (f'assay_enforcer_info{{enforcer="{enforcer}"}} 1.0', 'assay_policy_reloads_total{outcome="success"} 50.0',
                 'assay_policy_reloads_total{outcome="invalid"} 1.0', "assay_policy_last_reload_successful 0.0",
                 'assay_policy_info{name="reload-b"} 1.0', 'assay_policy_rules{type="net_connect"} 1.0'):
        assert line in metrics, line
    hits = [l for l in metrics.splitlines() if l.startswith("assay_rule_events_total{") and 'rule="both"' in l
            and 'type="file_blocked"' in l and 'action="deny"' in l]   # label order differs by client version
    assert hits and float(hits[0].split()[-1]) > 0, hits
    assert re.search(r'assay_map_entries\{map="net_deny4"\} 1\.0', metrics)
    summary = json.loads([l for l in stderr.splitlines() if l.startswith('{"summary"')][-1])["summary"]
    assert summary["events"]["policy_reloaded"] == RELOADS and summary["events"]["policy_reload_failed"] == 1
