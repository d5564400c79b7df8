"""Running as a host service: Prometheus scraping --metrics-addr, logrotate with the shipped
config, the systemd unit, and SIGHUP on this host (which monitors but cannot enforce)."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "packaging" / "assay.service"
LOGROTATE = REPO / "packaging" / "assay.logrotate"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def summary_of(stderr: str) -> dict:
    lines = [json.loads(l) for l in stderr.splitlines() if l.startswith('{"summary"')]
    assert lines, stderr
    return lines[-1]["summary"]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def start_monitor(assay_cmd, tmp_path, args, workload, env=None):
    ready = tmp_path / "ready"
    err = open(tmp_path / "monitor.stderr", "w+")
    proc = subprocess.Popen(assay_cmd + ["monitor", "--ready-file", str(ready)] + args + ["--", "sh", "-c", workload],
                            stdout=subprocess.DEVNULL, stderr=err, env=env)
    try:
        wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the monitor's ready file")
    except AssertionError:
        proc.kill()
        raise
    if proc.poll() is not None:
        err.seek(0)
        raise AssertionError(f"monitor exited {proc.returncode}: {err.read()}")
    return proc, err


def finish(proc, err, stop: Path) -> str:
    stop.touch()
    proc.wait(timeout=60)
    err.seek(0)
    return err.read()


# A workload that opens a file every 20 ms until told to stop.
def busy(stop: Path) -> str:
    return f"while [ ! -e {stop} ]; do cat /etc/hostname >/dev/null; sleep 0.02; done"


# ---------------------------------------------------------------- Prometheus

PROMETHEUS = shutil.which("prometheus")


def prom_query(base: str, query: str) -> list:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    data = json.loads(http_get(url))
    assert data["status"] == "success", data
    return data["data"]["result"]


@pytest.mark.root
@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is missing (apt-get install prometheus; "
                                              "`make deps` installs it)")
def test_prometheus_scrapes_the_monitor(assay_cmd, tmp_path):
    port, prom_port = free_port(), free_port()
    stop = tmp_path / "stop"
    proc, err = start_monitor(assay_cmd, tmp_path, ["--metrics-addr", f"127.0.0.1:{port}", "-o", str(tmp_path / "ev.jsonl")],
                              busy(stop))
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                   f"scrape_configs:\n  - job_name: assay\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
    base = f"http://127.0.0.1:{prom_port}"
    try:
        wait_for(lambda: prom_query(base, 'up{job="assay"} == 1') if _answers(base) else None, 60,
                 "Prometheus to scrape the monitor")
        dropped = prom_query(base, "assay_events_dropped_total")
        assert {r["metric"]["cause"] for r in dropped} == {"ringbuf_full", "output"}
        assert all(r["value"][1] == "0" for r in dropped), dropped
        first = float(wait_for(lambda: prom_query(base, "sum(assay_events_total)"), 30, "an events sample")[0]["value"][1])
        later = wait_for(lambda: [r for r in prom_query(base, "sum(assay_events_total)")
                                  if float(r["value"][1]) > first], 30, "the events counter to rise")
        assert float(later[0]["value"][1]) > first
        assert prom_query(base, 'assay_events_total{type="open"} > 0')
        assert prom_query(base, 'assay_map_capacity_entries{map="scope_pids"}')[0]["value"][1] == "65536"
        assert float(prom_query(base, 'assay_map_entries{map="scope_pids"}')[0]["value"][1]) >= 1
        assert prom_query(base, 'assay_enforcer_info{enforcer="none"}')
        assert prom_query(base, "assay_ringbuf_size_bytes")[0]["value"][1] == str(16 << 20)
        assert prom_query(base, "process_start_time_seconds")
        assert prom_query(base, 'assay_build_info{version="0.1.0"}')
        print(f"\nPrometheus saw sum(assay_events_total) go from {first:.0f} to {float(later[0]['value'][1]):.0f}")
    finally:
        prom.terminate()
        prom.wait(timeout=30)
        stderr = finish(proc, err, stop)
    assert proc.returncode == 0, stderr
    assert f"assay: metrics on http://127.0.0.1:{port}/metrics" in stderr


def _answers(base: str) -> bool:
    try:
        http_get(f"{base}/-/ready")
        return True
    except OSError:
        return False


@pytest.mark.root
def test_metrics_addr_taken_is_a_usage_error(assay_cmd):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        p = subprocess.run(assay_cmd + ["monitor", "--metrics-addr", f"127.0.0.1:{port}", "--", "true"],
                           capture_output=True, text=True, timeout=60)
    assert p.returncode == 1, p.stderr
    assert f"--metrics-addr 127.0.0.1:{port}: Address already in use" in p.stderr
    assert "Traceback" not in p.stderr


# ---------------------------------------------------------------- logrotate

LOGROTATE_BIN = shutil.which("logrotate") or ("/usr/sbin/logrotate" if os.path.exists("/usr/sbin/logrotate") else None)


@pytest.mark.root
@pytest.mark.skipif(LOGROTATE_BIN is None, reason="logrotate is missing (apt-get install logrotate; `make deps` "
                                                  "installs it)")
def test_logrotate_while_events_stream_loses_no_line(assay_cmd, tmp_path):
    logs = tmp_path / "log"
    logs.mkdir()
    events, pidfile = logs / "events.jsonl", tmp_path / "assay.pid"
    # The shipped config, pointed at this test's files (its paths and nothing else changed).
    text = LOGROTATE.read_text()
    assert "/var/log/assay/events.jsonl" in text and "/run/assay/assay.pid" in text
    conf = tmp_path / "assay.logrotate"
    conf.write_text(text.replace("/var/log/assay/events.jsonl", str(events))
                    .replace("/run/assay/assay.pid", str(pidfile)).replace("create 0640 root adm", "create 0640 root root"))
    stop = tmp_path / "stop"
    # Dense events: a file opened in a tight shell loop.
    workload = f"while [ ! -e {stop} ]; do cat /etc/hostname /etc/hostname >/dev/null; done"
    err = open(tmp_path / "monitor.stderr", "w+")
    proc = subprocess.Popen(assay_cmd + ["monitor", "-o", str(events), "--append", "--ready-file", str(pidfile),
                                         "--", "sh", "-c", workload], stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(pidfile.exists, 60, "the monitor's pid file")
        assert int(pidfile.read_text()) == proc.pid
        for i in range(3):
            time.sleep(1.0)
            r = subprocess.run([LOGROTATE_BIN, "-f", "-s", str(tmp_path / "logrotate.state"), str(conf)],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
        time.sleep(1.0)
    finally:
        stop.touch()
        proc.wait(timeout=60)
    err.seek(0)
    stderr = err.read()
    assert proc.returncode == 0, stderr
    files = sorted(logs.iterdir())
    names = [f.name for f in files]
    assert names == ["events.jsonl", "events.jsonl.1", "events.jsonl.2.gz", "events.jsonl.3.gz"], names
    lines = []
    for f in files:
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        assert data.endswith(b"\n") or not data, f"{f.name} ends inside a line"
        lines += data.splitlines()
    per_file = {f.name: len((gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()).splitlines())
                for f in files}
    s = summary_of(stderr)
    assert s["output_lost"] == 0, s
    assert len(lines) == s["total"], (per_file, s["total"])
    for line in lines:
        json.loads(line)   # every line whole
    assert all(n > 0 for n in per_file.values()), per_file
    print(f"\n{s['total']} events, by file: {per_file}")


# ---------------------------------------------------------------- the unit

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is missing (apt-get install systemd; `make "
                                                    "deps` installs it)")
def test_unit_verifies(tmp_path):
    # verify also checks that ExecStart's program exists: point it at this tree's entry point.
    text = UNIT.read_text()
    assert "ExecStart=/opt/assay/bin/assay monitor" in text
    entry = Path(sys.executable).parent / "assay"
    assert entry.exists(), entry
    unit = tmp_path / "assay.service"
    unit.write_text(text.replace("/opt/assay/bin/assay", str(entry)))
    r = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr.strip() == "" and r.stdout.strip() == "", r.stdout + r.stderr
    for want in ("Type=notify", "Restart=on-failure", "ExecReload=/bin/kill -HUP $MAINPID",
                 "CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYS_ADMIN"):
        assert want in text


def test_unit_options_exist_in_the_cli(assay_cmd):
    """Every option the unit passes is one `assay monitor` knows."""
    text = UNIT.read_text()
    start = re.search(r"^ExecStart=(.*?)(?<!\\)$", text, re.M | re.S).group(1)
    opts = set(re.findall(r"(--[a-z-]+)", start))
    helptext = subprocess.run(assay_cmd + ["monitor", "--help"], capture_output=True, text=True).stdout
    assert opts and all(o in helptext for o in opts), opts


# ---------------------------------------------------------------- SIGHUP on this host

def _policy(enabled: bool, extra: str = "") -> str:
    return ('version: "2.0"\nname: host\nruntime_monitor:\n  enabled: ' + ("true" if enabled else "false") +
            "\n  rules:\n    - id: r\n      type: net_connect\n      match: { dest_globs: ['127.0.0.1:9'] }\n"
            "      action: deny\n" + extra)


@pytest.mark.root
def test_sighup_reload_outcomes_without_enforcement(assay_cmd, tmp_path):
    """This host cannot enforce, so the policy starts disabled (nothing to enforce): reloads of a
    disabled policy succeed, a bad file names its line, an enforcing one is refused."""
    pol = tmp_path / "p.yaml"
    pol.write_text(_policy(False))
    stop, events = tmp_path / "stop", tmp_path / "ev.jsonl"
    port = free_port()
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)   # systemd's side of Type=notify
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(30)
    proc, err = start_monitor(assay_cmd, tmp_path, ["--policy", str(pol), "-o", str(events),
                                                    "--metrics-addr", str(port)], busy(stop),
                              env=dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify")))

    def policy_events():
        return [json.loads(l) for l in events.read_text().splitlines() if '"type":"policy_' in l]

    try:
        for i, text in enumerate([_policy(False, "    - id: s\n      type: net_connect\n      match: { dest_globs: ['23'] }\n"),
                                  _policy(False, "    - id: s\n      bogus: 1\n"),
                                  _policy(True)]):
            pol.write_text(text)
            proc.send_signal(signal.SIGHUP)
            wait_for(lambda: len(policy_events()) > i, 30, f"reload {i + 1}")
        metrics = http_get(f"http://127.0.0.1:{port}/metrics")
    finally:
        stderr = finish(proc, err, stop)
    assert proc.returncode == 0, stderr
    ok, bad, refused = policy_events()
    assert (ok["type"], ok["rules_added"], ok["removed"]) == ("policy_reloaded", ["s"], 0), ok
    assert ok["entries"] == {"added": 0, "updated": 0, "removed": 0}   # disabled: nothing in the maps
    assert (bad["type"], bad["outcome"]) == ("policy_reload_failed", "invalid"), bad
    assert bad["error"].startswith(f"{pol}:11:7: unknown key 'bogus'"), bad
    assert (refused["outcome"], "started without an enforcer" in refused["error"]) == ("refused", True), refused
    assert f"assay: policy reload invalid, the previous policy stays in force: {pol}:11:7:" in stderr
    for line in ('assay_policy_reloads_total{outcome="success"} 1.0', 'assay_policy_reloads_total{outcome="invalid"} 1.0',
                 'assay_policy_reloads_total{outcome="refused"} 1.0', "assay_policy_last_reload_successful 0.0",
                 'assay_policy_rules{type="net_connect"} 2.0', 'assay_policy_info{name="host"} 1.0'):
        assert line in metrics, metrics
    s = summary_of(stderr)
    assert s["events"]["policy_reloaded"] == 1 and s["events"]["policy_reload_failed"] == 2
    notes = [manager.recv(256).decode() for _ in range(7)]
    manager.close()
    assert notes[0].startswith("READY=1") and all(n.startswith("RELOADING=1\nMONOTONIC_USEC=") for n in notes[1::2])
    assert notes[2::2] == ["READY=1"] * 3, notes
