"""Readiness: tell a service manager (sd_notify) or a launcher (--ready-file) that programs are attached."""
from __future__ import annotations

import os
import socket
from typing import Optional

import structlog

log = structlog.get_logger("assay.notify")


def sd_notify(state: str, env: Optional[dict] = None) -> bool:
    """Sends STATE to $NOTIFY_SOCKET (systemd's protocol: one datagram, '@' is the abstract
    namespace). False where no manager listens; a failure is logged, never raised."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("sd_notify failed", socket=addr, error=str(e))
        return False


def write_ready_file(path: str, pid: int) -> None:
    """Writes the monitor's pid to PATH atomically: a reader that sees the file sees all of it."""
    tmp = f"{path}.{pid}.tmp"
    with open(tmp, "w") as fh:
        fh.write(f"{pid}\n")
    os.replace(tmp, path)
