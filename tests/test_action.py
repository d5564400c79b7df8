"""The GitHub Action's scripts run as the runner runs them: node main.js and post.js under a fake
Runner.Worker, with INPUT_* and the runner's files, the job's "steps" being the worker's later children."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "data" / "action"))
from job import REPO, Job  # noqa: E402

NODE = shutil.which("node")
MAIN, POST = [NODE or "node", str(REPO / "action" / "main.js")], [NODE or "node", str(REPO / "action" / "post.js")]
DATA = REPO / "tests" / "data" / "report"
needs_node = pytest.mark.skipif(NODE is None, reason="needs node (the runner's node20) on PATH")


@pytest.fixture
def assay_bin(tmp_path):
    """install: false uses the `assay` on PATH: this checkout's, through this interpreter."""
    d = tmp_path / "bin"
    d.mkdir()
    w = d / "assay"
    w.write_text(f"#!/bin/sh\nexec {sys.executable} -m assay \"$@\"\n")
    w.chmod(0o755)
    return str(d)


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                srv.accept()[0].close()
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


def _enforcement_available() -> bool:
    return subprocess.run([sys.executable, "-m", "assay", "doctor"], capture_output=True).returncode == 0


def _host_only() -> bool:
    """Only the host backend enforces here (no BPF trampolines): as on GitHub's hosted runners."""
    p = subprocess.run([sys.executable, "-m", "assay", "doctor", "--format", "json"], capture_output=True, text=True)
    return json.loads(p.stdout).get("enforcer") == "host"


@needs_node
@pytest.mark.root
def test_steps_are_in_the_log_outsiders_are_not_and_the_summary_is_written(tmp_path, assay_bin, listener):
    job = Job(tmp_path)
    (job.ws / "src.txt").write_text("source")
    step = ["sh", "-c", f"cat {job.ws}/src.txt > /dev/null; echo built > {job.ws}/out.txt; "
                        f"{sys.executable} -c 'import socket; socket.create_connection((\"127.0.0.1\", {listener})).close()'"]
    main, s1, post = job.run(MAIN, POST, [step], {"install": "false", "mode": "audit"}, extra_path=assay_bin)
    assert main["rc"] == 0, main
    assert "assay: monitor" in main["stdout"] and "attached" in main["stdout"]
    if not _enforcement_available():
        assert "::warning::assay: enforcement is unavailable on this runner; monitoring only" in main["stdout"]
    assert s1["rc"] == 0 and post["rc"] == 0, (s1, post)
    evs = job.events()
    assert [e for e in evs if e["type"] == "open" and e["path"] == f"{job.ws}/src.txt" and e["comm"] == "cat"]
    assert [e for e in evs if e["type"] == "open" and e["path"] == f"{job.ws}/out.txt" and "O_WRONLY" in e["flags"]]
    assert [e for e in evs if e["type"] == "connect" and e["port"] == listener and e["ret"] == 0]
    assert not [e for e in evs if e.get("path", "").endswith("outsider-marker")], "a process outside the job leaked in"
    assert all(e["pid"] != os.getpid() for e in evs)
    summary = job.read("summary.md")
    assert summary.startswith("## Assay: nothing blocked or alerted\n")
    assert f"| <code>127.0.0.1:{listener}</code> |  | 1 | 0 | 0 |" in summary
    assert f"### Files written under <code>{job.ws}</code> (1)" in summary and f"<code>{job.ws}/out.txt</code>" in summary
    assert "| 0 | 0 | 0 |" in summary                    # dropped, lost, not written: the summary line was read
    assert "/usr/bin/cat" in summary or "cat (" in summary
    assert f"events=" in job.read("output") and Path(job.events_path()).exists()   # kept for upload
    assert "assay: events kept at" in post["stdout"]


@needs_node
@pytest.mark.root
def test_enforce_mode_with_a_policy_no_backend_enforces_fails_with_40(tmp_path, assay_bin):
    """A subtree on /proc: the trampoline backends would judge it, the host backend cannot watch it.
    Where neither trampoline backend loads (this host), the monitor exits 40 and main with it."""
    if _enforcement_available() and not _host_only():
        pytest.skip("this kernel runs BPF trampoline programs, which enforce a /proc subtree")
    pol = tmp_path / "p.yaml"
    pol.write_text('version: "2.0"\nname: t\nruntime_monitor:\n  rules:\n    - id: no-sysctl\n      type: file_open\n'
                   '      match: { path_globs: ["/proc/sys/**"] }\n      action: deny\n')
    job = Job(tmp_path)
    main, post = job.run(MAIN, POST, [], {"install": "false", "mode": "enforce", "policy": str(pol)},
                         extra_path=assay_bin)
    assert main["rc"] == 40, main
    assert "rule no-sysctl: the host backend cannot watch /proc/sys" in main["stdout"]
    assert "::error::assay: the monitor exited with status 40 before it was ready" in main["stdout"]
    assert post["rc"] == 0 and "started no monitor" in post["stdout"]


