"""Run under the monitor: resolve names through the system resolver, connect, report as JSON.

argv: RESULTS.json STEP... where STEP is resolve:NAME[:4|6], connect:ADDR:PORT (v6 in brackets),
sleep:SECONDS, dial:NAME:PORT (resolve, then connect to the first address), query:NAME:TYPE
(dnspython, UDP to the resolv.conf nameserver, then TCP if the answer is truncated) or
resolvconf (this namespace's /etc/resolv.conf)."""
import json
import socket
import sys
import time


def connect(addr, port):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(3)
    try:
        s.connect((addr, port))
        return "ok"
    except OSError as e:
        return f"errno={e.errno}" if e.errno else type(e).__name__
    finally:
        s.close()


def resolve(name, fam):
    family = {"4": socket.AF_INET, "6": socket.AF_INET6}.get(fam, socket.AF_UNSPEC)
    t0 = time.monotonic()
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
        return {"addrs": sorted({i[4][0] for i in infos}), "s": round(time.monotonic() - t0, 2)}
    except socket.gaierror as e:
        return {"error": e.args[1] if len(e.args) > 1 else str(e), "s": round(time.monotonic() - t0, 2)}


out = []
for step in sys.argv[2:]:
    kind, _, rest = step.partition(":")
    if kind == "sleep":
        time.sleep(float(rest))
        out.append(None)
    elif kind == "resolve":
        name, _, fam = rest.partition(":")
        out.append(resolve(name, fam))
    elif kind == "connect":
        addr, _, port = rest.rpartition(":")
        out.append(connect(addr.strip("[]"), int(port)))
    elif kind == "query":
        import dns.flags, dns.message, dns.query
        name, _, typ = rest.partition(":")
        server = [l.split()[1] for l in open("/etc/resolv.conf") if l.startswith("nameserver")][0]
        q = dns.message.make_query(name, typ)
        r = dns.query.udp(q, server, timeout=5)
        res = {"tc": bool(r.flags & dns.flags.TC)}
        if res["tc"]:
            r = dns.query.tcp(q, server, timeout=5)
        res["addrs"] = sorted(x.address for rr in r.answer for x in rr if hasattr(x, "address"))
        out.append(res)
    elif kind == "resolvconf":
        out.append(open("/etc/resolv.conf").read())
    elif kind == "dial":
        name, _, port = rest.rpartition(":")
        r = resolve(name, "")
        out.append(connect(r["addrs"][0], int(port)) if "addrs" in r else r)
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
