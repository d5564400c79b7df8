"""DNS egress allow-lists (issue 18), natively on this kernel through the host backend: a test DNS
server as the upstream, the monitor's proxy as the command's resolver, real connects judged by
the kernel's cgroup programs. Nothing is mocked."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from dns_server import Server
from assay.enforcers import host as host_backend

pytestmark = pytest.mark.root
HERE = os.path.dirname(__file__)
PROBE = os.path.join(HERE, "data", "dns_probe.py")
PY = sys.executable
EPERM = "errno=1"


@pytest.fixture(autouse=True)
def host_backend_here():
    why = host_backend._precheck()
    if why:
        pytest.skip(f"the host backend cannot work here: {why}")


@pytest.fixture(scope="module")
def target():
    """A TCP server on every loopback address, v4 and v6 (dual-stack ::), on one port."""
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", 0))
    s.listen(64)

    def serve():
        while True:
            try:
                c, _ = s.accept()
                c.close()
            except OSError:
                return
    threading.Thread(target=serve, daemon=True).start()
    yield s.getsockname()[1]
    s.close()


def zone():
    return {
        "api.allowed.test": [("A", "127.0.0.21", 1), ("AAAA", "::1", 1)],
        "cdn.allowed.test": [("CNAME", "edge.other.test", 1)],
        "edge.other.test": [("A", "127.0.0.22", 1)],
        "evil.test": [("A", "127.0.0.23", 1)],
        "allowed.test": [("A", "127.0.0.24", 1)],
        "x.y.wild.test": [("A", "127.0.0.25", 1)],
        "many.allowed.test": [("A", f"127.0.1.{i}", 60) for i in range(1, 60)],
    }


@pytest.fixture()
def upstream():
    srv = Server(zone())
    yield srv
    srv.close()


def write_policy(tmp_path, port, extra_not="", name="p.yaml"):
    p = tmp_path / name
    p.write_text(f"""version: "2.0"
name: egress
runtime_monitor:
  rules:
    - id: egress
      type: net_connect
      match:
        dest_globs: ["0.0.0.0/0", "::/0"]
        not:
          dest_globs: ["api.allowed.test:{port}", "cdn.allowed.test:{port}", "*.wild.test:{port}",
                       "many.allowed.test:{port}"{extra_not}]
      action: deny
