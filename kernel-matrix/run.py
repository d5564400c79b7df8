#!/usr/bin/env python3
"""Runs the `vm`-marked pytest tests inside every selected matrix row (real kernels under QEMU).

    kernel-matrix/run.py [--kernels 6.1,5.10|all] [-k EXPR] [--timeout S] [-- extra pytest args]

Fetches whatever is not cached yet, boots at most two guests at once, prints a table and writes
it as JSON to .cache/kernel-matrix/results.json. Exits 1 if a row expected to pass did not
(a failed test, an error, a timeout, or no test run at all).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import fetch
import matrix
import payload
import qemu
from matrix import CACHE, Row, write_atomic

MAX_VMS = qemu.MAX_VMS
MAX_BOOTS = 3  # per row, when a boot gives no result


def boot_again(failed_boots: List[dict], boot: "qemu.Boot", timeout: float) -> bool:
    """A second boot always; a third only if the failed boots were cut short (a detected kernel
    hang), so a row never spends much more than two timeouts."""
    spent = sum(f["seconds"] for f in failed_boots) + boot.seconds
    return len(failed_boots) + 1 < MAX_BOOTS and (not failed_boots or spent <= timeout)


def with_only(pytest_args: List[str], only: str) -> List[str]:
    """A row's `only` expression, and-ed with a -k given on the command line."""
    if not only:
        return pytest_args
    args = list(pytest_args)
    if "-k" in args:
        i = args.index("-k")
        args[i + 1] = f"({args[i + 1]}) and ({only})"
        return args
    return args + ["-k", only]


def run_row(row: Row, kernel: dict, rootfs: dict, wheel_dir: Path, deps_dir: Path,
            pytest_args: List[str], tests: str, timeout: Optional[float]) -> dict:
    matrix.say("run", f"{row.id}: booting {kernel['release']} with {row.userland.id} userland")
    pytest_args = with_only(pytest_args, row.only)
    b = qemu.boot_row(row, kernel, rootfs, wheel_dir, deps_dir, pytest_args=pytest_args, tests=tests,
                      timeout=timeout)
    failed_boots = []
    while b.result is None and boot_again(failed_boots, b, timeout or row.timeout):
        # The guest died or hung before reporting (a kernel oops or soft lockup under TCG, not a
        # failed test): boot again, and keep each failed boot in the results. A test that fails
        # is never retried, and a row whose every boot gives no result fails.
        n = len(failed_boots) + 1
        failed = {"problem": b.error, "seconds": round(b.seconds, 1),
                  **qemu.kernel_problem(qemu.console_text(b.console_log)),
                  "console_log": str(b.console_log.rename(b.console_log.with_suffix(f".attempt{n}.log")))}
        failed_boots.append(failed)
        matrix.say("run", f"{row.id}: NO RESULT from boot {n} ({b.error}) during "
                          f"{failed['last_test_started'] or 'no test'}; kernel said: "
                          f"{'; '.join(failed['kernel_messages'][:3]) or 'nothing'}; booting it again")
        b = qemu.boot_row(row, kernel, rootfs, wheel_dir, deps_dir, pytest_args=pytest_args, tests=tests,
                          timeout=timeout)
    res = b.result or {}
    guest = res.get("guest", {})
    report = res.get("report", {})
    counts = report.get("counts", {})
    ran = sum(counts.get(k, 0) for k in ("passed", "failed", "error", "xfailed", "xpassed", "interrupted"))
    problems = []
    if b.result is None:
        problems.append(b.error)
    else:
        if res.get("guest_error"):
            problems.append(f"guest error: {res['guest_error']}")
        if res.get("timed_out"):
            problems.append("tests killed by the guest's own timeout")
        if res.get("report_error"):
            problems.append(res["report_error"])
        bad = {k: counts[k] for k in ("failed", "error", "interrupted") if counts.get(k)}
        if bad:
            problems.append(", ".join(f"{n} {k}" for k, n in bad.items()))
        elif ran == 0:
            problems.append("no test ran")
        elif res.get("exit_code") not in (0, None):
            problems.append(f"pytest exit code {res.get('exit_code')}")
    ok = not problems
    if row.expect == "pass":
        status = "PASS" if ok else "FAIL"
    else:
        status = "XPASS" if ok else "XFAIL"
    entry = {
        "row": row.id, "status": status, "expect": row.expect, "reason": row.reason,
        "problems": problems,
        "kernel_package": kernel["package"], "kernel_version": kernel["version"],
        "kernel_release": guest.get("kernel_release") or kernel["release"],
        "userland": row.userland.id,
        "libbpf": fetch.upstream_version(guest.get("libbpf_version") or rootfs["libbpf_version"]),
        "python": guest.get("python") or rootfs["python_full"],
        "lsm": guest.get("lsm", ""),
        "passed": counts.get("passed", 0) + counts.get("xpassed", 0),
        "failed": counts.get("failed", 0) + counts.get("error", 0) + counts.get("interrupted", 0),
        "skipped": counts.get("skipped", 0) + counts.get("xfailed", 0),
        "counts": counts,
        "seconds": round(b.seconds, 1),
        "guest_seconds": res.get("guest_seconds"),
        "console_log": str(b.console_log),
        "tests": report.get("tests", []),
        "pytest_tail": res.get("tail", []),
        "failed_boots": failed_boots,
        "no_result": qemu.kernel_problem(qemu.console_text(b.console_log)) if b.result is None else None,
    }
    verdict = status if not problems else f"{status} ({'; '.join(problems)})"
    if failed_boots:
        verdict += f" on boot {len(failed_boots) + 1}; " + "; ".join(
            f"boot {i} gave no result: {f['problem']} ({f['console_log']})" for i, f in enumerate(failed_boots, 1))
    if status in ("FAIL", "XFAIL"):
        tail = "\n".join(res.get("tail", [])[-30:]) or qemu.console_tail(b.console_log)
        verdict += f"\n----- {row.id}: last output (full console: {b.console_log}) -----\n{tail}\n-----"
    matrix.say("run", f"{row.id}: {verdict} in {b.seconds:.0f} s")
    return entry


