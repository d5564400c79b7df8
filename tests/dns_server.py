"""A tiny authoritative DNS server for the tests (dnspython), UDP and TCP on one loopback address.

`zone` maps a lower-case name to [(type, value, ttl)], and may be changed while it runs (the
learning test rotates addresses). A CNAME is answered with its chain, as a recursive resolver
would. UDP answers longer than the client's limit (512, or its EDNS0 size) carry the TC bit."""
from __future__ import annotations

import socket
import struct
import threading
from typing import Dict, List, Tuple

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

Zone = Dict[str, List[Tuple[str, str, int]]]


def answer(zone: Zone, query: dns.message.Message) -> dns.message.Message:
    reply = dns.message.make_response(query)
    q = query.question[0]
    name = q.name.to_text().rstrip(".").lower()
    want = dns.rdatatype.to_text(q.rdtype)
    seen = 0
    while name in zone and seen < 8:
        seen += 1
        recs = zone[name]
        cname = [r for r in recs if r[0] == "CNAME"]
        if cname:
            _t, target, ttl = cname[0]
            reply.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", "CNAME", target + "."))
            name = target
            continue
        for typ, value, ttl in recs:
            if typ == want:
                reply.answer.append(dns.rrset.from_text(name + ".", ttl, "IN", typ, value))
        return reply
    if not seen:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    return reply


class Server:
    def __init__(self, zone: Zone, host: str = "127.0.0.77"):
        self.zone, self.host = zone, host
        self.queries: List[Tuple[str, str, str]] = []      # (transport, name, type)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((host, 0))
        self.port = self.udp.getsockname()[1]
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((host, self.port))
        self.tcp.listen(16)
        self._stop = False
        for target in (self._serve_udp, self._serve_tcp):
            threading.Thread(target=target, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def _reply(self, wire: bytes, transport: str) -> bytes:
        query = dns.message.from_wire(wire)
        q = query.question[0]
        self.queries.append((transport, q.name.to_text().rstrip("."), dns.rdatatype.to_text(q.rdtype)))
        reply = answer(self.zone, query)
        limit = 65535 if transport == "tcp" else max(512, query.payload if query.edns >= 0 else 512)
        out = reply.to_wire()
        if len(out) > limit:
            reply.answer = []
            reply.flags |= dns.flags.TC
            out = reply.to_wire()
        return out

    def _serve_udp(self) -> None:
        while not self._stop:
            try:
                wire, client = self.udp.recvfrom(65535)
                self.udp.sendto(self._reply(wire, "udp"), client)
            except OSError:
                return
            except Exception:  # noqa: BLE001  a bad query must not stop the server
                continue

    def _serve_tcp(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                try:
                    (n,) = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))
                    out = self._reply(conn.recv(n, socket.MSG_WAITALL), "tcp")
                    conn.sendall(struct.pack("!H", len(out)) + out)
                except Exception:  # noqa: BLE001
                    continue

    def close(self) -> None:
        self._stop = True
        self.udp.close()
        self.tcp.close()
