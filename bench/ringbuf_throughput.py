"""Ring buffer drain rate into Python: full decoding vs an empty callback, side by side in one run.

A workload fills a large ring buffer with real open events while nothing consumes; then the buffer
is drained and timed, alternating the two consumers so machine noise hits both alike.
Usage (root): python bench/ringbuf_throughput.py [--events N] [--rounds R]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from assay import abi, enforcers, events, libbpf, system  # noqa: E402
from assay.bpf import Object, RingBuffer  # noqa: E402
from assay.monitor import default_object_path  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "ringbuf_throughput.json")


def fill(obj, n: int) -> int:
    """Runs a workload in scope doing n opens; returns the workload's pid."""
    r, w = os.pipe()
    code = ("import os,sys\nos.read(0,1)\nfor _ in range(%d):\n    os.close(os.open('/dev/null', os.O_RDONLY))\n" % n)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=r)
    os.close(r)
    obj.maps["scope_pids"].update(ctypes.c_uint32(p.pid), ctypes.c_uint32(1))
    os.write(w, b"x")
    os.close(w)
    p.wait()
    return p.pid


def drain(rb) -> tuple:
    t0 = time.perf_counter()
    n = 0
    while True:
        got = rb.consume()
        if not got:
            break
        n += got
    return n, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    system.ensure_tracefs()
    decoder = events.Decoder()
    decoded = []

    def decode(data: bytes) -> None:
        decoded.append(decoder.decode(data))
        if len(decoded) > 4096:
            decoded.clear()

    rates = {"empty_callback": [], "decode": [], "decode_json": []}
    with Object(default_object_path()) as obj:
        for p in obj.programs.values():
            p.autoload = not enforcers.is_enforcing(p)
        obj.maps["events"].set_max_entries(256 << 20)
        obj.load()
        cfg = abi.Config(monitor_tgid=os.getpid(), event_mask=1 << int(abi.EventType.OPEN))
        obj.maps["assay_config"].update(ctypes.c_uint32(0), cfg)
        obj.attach()
        consumers = {
            "empty_callback": RingBuffer(obj.maps["events"], None, raw=True),
            "decode": RingBuffer(obj.maps["events"], decode),
            "decode_json": RingBuffer(obj.maps["events"], lambda d: events.to_json(decoder.decode(d))),
        }
        drops = 0
        for _ in range(args.rounds):
            for name, rb in consumers.items():
                fill(obj, args.events)
                n, dt = drain(rb)
                rates[name].append(n / dt)
        drops = sum(int.from_bytes(v, "little") for v in obj.maps["counters"].lookup_percpu(ctypes.c_uint32(0)))
        for rb in consumers.values():
            rb.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "bench": "ringbuf_throughput", "events_per_round": args.events, "rounds": args.rounds,
        "kernel": platform.release(), "python": platform.python_version(), "libbpf": libbpf.load().version,
        "median_events_per_s": {k: round(v) for k, v in med.items()},
        "all_events_per_s": {k: [round(x) for x in v] for k, v in rates.items()},
        "ratio_decode_vs_empty": round(med["decode"] / med["empty_callback"], 3),
        "ratio_decode_json_vs_empty": round(med["decode_json"] / med["empty_callback"], 3),
        "kernel_drops": drops, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=2)
    for k, v in med.items():
        print(f"{k:16} {v / 1e6:6.3f} M events/s")
    print(f"decode / empty callback      = {result['ratio_decode_vs_empty']:.3f}")
    print(f"decode+json / empty callback = {result['ratio_decode_json_vs_empty']:.3f}")
    print(f"kernel drops: {drops}; results: {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
