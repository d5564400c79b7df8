"""The event writer survives everything its output can do to it (EAGAIN, ENOSPC, EPIPE, a locale
that cannot encode a path), counts what it could not write, and keeps the monitor alive."""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import subprocess
import sys
import time

import pytest

from assay import output

PY = sys.executable
F_SETPIPE_SZ = 1031


def test_writer_waits_a_bounded_time_on_a_full_pipe_then_delivers_everything():
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    wr = output.EventWriter(w)
    lines = [f'{{"n":{i},"pad":"{"x" * 100}"}}' for i in range(2000)]
    t0 = time.monotonic()
    for line in lines:
        wr.write(line)
    wr.flush(0.05)
    assert time.monotonic() - t0 < 2  # never stuck on the full pipe
    got = b""
    fcntl.fcntl(r, fcntl.F_SETFL, os.O_NONBLOCK)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and got.count(b"\n") < len(lines):
        try:
            got += os.read(r, 1 << 16)
        except BlockingIOError:
            wr.flush(0.01)
    wr.close(1)
    assert got.decode().splitlines() == lines  # whole lines, in order, none lost
    assert wr.lost == 0


def test_writer_counts_lines_after_the_reader_left():
    r, w = os.pipe()
    os.close(r)
    wr = output.EventWriter(w)
    for i in range(10):
        wr.write(f"line {i}")
    wr.close(0)
    assert wr.lost == 10 and wr.errors == {"EPIPE": 1} and wr.closed


def test_writer_keeps_lines_through_enospc_and_reports_them_lost(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        wr = output.EventWriter.to_path(str(full / "ev.jsonl"))
        for i in range(2000):
            wr.write(f'{{"n":{i},"pad":"{"y" * 100}"}}')
        wr.close(0)
        assert wr.errors.get("ENOSPC", 0) >= 1
        written = (full / "ev.jsonl").read_bytes().count(b"\n")
        assert written + wr.lost == 2000 and wr.lost > 0
    finally:
        subprocess.run(["umount", str(full)])


def test_own_description_is_not_shared_with_a_pipe_holder():
    r, w = os.pipe()
    mine = output.own_description(w)
    fcntl.fcntl(w, fcntl.F_SETFL, os.O_NONBLOCK)  # what a workload does to its inherited stdout
    assert not fcntl.fcntl(mine, fcntl.F_GETFL) & os.O_NONBLOCK
    os.write(mine, b"x")
    assert os.read(r, 1) == b"x"
    for fd in (r, w, mine):
        os.close(fd)


# Through the CLI, on the real kernel: the workload attacks the monitor's stdout.
NONBLOCK_FLOOD = r'''
import fcntl, os, sys
fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_NONBLOCK)
try:
    fcntl.fcntl(1, 1031, 4096)  # F_SETPIPE_SZ: the smallest pipe
except OSError:
    pass
for i in range(20000):
    try:
        os.close(os.open("/etc/hostname", os.O_RDONLY))
    except OSError:
        pass
sys.exit(5)
'''


@pytest.mark.root
def test_monitor_survives_nonblocking_tiny_pipe_and_a_slow_reader(assay_cmd):
    p = subprocess.Popen(assay_cmd + ["monitor", "--", PY, "-c", NONBLOCK_FLOOD], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(2)  # nobody reads: the pipe stays full while the workload floods it
    out, err = p.communicate(timeout=120)
    assert p.returncode == 5, err.decode()  # the command's status: the monitor did not die
    assert b"Traceback" not in err
    summary = json.loads(next(line for line in err.decode().splitlines() if line.startswith('{"summary"')))["summary"]
    lines = out.decode().splitlines()
    assert all(json.loads(line)["type"] for line in lines)  # every line that arrived is whole
    assert len(lines) + summary["output_lost"] == summary["total"]


@pytest.mark.root
def test_monitor_survives_its_reader_going_away(assay_cmd):
    shell = f"{' '.join(assay_cmd)} monitor -- {PY} -c 'import os,sys,time\nfor i in range(3000): os.close(os.open(\"/etc/hostname\", 0))\ntime.sleep(0.5); sys.exit(4)' | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}"
    p = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "4", p.stderr  # the monitor ran to the command's end
    assert "Traceback" not in p.stderr and "EPIPE" in p.stderr and "enforcement was not affected" in p.stderr


@pytest.mark.root
def test_text_format_with_a_locale_that_cannot_encode_the_path(assay_cmd, tmp_path):
    odd = tmp_path / "caf\u00e9-\u65e5\u672c"
    odd.write_text("x")
    env = dict(os.environ, PYTHONIOENCODING="ascii", LC_ALL="C")
    p = subprocess.run(assay_cmd + ["monitor", "--format", "text", "--", "cat", str(odd)], capture_output=True,
                       env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert b"Traceback" not in p.stderr
    assert str(odd).encode("utf-8") in p.stdout  # written as UTF-8 whatever the locale
