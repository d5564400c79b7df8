"""Cost of open+close under the host backend's fanotify side, natively: no monitor, 0 rules, 10k
exact rules, and a subtree rule on the same filesystem (warm: ignore marks; and a file the kernel
must ask about every time, the worst case).

A child process times os.open + os.close; this process holds the fanotify group (HostAgent) and
answers for it, with the child as the whole scope. The setups run interleaved over several rounds
(this machine is noisy); ratios to "no monitor" in the same run are the result.
Usage (root): python bench/host_open.py [--ops N] [--rounds R] [--rules K]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from assay import abi, enforce  # noqa: E402
from assay.enforcers.host import HostAgent  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "host_open.json")
LOOP = r'''
import os, sys, time
paths, n = sys.argv[2:], int(sys.argv[1])
o, c, flags = os.open, os.close, os.O_RDONLY
sys.stdin.read(1)                        # the agent is ready
t0 = time.perf_counter()
for i in range(n):
    c(o(paths[i % len(paths)], flags))
print((time.perf_counter() - t0) / n)
'''


def plan_of(entries):
    return enforce.Plan(tuple(entries), (), {1: "bench"}, {})


def one(plan, paths, n) -> float:
    """Seconds per open+close in a child, with an agent for `plan` (None: no monitor)."""
    child = subprocess.Popen([sys.executable, "-c", LOOP, str(n), *paths], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    agent = None
    try:
        if plan is not None:
            agent = HostAgent(plan, lambda pid: pid == child.pid, {1: "bench"})
            agent.start()
        child.stdin.write("x")
        child.stdin.flush()
        out = child.communicate(timeout=600)[0]
    finally:
        if agent is not None:
            agent.stop()
    return float(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rules", type=int, default=10000)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="assay-bench-host-", dir="/var/tmp")
    rules_dir, other, protected = (os.path.join(work, d) for d in ("rules", "other", "protected"))
    for d in (rules_dir, other, protected):
        os.mkdir(d)
    targets = []
    for i in range(1000):   # distinct files, as a build opens them
        p = os.path.join(other, f"t{i}")
        open(p, "w").close()
        targets.append(p)
    linked = os.path.join(other, "linked")
    open(linked, "w").close()
    os.link(linked, linked + "-2")  # two names: never given an ignore mark, judged at every open
    exact = []
    for i in range(args.rules):
        p = os.path.join(rules_dir, f"f{i}")
        open(p, "w").close()
        exact.append(enforce.Entry("file_deny", enforce.identify(p), 1, abi.Action.DENY, p))
    subtree = [enforce.Entry("file_deny_dirs", enforce.identify(protected), 1, abi.Action.DENY, protected)]
    setups = {
        "no_monitor": (None, targets),
        "host_0_rules": (plan_of([]), targets),
        "host_10k_exact": (plan_of(exact), targets),
        "host_subtree_same_fs": (plan_of(subtree), targets),
        "host_subtree_every_open_judged": (plan_of(subtree), [linked]),
    }
    samples = {k: [] for k in setups}
    one(None, targets, args.ops)   # warm-up: caches, CPU frequency
    names = list(setups)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:   # each round in another order
            plan, paths = setups[name]
            samples[name].append(one(plan, paths, args.ops))
    base = statistics.median(samples["no_monitor"])
    # each round's own ratio to its own no-monitor run, then the median: the machine's drift
    # between rounds cancels out
    paired = {k: statistics.median(s / b for s, b in zip(v, samples["no_monitor"])) for k, v in samples.items()}
    result = {
        "bench": "host_open", "date": time.strftime("%Y-%m-%d"), "kernel": platform.release(),
        "ops": args.ops, "rounds": args.rounds, "rules": args.rules,
        "us_per_op": {k: round(statistics.median(v) * 1e6, 3) for k, v in samples.items()},
        "ratio_to_no_monitor": {k: round(paired[k], 3) for k in samples},
        "note": "host_0_rules makes no mark at all, so its ratio is the run's noise",
        "target": "host_10k_exact <= 1.05",
    }
    result["target_met"] = result["ratio_to_no_monitor"]["host_10k_exact"] <= 1.05
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
