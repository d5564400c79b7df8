"""The GitHub Action in enforce mode, in a guest that enforces: a later step is denied a file and a
connect, and the post step fails the job and lists both. Guests have no node, so this drives the two
commands main.js and post.js run after installing (`assay action main`, `assay action post`)."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data" / "action"))
from job import Job  # noqa: E402

pytestmark = pytest.mark.vm
PY = sys.executable
ROW = "6.1-fmod_ret"   # the LSM list of GitHub's hosted runners; one row keeps the matrix fast


def test_vm_action_enforce_blocks_a_later_step_and_post_fails_the_job(tmp_path, vm_row):
    if vm_row["id"] != ROW:
        pytest.skip(f"runs in row {ROW} only (the hosted runners' LSM list); every row pays for each guest test")
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
    step = ["sh", "-c", f"cat {secret}; {PY} -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))'; "
                        "echo done"]
    try:
        main, s1, post = job.run([PY, "-m", "assay", "action", "main"], [PY, "-m", "assay", "action", "post"],
                                 [step], {"mode": "enforce", "policy": str(pol)})
    finally:
        srv.close()
    assert main["rc"] == 0, main
    assert "attached: enforcing" in main["stdout"]
    assert "Operation not permitted" in s1["stderr"] and "s3cret" not in s1["stdout"], s1
    assert "PermissionError" in s1["stderr"]
    assert post["rc"] == 1, post
    assert f"::error::assay: blocked file {secret} (rule no-secret) by /usr/bin/cat" in post["stdout"]
    assert f"::error::assay: blocked net 127.0.0.1:{port} (rule no-exfil)" in post["stdout"]
    assert "2 blocked event(s): failing the job (fail-on: blocked)" in post["stdout"]
    summary = job.read("summary.md")
    assert summary.startswith("## Assay: 2 blocked, 0 alerted\n"), summary[:300]
    assert f"file <code>{secret}</code>" in summary and f"net <code>127.0.0.1:{port}</code>" in summary
    assert "← <code>/usr/bin/sh</code>" in summary and "Runner.Worker" in summary
    evs = job.events()
    assert {e["type"] for e in evs} >= {"file_blocked", "net_blocked"}
    assert not [e for e in evs if e.get("path", "").endswith("outsider-marker")]