@needs_node
@pytest.mark.root
def test_enforce_mode_blocks_a_later_step_and_post_fails_the_job(tmp_path, assay_bin):
    """As on a hosted runner (no BPF LSM, no trampolines here): the host backend denies a later
    step a file and a connect; post lists both and fails the job."""
    if not _enforcement_available():
        pytest.skip("no backend enforces here (assay doctor): the guests show this case")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    pol = tmp_path / "policy.yaml"
    pol.write_text('version: "2.0"\nname: ci\nruntime_monitor:\n  rules:\n'
                   f'    - id: no-secret\n      type: file_open\n      match: {{ path_globs: ["{secret}"] }}\n'
                   '      action: deny\n'
                   f'    - id: no-exfil\n      type: net_connect\n      match: {{ dest_globs: ["127.0.0.1:{port}"] }}\n'
                   '      action: deny\n')
    job = Job(tmp_path)
    step = ["sh", "-c", f"cat {secret}; {sys.executable} -c 'import socket; "
                        f"socket.create_connection((\"127.0.0.1\", {port}))'; echo done"]
    try:
        main, s1, post = job.run(MAIN, POST, [step], {"install": "false", "mode": "enforce", "policy": str(pol)},
                                 extra_path=assay_bin)
    finally:
        srv.close()
    assert main["rc"] == 0, main
    assert "attached: enforcing" in main["stdout"]
    assert "Operation not permitted" in s1["stderr"] and "s3cret" not in s1["stdout"], s1
    assert post["rc"] == 1, post
    assert f"::error::assay: blocked file {secret} (rule no-secret)" in post["stdout"]
    assert f"::error::assay: blocked net 127.0.0.1:{port} (rule no-exfil)" in post["stdout"]
    summary = job.read("summary.md")
    assert summary.startswith("## Assay: 2 blocked, 0 alerted\n"), summary[:300]
    evs = job.events()
    assert {e["enforcer"] for e in evs if e["type"] in ("file_blocked", "net_blocked")} == {"host"}


@needs_node
@pytest.mark.parametrize("fail_on,rc", [("blocked", 1), ("none", 0)])
def test_fail_on_decides_the_post_steps_status(tmp_path, fail_on, rc):
    # A monitor that has already exited (pid 0 is never alive), and a log with one blocked connect.
    job = Job(tmp_path)
    state = {"pid": 2 ** 22 + 1, "start": 0, "events": str(DATA / "events.jsonl"), "log": str(DATA / "monitor.log"),
             "stop": str(tmp_path / "stop"), "token": "t" * 64, "fail_on": fail_on, "mode": "enforce", "policy": None}
    env = dict(os.environ, **job.env(), STATE_ASSAY=json.dumps(state),
               STATE_ASSAY_CMD=json.dumps([sys.executable, "-m", "assay"]))
    p = subprocess.run(POST, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == rc, p.stdout + p.stderr
    assert "::error::assay: blocked net 127.0.0.1:9 (rule no-discard) by /usr/bin/python3 [28690]" in p.stdout
    assert ("failing the job (fail-on: blocked)" in p.stdout) == (fail_on == "blocked")
    assert job.read("summary.md").startswith("## Assay: 1 blocked, 1 alerted\n")


@needs_node
@pytest.mark.parametrize("inputs,message", [
    ({"mode": "block"}, "input mode: 'block' is not one of audit, enforce"),
    ({"fail-on": "alerts"}, "input fail-on: 'alerts' is not one of blocked, none"),
    ({"scope-pid": "x1"}, "input scope-pid: 'x1' is not a process id"),
    ({"mode": "enforce"}, "mode enforce needs a policy"),
    ({"install": "maybe"}, "input install: 'maybe' is not true or false"),
])
def test_bad_inputs_fail_main_with_a_message(tmp_path, assay_bin, inputs, message):
    job = Job(tmp_path)
    env = dict(os.environ, **job.env(assay_bin), **{f"INPUT_{k.upper()}": v for k, v in inputs.items()})
    env.setdefault("INPUT_INSTALL", "false")
    p = subprocess.run(MAIN, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and message in p.stdout, p.stdout + p.stderr
    assert "Traceback" not in p.stdout + p.stderr


def test_audit_mode_refuses_a_policy_that_denies(tmp_path):
    pol = tmp_path / "p.yaml"
    pol.write_text('version: "2.0"\nname: t\nruntime_monitor:\n  rules:\n    - id: r1\n      type: net_connect\n'
                   '      match: { dest_globs: ["9"] }\n      action: deny\n')
    env = dict(os.environ, INPUT_POLICY=str(pol), INPUT_MODE="audit", RUNNER_TEMP=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "assay", "action", "main"], env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "mode audit, but the policy denies (r1)" in p.stdout, p.stdout + p.stderr


def test_scope_pid_default_needs_a_runner_worker(tmp_path):
    env = dict(os.environ, RUNNER_TEMP=str(tmp_path))
    p = subprocess.run([sys.executable, "-m", "assay", "action", "main"], env=env, capture_output=True, text=True)
    assert p.returncode == 1 and "no ancestor process is named Runner.Worker" in p.stdout, p.stdout
