"""The scope's resolver: a forwarding DNS proxy on a loopback address, UDP and TCP.

Every answer is read (dnspython) before it is passed on. For a name the policy lists, the A and
AAAA records of the chain that starts at it (CNAMEs followed) go into the net tries first, so the
connect that follows the answer already finds its address there. Queries are forwarded as the
client sent them (EDNS0 and all), and answers are passed on byte for byte: a truncated UDP answer
keeps its TC bit and the client asks again over TCP."""
from __future__ import annotations

import collections
import concurrent.futures
import select
import socket
import struct
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Tuple

import attrs
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype

from assay.dns.names import NameRules, canonical
from assay.dns.table import DynamicTable
from assay.dns.upstream import Addr

UPSTREAM_TIMEOUT_S = 2.0   # then SERVFAIL: glibc waits 5 s per try, so the client hears from us first
TCP_IDLE_S = 10.0
MAX_TCP_CLIENTS = 64
WARN_EVERY_S = 5.0
CANDIDATES = tuple(f"127.0.53.{i}" for i in range(1, 255))


@attrs.frozen
class Answer:
    """What one upstream answer says about the name asked (pure: parse_answer)."""
    rcode: str
    addresses: Tuple[Tuple[str, int], ...]   # (address, ttl) of the chain's A/AAAA records
    cnames: Tuple[str, ...]                  # the chain below the name asked
    ttl: Optional[int]                       # the smallest TTL along the chain, None if no address
    truncated: bool


def parse_answer(qname: str, response: dns.message.Message) -> Answer:
    """Follows CNAMEs from `qname` only: a record for another owner in the answer is never taken."""
    chain = [canonical(qname)]
    ttls: List[int] = []
    rrsets = list(response.answer)
    grew = True
    while grew and len(chain) < 16:
        grew = False
        for rr in rrsets:
            if rr.rdtype == dns.rdatatype.CNAME and canonical(rr.name.to_text()) == chain[-1]:
                chain.append(canonical(rr[0].target.to_text()))
                ttls.append(rr.ttl)
                grew = True
                break
    addrs: List[Tuple[str, int]] = []
    for rr in rrsets:
        if rr.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and canonical(rr.name.to_text()) in chain:
            addrs += [(r.address, rr.ttl) for r in rr]
            ttls.append(rr.ttl)
    ttl = min(ttls) if addrs else None
    return Answer(dns.rcode.to_text(response.rcode()), tuple(addrs), tuple(chain[1:]), ttl,
                  bool(response.flags & dns.flags.TC))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