""")
    return str(p)


def run(assay_cmd, tmp_path, upstream, steps, pol=None, extra=(), timeout=60):
    res, evs = tmp_path / "res.json", tmp_path / "ev.jsonl"
    args = assay_cmd + ["monitor", "--enforcer", "host", "-o", str(evs), "--dns-ttl-floor", "2s"]
    if upstream is not None:
        args += ["--dns-upstream", upstream.addr]
    if pol:
        args += ["--policy", pol]
    p = subprocess.run(args + list(extra) + ["--", PY, PROBE, str(res)] + steps, capture_output=True, text=True,
                       timeout=timeout)
    events = [json.loads(line) for line in evs.read_text().splitlines()] if evs.exists() else []
    out = json.loads(res.read_text()) if res.exists() else None
    return p, out, events


def test_allowed_name_opens_its_address_only_after_resolution(assay_cmd, tmp_path, upstream, target):
    pol = write_policy(tmp_path, target)
    p, out, evs = run(assay_cmd, tmp_path, upstream, [
        f"connect:127.0.0.21:{target}",            # before resolution: denied
        "resolve:api.allowed.test:4",
        f"connect:127.0.0.21:{target}",            # after: allowed
        f"connect:127.0.0.21:{target + 1 if target < 65535 else 1}",  # another port: still denied
        "resolve:cdn.allowed.test:4",              # CNAME chain from an allowed name
        f"connect:127.0.0.22:{target}",
        "resolve:evil.test:4",                     # not listed: answered, nothing inserted
        f"connect:127.0.0.23:{target}",
        "resolve:allowed.test:4",                  # the wildcard's suffix itself is not below it
        f"connect:127.0.0.24:{target}",
        "resolve:X.Y.WILD.test:4",                 # below the suffix (two labels), any case
        f"connect:127.0.0.25:{target}",
    ], write_policy(tmp_path, target))
    assert p.returncode == 0, p.stderr
    assert out[0] == EPERM
    assert out[1]["addrs"] == ["127.0.0.21"]
    assert out[2] == "ok"
    assert out[3] == EPERM
    assert out[4]["addrs"] == ["127.0.0.22"] and out[5] == "ok"
    assert out[6]["addrs"] == ["127.0.0.23"] and out[7] == EPERM
    assert out[8]["addrs"] == ["127.0.0.24"] and out[9] == EPERM
    assert out[10]["addrs"] == ["127.0.0.25"] and out[11] == "ok"
    dns = [e for e in evs if e["type"] == "dns" and e["qtype"] == "A"]
    by = {e["name"]: e for e in dns}
    assert by["api.allowed.test"]["rule"] == "egress" and by["api.allowed.test"]["answers"] == ["127.0.0.21"]
    assert by["api.allowed.test"]["ttl"] == 1 and by["api.allowed.test"]["inserted"] >= 1
    assert by["cdn.allowed.test"]["cnames"] == ["edge.other.test"]
    assert by["evil.test"]["rule"] is None and by["evil.test"]["inserted"] == 0
    blocked = [e for e in evs if e["type"] == "net_blocked"]
    evil = [e for e in blocked if e["addr"] == "127.0.0.23"]
    assert evil and evil[0]["name"] == "evil.test"         # the last name that resolved to it
    assert [e for e in blocked if e["addr"] == "127.0.0.21"][0].get("name") is None  # before any answer
    assert "DNS proxy for the command on 127.0.53." in p.stderr


def test_truncated_answer_then_tcp_and_v6(assay_cmd, tmp_path, upstream, target):
    """A UDP answer too long for 512 bytes reaches the client with TC; the client asks again over
    TCP, the proxy forwards over TCP, and the addresses open. AAAA works the same way (::1)."""
    pol = write_policy(tmp_path, target)
    p, out, evs = run(assay_cmd, tmp_path, upstream, [
        "resolvconf",
        f"connect:[::1]:{target}",
        "resolve:api.allowed.test:6",
        f"connect:[::1]:{target}",
        f"connect:127.0.1.7:{target}",
        "query:many.allowed.test:A",
        f"connect:127.0.1.7:{target}",
    ], pol)
    assert p.returncode == 0, p.stderr
    assert out[0].startswith("# written by assay monitor") and "nameserver 127.0.53." in out[0]
    assert out[1] == EPERM and out[2]["addrs"] == ["::1"] and out[3] == "ok"
    assert out[4] == EPERM
    assert out[5]["tc"] is True and len(out[5]["addrs"]) == 59
    assert out[6] == "ok"
    assert ("tcp", "many.allowed.test", "A") in upstream.queries
    many = [e for e in evs if e["type"] == "dns" and e["name"] == "many.allowed.test"]
    assert [e["transport"] for e in many] == ["udp", "tcp"] and many[0]["truncated"] is True
    assert many[1]["inserted"] == 59
    # the host's own resolv.conf is untouched: only the command's mount namespace sees the proxy
    assert "# written by assay monitor" not in open("/etc/resolv.conf").read()


def test_after_the_ttl_the_address_is_denied_again(assay_cmd, tmp_path, upstream, target):
    pol = write_policy(tmp_path, target)
    p, out, evs = run(assay_cmd, tmp_path, upstream, [
        "resolve:api.allowed.test:4", f"connect:127.0.0.21:{target}", "sleep:3.5", f"connect:127.0.0.21:{target}",
    ], pol)           # TTL 1 s, clamped to the 2 s floor given by run()
    assert p.returncode == 0, p.stderr
    assert out[1] == "ok" and out[3] == EPERM
    assert '"expired": ' in p.stderr and '"expired": 0' not in p.stderr


def test_dns_block_answers_unlisted_names_nxdomain(assay_cmd, tmp_path, upstream, target):
    pol = write_policy(tmp_path, target)
    p, out, evs = run(assay_cmd, tmp_path, upstream, ["resolve:evil.test:4", "resolve:api.allowed.test:4"], pol,
                      extra=["--dns-block"])
    assert p.returncode == 0, p.stderr
    assert "error" in out[0] and out[1]["addrs"] == ["127.0.0.21"]
    assert ("udp", "evil.test", "A") not in upstream.queries        # never asked upstream
    ev = [e for e in evs if e["type"] == "dns" and e["name"] == "evil.test"][0]
    assert ev["rcode"] == "NXDOMAIN" and ev["blocked"] is True


def test_a_dead_upstream_is_servfail_quickly_with_a_warning(assay_cmd, tmp_path, target):
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # takes queries, never answers
    sink.bind(("127.0.0.78", 0))

    class Dead:
        addr = f"127.0.0.78:{sink.getsockname()[1]}"
    t0 = time.monotonic()
    p, out, evs = run(assay_cmd, tmp_path, Dead, ["resolve:api.allowed.test:4"], write_policy(tmp_path, target))
    took = time.monotonic() - t0
    sink.close()
    assert p.returncode == 0, p.stderr
    assert "error" in out[0] and out[0]["s"] < 15, out
    assert took < 30
    assert f"DNS upstream {Dead.addr} did not answer api.allowed.test (timeout); the workload got SERVFAIL" \
        in p.stderr
    ev = [e for e in evs if e["type"] == "dns"][0]
    assert ev["rcode"] == "SERVFAIL" and ev["upstream_error"] == "timeout"


def test_a_process_outside_the_scope_is_unaffected(assay_cmd, tmp_path, upstream, target):
    pol = write_policy(tmp_path, target)
    res, evs = tmp_path / "res.json", tmp_path / "ev.jsonl"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(assay_cmd + ["monitor", "--enforcer", "host", "--policy", pol, "-o", str(evs),
                                         "--dns-upstream", upstream.addr, "--ready-file", str(ready), "--",
                                         PY, PROBE, str(res), "sleep:2", f"connect:127.0.0.23:{target}"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    outside = socket.create_connection(("127.0.0.23", target), timeout=3)   # this test is not in the scope
    outside.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(res.read_text())[1] == EPERM


def test_wildcard_names_need_a_command(assay_cmd, tmp_path, target):
    pol = write_policy(tmp_path, target)
    p = subprocess.run(assay_cmd + ["monitor", "--enforcer", "host", "--policy", pol, "--pid", str(os.getpid()),
                                    "--duration", "1s"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    col = open(pol).read().splitlines()[9].index('"*.wild') + 1
    assert f"{pol}:10:{col}: '*.wild.test:{target}': a wildcard name is followed through the DNS proxy" in p.stderr
    assert "Traceback" not in p.stderr


def test_learning_by_name_survives_rotating_addresses(assay_cmd, tmp_path, upstream, target):
    """Five recorded runs, each answered with another address: one stable NAME:PORT item, and the
    generated policy lets a sixth run with yet another address through (and denies the rest)."""
    profile = tmp_path / "profile.yaml"
    steps = [f"dial:api.allowed.test:{target}"]
    subprocess.run(assay_cmd + ["profile", "init", "--profile", str(profile), "--name", "dns"], check=True,
                   capture_output=True)
    for i in range(5):
        upstream.zone["api.allowed.test"] = [("A", f"127.0.0.{40 + i}", 1)]
        rec = tmp_path / f"run{i}.jsonl"
        p, out, _ = run(assay_cmd, tmp_path, upstream, steps, extra=["--record", str(rec)])
        assert p.returncode == 0 and out == ["ok"], p.stderr
        assert f'"dest":"api.allowed.test:{target}"' in rec.read_text()
        subprocess.run(assay_cmd + ["profile", "update", "--profile", str(profile), "--input", str(rec)],
                       check=True, capture_output=True)
    show = subprocess.run(assay_cmd + ["profile", "show", "--profile", str(profile), "--format", "json"],
                          check=True, capture_output=True, text=True).stdout
    assert f"api.allowed.test:{target}" in show and "127.0.0.4" not in show
    gen = tmp_path / "gen.yaml"
    g = subprocess.run(assay_cmd + ["generate", "--profile", str(profile), "--mode", "enforce",
                                    "--min-stability", "0.5", "--review-threshold", "0.4", "-o", str(gen)], capture_output=True, text=True)
    assert g.returncode == 0, g.stderr
    assert f'"api.allowed.test:{target}"' in gen.read_text()
    upstream.zone["api.allowed.test"] = [("A", "127.0.0.50", 1)]
    p, out, evs = run(assay_cmd, tmp_path, upstream, steps + [f"connect:127.0.0.51:{target}"], pol=str(gen))
    assert p.returncode == 0, p.stderr
    assert out == ["ok", EPERM]
