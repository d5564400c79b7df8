#!/usr/bin/env python3
"""Boots one matrix row and runs a shell command in the guest, streaming the console.

    kernel-matrix/demo.py [--row 6.1] [--cmd 'assay doctor']

The guest is the same as in `make matrix` (the built wheel and its deps installed, BPF LSM
active, running as root). Exits with the command's exit status.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from typing import List, Optional

import fetch
import matrix
import payload
import qemu

DEFAULT_CMD = "uname -r; cat /sys/kernel/security/lsm; echo; python3 -m assay --help"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Boot one kernel-matrix row and run a command in it.")
    ap.add_argument("--row", default="6.1", help="row id from matrix.yaml (default 6.1)")
    ap.add_argument("--cmd", default=DEFAULT_CMD, help="shell command to run in the guest, as root")
    ap.add_argument("--timeout", type=float, default=600, help="seconds before the guest is killed")
    args = ap.parse_args(argv)
    try:
        (row,) = matrix.select(matrix.load(), args.row)
        kernels, roots = fetch.fetch([row])
        wheel = payload.find_wheel()
        rootfs = roots[row.userland.id]
        deps = payload.ensure_deps(wheel, rootfs)
        wheel_dir = payload.install_wheel(wheel)
        payload.compile_wheel(wheel_dir, rootfs)
    except (fetch.FetchError, matrix.MatrixError, payload.PayloadError, subprocess.CalledProcessError) as e:
        print(f"demo setup failed: {e}", file=sys.stderr)
        return 2
    kernel = kernels[row.kernel.id]
    print(f"[demo] booting {kernel['release']} ({row.userland.id} userland) under QEMU/TCG", flush=True)
    b = qemu.boot_row(row, kernel, rootfs, wheel_dir, deps, mode="cmd", cmd=args.cmd,
                      timeout=args.timeout, echo=True)
    if b.result is None:
        print(f"\n[demo] no result from the guest: {b.error} (console: {b.console_log})", file=sys.stderr)
        return 2
    rc = b.result.get("exit_code")
    print(f"[demo] command exited {rc}; VM ran {b.seconds:.0f} s", flush=True)
    return rc if isinstance(rc, int) and 0 <= rc < 256 else 1


if __name__ == "__main__":
    sys.exit(main())