class Proxy:
    def __init__(self, upstream: Addr, rules: NameRules, table: DynamicTable, block: bool = False,
                 warn: Callable[[str], None] = lambda _m: None, clock: Callable[[], object] = time.monotonic_ns):
        self.upstream, self.rules, self.table, self.block = upstream, rules, table, block
        self.warn, self.clock = warn, clock
        self.events: Deque[dict] = collections.deque()
        self.address: Optional[str] = None
        self.failures = 0              # queries answered SERVFAIL because the upstream did not answer
        self.malformed = 0             # queries that could not be read (dropped)
        self._udp = self._tcp = None
        self._pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="assay-dns")
        self._tcp_clients = threading.BoundedSemaphore(MAX_TCP_CLIENTS)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._last_warn = 0.0

    # ---------------------------------------------------------------- life cycle
    def bind(self, candidates=CANDIDATES) -> str:
        """The first loopback address where both UDP and TCP port 53 are free."""
        last = None
        for addr in candidates:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                udp.bind((addr, 53))
                tcp.bind((addr, 53))
                tcp.listen(64)
            except OSError as e:
                last = e
                udp.close()
                tcp.close()
                continue
            self._udp, self._tcp, self.address = udp, tcp, addr
            return addr
        raise OSError(f"no loopback address in 127.0.53.0/24 has port 53 free ({last})")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="assay-dns-proxy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self._pool.shutdown(wait=False)
        for s in (self._udp, self._tcp):
            if s is not None:
                s.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._udp, self._tcp], [], [], 0.2)
            for s in ready:
                if s is self._udp:
                    try:
                        wire, client = self._udp.recvfrom(65535)
                    except OSError:
                        continue
                    self._pool.submit(self._answer_udp, wire, client)
                else:
                    try:
                        conn, client = self._tcp.accept()
                    except OSError:
                        continue
                    if not self._tcp_clients.acquire(blocking=False):
                        conn.close()  # too many at once: the client retries
                        continue
                    threading.Thread(target=self._serve_tcp, args=(conn, client), daemon=True).start()

    def _answer_udp(self, wire: bytes, client) -> None:
        out = self.handle(wire, "udp", client)
        if out is not None:
            try:
                self._udp.sendto(out, client)
            except OSError:
                pass

    def _serve_tcp(self, conn: socket.socket, client) -> None:
        try:
            conn.settimeout(TCP_IDLE_S)
            while not self._stop.is_set():
                (n,) = struct.unpack("!H", _recv_exact(conn, 2))
                out = self.handle(_recv_exact(conn, n), "tcp", client)
                if out is None:
                    return
                conn.sendall(struct.pack("!H", len(out)) + out)
        except (OSError, ConnectionError):
            pass
        finally:
            conn.close()
            self._tcp_clients.release()

    # ---------------------------------------------------------------- one query
    def handle(self, wire: bytes, transport: str, client=None) -> Optional[bytes]:
        """The bytes to send back for one query (None: drop it); entries first, answer second."""
        try:
            query = dns.message.from_wire(wire)
            q = query.question[0]
        except (dns.exception.DNSException, IndexError, ValueError):
            self.malformed += 1
            return None
        name, qtype = canonical(q.name.to_text()), dns.rdatatype.to_text(q.rdtype)
        matches = self.rules.match(name)
        ev = {"type": "dns", "ts": self.clock(), "name": name, "qtype": qtype, "transport": transport,
              "client": f"{client[0]}:{client[1]}" if client else None,
              "rule": matches[0].rule_id if matches else None}
        if self.block and not any(m.map_kind == "allow" for m in matches):
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.NXDOMAIN)
            self._event(ev, rcode="NXDOMAIN", answers=[], cnames=[], ttl=None, inserted=0, blocked=True)
            return reply.to_wire()
        try:
            raw = self._forward(wire, transport)
        except (OSError, ConnectionError, TimeoutError) as e:
            return self._servfail(query, ev, e)
        try:
            response = dns.message.from_wire(raw)
        except dns.exception.DNSException:
            # unreadable: passed on, but nothing is inserted (its addresses stay judged by the rules)
            self._event(ev, rcode="unreadable", answers=[], cnames=[], ttl=None, inserted=0)
            return raw
        if response.id != query.id:
            return self._servfail(query, ev, OSError("the upstream answered another query id"))
        ans = parse_answer(name, response)
        inserted = 0
        for addr, _ttl in ans.addresses:
            self.table.remember(addr, name)
            if matches:
                inserted += self.table.add(addr, ans.ttl, matches)
        self._event(ev, rcode=ans.rcode, answers=sorted({a for a, _ in ans.addresses}), cnames=list(ans.cnames),
                    ttl=ans.ttl, inserted=inserted, **({"truncated": True} if ans.truncated else {}))
        return raw

    def _servfail(self, query, ev, err) -> bytes:
        self.failures += 1
        reason = "timeout" if isinstance(err, (socket.timeout, TimeoutError)) else (
            getattr(err, "strerror", None) or str(err))
        now = time.monotonic()
        if now - self._last_warn >= WARN_EVERY_S:
            self._last_warn = now
            self.warn(f"DNS upstream {self.upstream[0]}:{self.upstream[1]} did not answer {ev['name']} "
                      f"({reason}); the workload got SERVFAIL (failures so far: {self.failures})")
        reply = dns.message.make_response(query)
        reply.set_rcode(dns.rcode.SERVFAIL)
        self._event(ev, rcode="SERVFAIL", answers=[], cnames=[], ttl=None, inserted=0, upstream_error=reason)
        return reply.to_wire()

    def _event(self, ev: dict, **fields) -> None:
        ev.update(fields)
        self.events.append(ev)

    def _forward(self, wire: bytes, transport: str) -> bytes:
        family = socket.AF_INET6 if ":" in self.upstream[0] else socket.AF_INET
        if transport == "tcp":
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(UPSTREAM_TIMEOUT_S)
                s.connect(self.upstream)
                s.sendall(struct.pack("!H", len(wire)) + wire)
                (n,) = struct.unpack("!H", _recv_exact(s, 2))
                return _recv_exact(s, n)
        qid = wire[:2]
        deadline = time.monotonic() + UPSTREAM_TIMEOUT_S
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(self.upstream)       # connected: only the upstream's answers reach us
            s.send(wire)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out")
                s.settimeout(left)
                data = s.recv(65535)
                if data[:2] == qid:
                    return data
