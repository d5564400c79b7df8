"""Cost of open+close under the file_open decision, for both backends (lsm/file_open and
fmod_ret/security_file_open): no BPF, 0 rules, 10k non-matching rules, plus a subtree rule.

All phases run in one process, in one boot, interleaved over several rounds (the machine, or the
emulated VM, is noisy); ratios to the no-BPF baseline are the result. Needs both backends (a matrix
guest with bpf in its LSM list: `make bench-vm`). Usage (root): python bench/open_overhead.py [--ops N] [--rounds R]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from assay import abi, enforce, libbpf  # noqa: E402
from assay.bpf import Object  # noqa: E402
from assay.monitor import default_object_path  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "open_overhead.json")


def time_opens(path: str, n: int) -> float:
    """Seconds per open+close."""
    o, c, flags = os.open, os.close, os.O_RDONLY
    t0 = time.perf_counter()
    for _ in range(n):
        c(o(path, flags))
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rules", type=int, default=10000)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="assay-bench-")
    target = os.path.join(work, "target")
    open(target, "w").close()
    rules_dir = os.path.join(work, "rules")
    os.mkdir(rules_dir)
    other_dir = os.path.join(work, "other-tree")
    os.mkdir(other_dir)
    idents = []
    for i in range(args.rules):
        p = os.path.join(rules_dir, f"f{i}")
        open(p, "w").close()
        idents.append(enforce.identify(p))
    ref = bytes(abi.RuleRef(rule_id=1, action=int(abi.Action.DENY)))

    progs = {"lsm": "lsm_file_open", "fmod_ret": "fmod_file_open"}
    samples = {"no_bpf": []}
    for b in progs:
        samples.update({f"{b}_0_rules": [], f"{b}_10k_rules": [], f"{b}_10k_rules_subtree": []})
    with Object(default_object_path()) as obj:
        for p in obj.programs.values():
            p.autoload = p.name in progs.values()
        obj.load()
        cfg_map = obj.maps["assay_config"]
        # monitor_tgid 0: this very process is in scope (scope_all), as a workload would be
        base = abi.Config(scope_all=1, monitor_tgid=0, enforce=1)

        def configure(file_rules: int) -> None:
            cfg = abi.Config.from_buffer_copy(bytes(base))
            cfg.file_rules = file_rules
            cfg_map.update(ctypes.c_uint32(0), cfg)

        obj.maps["file_deny"].update_many([(k, ref) for ident in idents for k in ident.keys()])
        for k in enforce.identify(other_dir).keys():
            obj.maps["file_deny_dirs"].update(k, ref)
        for _ in range(args.rounds):
            samples["no_bpf"].append(time_opens(target, args.ops))
            for b, name in progs.items():
                link = obj.programs[name].attach()
                try:
                    configure(0)
                    samples[f"{b}_0_rules"].append(time_opens(target, args.ops))
                    configure(abi.RULES_DENY)
                    samples[f"{b}_10k_rules"].append(time_opens(target, args.ops))
                    configure(abi.RULES_DENY | abi.RULES_DENY_DIRS)
                    samples[f"{b}_10k_rules_subtree"].append(time_opens(target, args.ops))
                finally:
                    link.destroy()
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "bench": "open_overhead", "ops_per_sample": args.ops, "rounds": args.rounds, "rules": args.rules,
        "kernel": platform.release(), "python": platform.python_version(), "libbpf": libbpf.load().version,
        "emulated": os.path.exists("/opt/assay/guest"),
        "median_us_per_open_close": {k: round(v * 1e6, 3) for k, v in med.items()},
        "ratio_to_no_bpf": {k: round(v / med["no_bpf"], 3) for k, v in med.items()},
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for k, v in med.items():
        print(f"{k:30} {v * 1e6:8.2f} us/open+close  x{v / med['no_bpf']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
