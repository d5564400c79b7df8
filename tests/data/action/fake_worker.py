"""A stand-in for the runner's Runner.Worker: it names itself so and runs the job's steps as its children.

usage: fake_worker.py PLAN.json RESULTS.json. PLAN: {"env": {...}, "steps": [{"argv": [...], "env": {...},
"state": true}]}; a step with "state" gets the GITHUB_STATE lines written so far as STATE_<name>, as the
runner gives them to a post step. RESULTS: per step, its exit status, stdout and stderr.
"""
import ctypes
import json
import os
import subprocess
import sys

PR_SET_NAME = 15


def main():
    with open(sys.argv[1]) as f:
        plan = json.load(f)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, b"Runner.Worker", 0, 0, 0)
    base = dict(os.environ, **plan.get("env", {}))
    results = []
    for step in plan["steps"]:
        env = dict(base, **step.get("env", {}))
        if step.get("state") and os.path.exists(base["GITHUB_STATE"]):
            with open(base["GITHUB_STATE"]) as f:
                for line in f:
                    name, _, value = line.rstrip("\n").partition("=")
                    env["STATE_" + name] = value
        p = subprocess.run(step["argv"], env=env, capture_output=True, text=True, timeout=step.get("timeout", 300))
        results.append({"argv": step["argv"], "rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr})
    with open(sys.argv[2], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
