"""Run under the monitor: resolve names through the system resolver, connect, report as JSON.

argv: RESULTS.json STEP... where STEP is resolve:NAME[:4|6], connect:ADDR:PORT (v6 in brackets),
sleep:SECONDS, or dial:NAME:PORT (resolve, then connect to the first address)."""
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
    elif kind == "dial":
        name, _, port = rest.rpartition(":")
        r = resolve(name, "")
        out.append(connect(r["addrs"][0], int(port)) if "addrs" in r else r)
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
