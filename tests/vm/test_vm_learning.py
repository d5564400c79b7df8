"""Learning mode end to end in a real kernel: record 5 runs, profile, generate --mode enforce, enforce."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import tempfile

import pytest

pytestmark = pytest.mark.vm


def sh(assay_cmd, *args, check=True):
    p = subprocess.run(assay_cmd + list(args), capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def test_record_profile_generate_enforce(assay_cmd, tmp_path):
    os.makedirs("/srv", exist_ok=True)
    # Not under /tmp: learning generalises anything below /tmp to /tmp/**.
    data = pathlib.Path(tempfile.mkdtemp(prefix="assay-learn-", dir="/srv"))
    for name in ("config.ini", "input.txt", "extra.txt"):
        (data / name).write_text(name + "\n")
    job = f"cat {data}/config.ini {data}/input.txt > /dev/null"
    profile = tmp_path / "profile.yaml"
    sh(assay_cmd, "profile", "init", "--profile", str(profile), "--name", "vm-job")
    for i in range(5):
        run = tmp_path / f"run{i}.jsonl"
        sh(assay_cmd, "monitor", "-o", "/dev/null", "--record", str(run), "--run-id", f"run-{i}",
           "--", "sh", "-c", job)
        sh(assay_cmd, "profile", "update", "--profile", str(profile), "--input", str(run))
    # merging a run again changes nothing
    again = sh(assay_cmd, "profile", "update", "--profile", str(profile), "--input", str(tmp_path / "run0.jsonl"))
    assert "skip" in again.stdout.lower()
    shown = json.loads(sh(assay_cmd, "profile", "show", "--profile", str(profile), "--format", "json").stdout)
    assert shown["total_runs"] == 5
    policy = tmp_path / "learned.yaml"
    # 5/5 has a Wilson lower bound of 0.57: the gate is set for a five-run profile
    sh(assay_cmd, "generate", "--profile", str(profile), "-o", str(policy), "--mode", "enforce",
       "--min-stability", "0.55", "--review-threshold", "0.5")
    text = policy.read_text()
    assert f"{data}/config.ini" in text and "deny" in text
    sh(assay_cmd, "policy", "validate", str(policy))

    ok = sh(assay_cmd, "monitor", "--policy", str(policy), "-o", str(tmp_path / "ok.jsonl"), "--", "sh", "-c", job,
            check=False)
    assert ok.returncode == 0, ok.stderr
    assert not [json.loads(line) for line in (tmp_path / "ok.jsonl").read_text().splitlines()
                if '"file_blocked"' in line]

    variant = job + f"; cat {data}/extra.txt"
    bad = sh(assay_cmd, "monitor", "--policy", str(policy), "-o", str(tmp_path / "bad.jsonl"), "--", "sh", "-c",
             variant, check=False)
    assert bad.returncode != 0
    blocked = [json.loads(line) for line in (tmp_path / "bad.jsonl").read_text().splitlines()
               if '"file_blocked"' in line]
    assert [e["path"] for e in blocked] == [f"{data}/extra.txt"]
