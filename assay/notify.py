"""Launchers: readiness (sd_notify, --ready-file) and a stop request that only the launcher can make (--stop-file)."""
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


def take_stop_token(path: str) -> str:
    """Reads the secret a launcher left at PATH and removes the file; the launcher stops the monitor
    later by writing the same secret there. Signals cannot serve: self-protection refuses every
    signal from the scope, and a launcher's post step (a GitHub Action's) runs in the scope."""
    with open(path, "rb") as fh:
        token = fh.read(4096).strip()
    os.unlink(path)
    if len(token) < 16:
        raise ValueError("the token must be at least 16 bytes")
    return token.decode("ascii", "replace")


def stop_requested(path: str, token: str) -> Optional[bool]:
    """None while PATH is absent; True once it holds the token; False (and removed) if it holds
    anything else, so a wrong guess is reported once and costs the next guess a new write."""
    try:
        with open(path, "rb") as fh:
            got = fh.read(4096).strip().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        return False
    if got == token:
        return True
    try:
        os.unlink(path)
    except OSError:
        pass
    return False