def hang_summary(entry: dict) -> str:
    """For each boot of a row that gave no result: the running test and the kernel's first
    complaint with its trace, printed last, where a CI log's tail shows it."""
    out = ""
    boots = [(f"boot {i}", f) for i, f in enumerate(entry.get("failed_boots") or [], 1)]
    last = len(boots) + 1
    for label, info in boots + [(f"boot {last}", entry.get("no_result"))]:
        if not info:
            continue
        out += (f"\n===== {entry['row']} {label}: no result; test running: "
                f"{info.get('last_test_started') or 'none started'}\n")
        out += "\n".join(info.get("first_problem") or ["(no kernel problem on the console)"]) + "\n"
    return out


def table(entries: List[dict]) -> str:
    head = ["row", "kernel", "userland", "libbpf", "python", "pass", "fail", "skip", "secs", "status"]
    rows = [[e["row"], e["kernel_release"], e["userland"], e["libbpf"], e["python"], str(e["passed"]),
             str(e["failed"]), str(e["skipped"]), f"{e['seconds']:.0f}",
             e["status"] + (f" ({e['reason']})" if e["status"] == "XFAIL" else "")
             + (f" (boot {len(e['failed_boots']) + 1})" if e.get("failed_boots") else "")] for e in entries]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Run the vm tests in every kernel-matrix row.")
    ap.add_argument("--matrix", type=Path, default=matrix.MATRIX_FILE, help="matrix file (default: matrix.yaml)")
    ap.add_argument("--kernels", help="comma separated row ids from matrix.yaml, or `all` "
                    "(default: the rows not marked `default: false`)")
    ap.add_argument("-k", dest="keyword", help="pytest -k expression for the guest run")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, one shell-quoted string")
    ap.add_argument("--tests", default=payload.DEFAULT_TESTS,
                    help=f"test path inside the repo to collect in the guest (default {payload.DEFAULT_TESTS})")
    ap.add_argument("--timeout", type=float, help="seconds before a guest is killed (default: per row)")
    ap.add_argument("--jobs", type=int, default=MAX_VMS, help=f"VMs at once (at most {MAX_VMS})")
    ap.add_argument("--refresh", action="store_true", help="re-resolve the newest kernel packages")
    ap.add_argument("pytest_extra", nargs="*", help="after --: passed to pytest in the guest")
    args = ap.parse_args(argv)

    started = time.monotonic()
    try:
        rows = matrix.select(matrix.load(args.matrix), args.kernels)
        kernels, roots = fetch.fetch(rows, refresh=args.refresh)
        for arch in sorted({r.kernel.arch for r in rows}):
            fetch.ensure_binfmt(arch)  # byte-compiling runs the guest's python3 in its root
        wheel = payload.find_wheel()
        wheel_dir = payload.install_wheel(wheel)
        deps = {}
        for ul in sorted({r.userland.id for r in rows}):
            deps[ul] = payload.ensure_deps(wheel, roots[ul])
            payload.compile_wheel(wheel_dir, roots[ul])
    except (fetch.FetchError, matrix.MatrixError, payload.PayloadError, subprocess.CalledProcessError) as e:
        print(f"matrix setup failed: {e}", file=sys.stderr)
        return 2
    fetched = time.monotonic() - started
    matrix.say("run", f"wheel {wheel.name}; artifacts ready in {fetched:.0f} s; booting {len(rows)} row(s)")

    pytest_args = shlex.split(args.pytest_args) + (["-k", args.keyword] if args.keyword else []) + args.pytest_extra
    jobs = max(1, min(args.jobs, MAX_VMS))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_row, r, kernels[r.kernel.id], roots[r.userland.id], wheel_dir,
                               deps[r.userland.id], pytest_args, args.tests, args.timeout)
                   for r in rows]
        entries = [f.result() for f in futures]

    total = time.monotonic() - started
    print("\n" + table(entries))
    summary = {
        "wheel": wheel.name, "pytest_args": pytest_args, "seconds_total": round(total, 1),
        "seconds_fetch": round(fetched, 1),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": entries,
    }
    out = CACHE / "results.json"  # the latest run's; each run's own copy stays beside its logs
    data = json.dumps(summary, indent=2).encode()
    write_atomic(qemu.run_log_dir() / "results.json", data)
    write_atomic(out, data)
    failed = [e["row"] for e in entries if e["status"] == "FAIL"]
    again = [e["row"] for e in entries if e.get("failed_boots")]
    if again:
        print(f"rows booted again (a boot gave no result; see failed_boots in results.json): "
              f"{', '.join(again)}")
    for e in entries:
        print(hang_summary(e), end="")
    print(f"\nresults: {out}")
    print(f"matrix: {len(entries) - len(failed)}/{len(entries)} rows as expected "
          f"in {total:.0f} s (artifacts {fetched:.0f} s)" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    # The plain closing line CI reads: guest tests summed over every row.
    print(f"guests: {sum(e['passed'] for e in entries)} passed, {sum(e['failed'] for e in entries)} failed, "
          f"{sum(e['skipped'] for e in entries)} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
