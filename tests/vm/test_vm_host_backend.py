"""The host backend (--enforcer host) in every guest kernel: where its cgroup programs load, it
denies a file and a connect; where they cannot (helpers cgroup programs lack before 6.1), the
policy exits 40 with the verifier's reason, before the workload runs."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from test_vm_net_exec import loopback_up

pytestmark = [pytest.mark.vm, pytest.mark.enforcer("host")]
PY = sys.executable


def test_vm_host_backend_denies_or_refuses_clearly(assay_cmd, tmp_path, vm_row):
    loopback_up()
    secret = tmp_path / "secret"
    secret.write_text("s3cret")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    pol = tmp_path / "p.yaml"
    pol.write_text('version: "2.0"\nname: host\nruntime_monitor:\n  enabled: true\n  rules:\n'
                   f"    - id: s\n      type: file_open\n      match: {{ path_globs: ['{secret}'] }}\n      action: deny\n"
                   f"    - id: n\n      type: net_connect\n      match: {{ dest_globs: ['127.0.0.1:{port}'] }}\n"
                   "      action: deny\n")
    marker = tmp_path / "ran"
    job = (f"touch {marker}; cat {secret}; {PY} -c 'import socket; socket.create_connection((\"127.0.0.1\", {port}))'"
           "; exit 0")
    evs = tmp_path / "ev.jsonl"
    try:
        p = subprocess.run(assay_cmd + ["monitor", "--enforcer", "host", "--policy", str(pol), "-o", str(evs),
                                        "--", "sh", "-c", job], capture_output=True, text=True, timeout=120)
    finally:
        srv.close()
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    if (major, minor) < (6, 1):
        assert p.returncode == 40, p.stderr
        assert "\n  host: " in p.stderr and "Traceback" not in p.stderr
        assert not marker.exists()
        return
    assert p.returncode == 0, p.stderr
    assert "s3cret" not in p.stdout and "Operation not permitted" in p.stderr
    events = [json.loads(line) for line in evs.read_text().splitlines()]
    blocked = {(e["type"], e["rule"], e["enforcer"]) for e in events if e["type"].endswith("_blocked")}
    assert blocked == {("file_blocked", "s", "host"), ("net_blocked", "n", "host")}
