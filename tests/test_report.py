"""`assay report`: golden outputs of a real (frozen) monitor run, the size bound, and bad or cut input
(hypothesis: random and truncated logs never raise, and a bad line is named)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assay import cli, report
from assay.report.load import FIELDS

DATA = Path(__file__).resolve().parent / "data" / "report"
EVENTS, RUN, MONLOG = DATA / "events.jsonl", DATA / "run.jsonl", DATA / "monitor.log"
WS = "/tmp/assay-ws"
REGEN = os.environ.get("ASSAY_REGEN_GOLDEN") == "1"
ERROR = re.compile(r"^assay: error: (?P<path>.+?):(?P<line>\d+):(?P<col>\d+): \S")


def run_cli(args):
    """The CLI in this process (hypothesis runs it thousands of times): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old, logging = sys.argv, structlog.get_config()   # the CLI points structlog at our stderr: undo it after
    sys.argv = ["assay"] + [str(a) for a in args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
        structlog.configure(**logging)
    return code, out.getvalue(), err.getvalue()


def golden(name, text):
    path = DATA / name
    if REGEN:
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs (ASSAY_REGEN_GOLDEN=1 rewrites it; then read the diff)"


@pytest.mark.parametrize("fmt,name", [("markdown", "expected.md"), ("text", "expected.txt"),
                                      ("json", "expected.json")])
def test_golden_event_log(fmt, name, monkeypatch):
    monkeypatch.chdir(DATA)   # the report names the log as given: keep it the same in every checkout
    code, out, err = run_cli(["report", EVENTS.name, "--format", fmt, "--workspace", WS, "--monitor-log", MONLOG.name])
    assert code == 0, err
    golden(name, out)


def test_golden_run_record(monkeypatch):
    monkeypatch.chdir(DATA)
    code, out, err = run_cli(["report", RUN.name, "--workspace", WS])
    assert code == 0, err
    golden("expected-record.md", out)


def test_markdown_says_what_matters():
    r = report.build(report.load(str(EVENTS), str(MONLOG)), WS)
    assert (r.blocked, r.alerted) == (1, 1)
    md = report.render(r, "markdown")
    assert md.startswith("## Assay: 1 blocked, 1 alerted\n")
    # the blocked connect, with the process and its parent chain, and the policy's host name
    row = next(line for line in md.splitlines() if "no-discard" in line and "blocked" in line and "net" in line)
    assert "<code>127.0.0.1:9</code>" in row and "<code>/usr/bin/python3</code>" in row
    assert "← <code>/usr/bin/sh</code>" in row and "(outside the log)" in row
    assert "| <code>127.0.0.1:9</code> | <code>discard.example</code> | 1 | 1 | 1 |" in md
    assert "<code>build/out.txt</code> (relative)" in md
    assert "| 0 | 0 | 0 |" in md   # dropped, lost, output_lost from the monitor's summary line
    assert "<details>" in md


def test_markdown_is_bounded_and_says_what_was_cut():
    r = report.build(report.load(str(EVENTS), str(MONLOG)), WS)
    full = report.render(r, "markdown", None)
    for limit in (1024, 2048, 4096):
        md = report.render(r, "markdown", limit)
        assert len(md.encode()) <= limit < len(full.encode())
        assert "Cut to fit" in md or "cut at" in md
        assert md.startswith("## Assay: 1 blocked, 1 alerted\n")
    code, out, err = run_cli(["report", EVENTS, "--max-bytes", "100"])
    assert code == 1 and "--max-bytes" in err


def test_untrusted_strings_cannot_break_the_markdown(tmp_path):
    ev = {"type": "file_blocked", "ts": "t", "pid": 5, "ppid": 1, "comm": "x|<b>", "rule": "r",
          "action": "deny", "path": "/a|b<script>\n`x`"}
    p = tmp_path / "ev.jsonl"
    p.write_text(json.dumps(ev) + "\n")
    code, out, err = run_cli(["report", p])
    assert code == 0, err
    row = next(line for line in out.splitlines() if "script" in line)
    assert row.count(" | ") == 4 and "<script>" not in row and "&lt;script&gt;" in row


def test_no_summary_line_means_unknown_losses(tmp_path):
    code, out, _ = run_cli(["report", EVENTS])
    assert code == 0 and "dropped and lost: unknown" in out


@pytest.mark.parametrize("text,line,what", [
    ('{"type":"exec","pid":1}\n', 1, "without field 'ppid'"),
    ('\n\n{"type":"open","pid":1,"ppid":0,"comm":"a","path":"/x","flags":"O_RDONLY","ret":"3"}\n', 3,
     "'ret' must be a integer"),
    ('[1,2]\n', 1, "expected a JSON object"),
    ('{"type":"exit","pid":1,"ppid":0,"comm":"a","exit_code":0,"signal":0}\n{"type":"ex', 2, "was the file cut off"),
    ('{"summary": {"dropped": "x"}}\n', 1, "summary: field 'dropped'"),
    ('{"type":"header","run_id":"a"}\n', 1, "field 'started'"),
])
def test_bad_lines_are_named(tmp_path, text, line, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    code, out, err = run_cli(["report", p])
    m = ERROR.match(err)
    assert code == 1 and m, err
    assert int(m.group("line")) == line and m.group("path") == str(p)
    assert what.replace("a integer", "an integer") in err.replace("a integer", "an integer")


def test_missing_file_and_bad_format(tmp_path):
    code, _, err = run_cli(["report", tmp_path / "nope.jsonl"])
    assert code == 1 and "cannot read event log" in err and "No such file" in err
    code, _, err = run_cli(["report", EVENTS, "--format", "html"])
    assert code == 1 and "--format" in err


def test_the_installed_command_runs():
    p = subprocess.run([sys.executable, "-m", "assay", "report", str(EVENTS), "--format", "text"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.startswith("assay report: ") and p.stderr == ""


# ----------------------------------------------------------------------------------- hypothesis

def _check_outcome(path, code, out, err):
    assert "Traceback" not in err and "Traceback" not in out
    assert code in (0, 1), (code, err)
    if code == 1:
        m = ERROR.match(err)
        assert m and m.group("path") == str(path), err
        return int(m.group("line"))
    return None


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.binary(max_size=600))
def test_random_bytes_never_raise(tmp_path, data):
    p = tmp_path / "random.jsonl"
    p.write_bytes(data)
    _check_outcome(p, *run_cli(["report", p]))


GOLDEN_BYTES = EVENTS.read_bytes()


@SETTINGS
@given(cut=st.integers(min_value=0, max_value=len(GOLDEN_BYTES)))
def test_truncated_log_names_the_cut_line(tmp_path, cut):
    data = GOLDEN_BYTES[:cut]
    p = tmp_path / "cut.jsonl"
    p.write_bytes(data)
    line = _check_outcome(p, *run_cli(["report", p, "--format", "json"]))
    if line is None:
        assert data.rstrip(b"\n") == b"" or data.endswith((b"}", b"\n"))
    else:
        assert line == data.count(b"\n") + 1   # the last, cut-off line


TYPES = st.sampled_from(sorted(FIELDS) + ["mystery", "header"])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                    max_leaves=8)
FIELD_NAMES = st.sampled_from(["pid", "ppid", "comm", "path", "flags", "ret", "addr", "port", "family", "rule",
                               "action", "filename", "argv", "child_pid", "exit_code", "signal", "what", "ts"])
EVENT = st.builds(lambda t, fields: {"type": t, **fields}, TYPES, st.dictionaries(FIELD_NAMES, JSON, max_size=12))


@SETTINGS
@given(events=st.lists(EVENT | st.builds(lambda s: {"summary": s}, JSON), max_size=8),
       fmt=st.sampled_from(["markdown", "text", "json"]))
def test_random_events_never_raise(tmp_path, events, fmt):
    p = tmp_path / "events.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in events))
    _check_outcome(p, *run_cli(["report", p, "--format", fmt, "--workspace", "/"]))
