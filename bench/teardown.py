"""Detaching the monitor's links: one after another vs side by side, alternated in one run, plus
the wall time of a whole `assay monitor -- true` (start-up, the command, teardown).

Usage (root): python bench/teardown.py [--rounds R]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from assay import enforcers, libbpf, system  # noqa: E402
from assay.bpf import Object, destroy_all  # noqa: E402
from assay.monitor import default_object_path, skip_missing_tracepoints  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "teardown.json")


def detach_time(side_by_side: bool, tracefs: str) -> tuple:
    with Object(default_object_path()) as obj:
        skip_missing_tracepoints(obj, tracefs)
        enforcers.select_programs(obj, None)   # the event programs: what every run attaches
        obj.load()
        links = list(obj.attach())
        t0 = time.perf_counter()
        if side_by_side:
            destroy_all(links)
        else:
            for link in links:
                link.destroy()
        dt = time.perf_counter() - t0
        obj.links.clear()
    return len(links), dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tracefs = system.ensure_tracefs()
    times = {"serial": [], "side_by_side": [], "monitor_true": []}
    links = 0
    assay = [sys.executable, "-m", "assay", "monitor", "--output", "/dev/null", "--", "true"]
    for _ in range(args.rounds):
        links, dt = detach_time(False, tracefs)
        times["serial"].append(dt)
        _, dt = detach_time(True, tracefs)
        times["side_by_side"].append(dt)
        t0 = time.perf_counter()
        subprocess.run(assay, check=True, capture_output=True)
        times["monitor_true"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "bench": "teardown", "rounds": args.rounds, "links": links, "kernel": platform.release(),
        "python": platform.python_version(), "libbpf": libbpf.load().version,
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "ratio_side_by_side_vs_serial": round(med["side_by_side"] / med["serial"], 3),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
    print(f"{links} links: serial {med['serial']:.3f} s, side by side {med['side_by_side']:.3f} s "
          f"(ratio {result['ratio_side_by_side_vs_serial']:.3f}); `assay monitor -- true` {med['monitor_true']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
