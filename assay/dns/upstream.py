"""Where the proxy forwards: --dns-upstream ADDR[:PORT], or the host's first nameserver."""
from __future__ import annotations

import ipaddress
import re
from typing import List, Tuple

from assay.errors import UsageError

Addr = Tuple[str, int]


def parse_upstream(text: str) -> Addr:
    """`ADDR`, `ADDR:PORT`, `[V6]:PORT` or a bare v6 address; port 53 by default."""
    m = re.fullmatch(r"\[([^\]]+)\](?::([0-9]{1,5}))?", text)
    host, port = (m.group(1), m.group(2)) if m else (text, None)
    if not m and text.count(":") == 1:
        host, port = text.split(":")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--dns-upstream: {text!r} is not ADDR[:PORT] (an IP address, e.g. 10.0.0.2, "
                         f"10.0.0.2:5353 or [fd00::53]:53)") from None
    p = 53 if port is None else int(port)
    if not 1 <= p <= 65535:
        raise UsageError(f"--dns-upstream: port {p} is out of range (1..65535)")
    return str(ip), p


def nameservers(text: str) -> List[str]:
    out = []
    for line in text.splitlines():
        parts = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                out.append(str(ipaddress.ip_address(parts[1].split("%", 1)[0])))
            except ValueError:
                continue
    return out


def host_upstream(path: str = "/etc/resolv.conf") -> Addr:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            servers = nameservers(f.read())
    except OSError as e:
        raise UsageError(f"cannot read {path} for the DNS upstream ({e.strerror}); give --dns-upstream ADDR") from None
    if not servers:
        raise UsageError(f"{path} names no nameserver; give --dns-upstream ADDR")
    return servers[0], 53


def scope_resolv_conf(original: str, server: str) -> str:
    """The resolv.conf the command sees: only the proxy as nameserver; search and options kept."""
    kept = [line for line in original.splitlines()
            if line.split()[:1] and line.split()[0] in ("search", "domain", "options")]
    return "\n".join(["# written by assay monitor: this scope's resolver is its DNS proxy (docs/egress.md)",
                      f"nameserver {server}", *kept]) + "\n"
