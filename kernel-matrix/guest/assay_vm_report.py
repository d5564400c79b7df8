"""pytest plugin used inside kernel-matrix guests: one final outcome per test, as JSON.

Loaded with `-p assay_vm_report`; writes to $ASSAY_VM_REPORT at session end. Outcomes are
passed, failed, error, skipped, xfailed, xpassed; setup/teardown problems count as error, and a
test whose call never finished (the guest's timeout interrupted it) as interrupted.
"""
import json
import os

_tests = {}
_order = []
MESSAGE_CHARS = 3000
TEST_START = "assay-vm: test start "


def _set(nodeid, outcome, message="", duration=0.0):
    if nodeid not in _tests:
        _order.append(nodeid)
        _tests[nodeid] = {"nodeid": nodeid, "outcome": outcome, "message": message, "duration": 0.0}
    entry = _tests[nodeid]
    entry["outcome"] = outcome
    if message:
        entry["message"] = message[-MESSAGE_CHARS:]
    entry["duration"] = round(entry["duration"] + duration, 3)


def _skip_reason(report):
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        return str(lr[2])
    return str(getattr(report, "longreprtext", "") or lr or "")


def pytest_runtest_logstart(nodeid, location):
    # Into the kernel log, so a guest that hangs or oopses shows which test was running,
    # interleaved with the kernel's own messages on the console (level 3 passes `quiet`).
    try:
        with open("/dev/kmsg", "w") as kmsg:
            kmsg.write("<3>%s%s\n" % (TEST_START, nodeid))
    except OSError:
        pass


def pytest_runtest_logreport(report):
    _record(report)
    _write(None)  # after every test: a guest killed mid-run still reports how far it got


def _record(report):
    nid = report.nodeid
    xfail = hasattr(report, "wasxfail")
    if report.when == "setup":
        if report.failed:
            _set(nid, "error", report.longreprtext, report.duration)
        elif report.skipped:
            _set(nid, "xfailed" if xfail else "skipped", _skip_reason(report), report.duration)
        else:
            _set(nid, "interrupted", "", report.duration)  # until its call reports
    elif report.when == "call":
        if report.passed:
            _set(nid, "xpassed" if xfail else "passed", "", report.duration)
        elif report.skipped:
            _set(nid, "xfailed" if xfail else "skipped", _skip_reason(report), report.duration)
        else:
            _set(nid, "failed", report.longreprtext, report.duration)
    elif report.failed:  # teardown
        _set(nid, "error", report.longreprtext, report.duration)


def pytest_collectreport(report):
    if report.failed:
        _set(report.nodeid or "<collection>", "error", report.longreprtext)


def pytest_sessionfinish(session, exitstatus):
    _write(int(exitstatus))


def _write(exit_status):
    path = os.environ.get("ASSAY_VM_REPORT")
    if not path:
        return
    counts = {}
    for t in _tests.values():
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    with open(path + ".tmp", "w") as fh:
        json.dump({"exit_status": exit_status, "finished": exit_status is not None, "counts": counts,
                   "tests": [_tests[n] for n in _order]}, fh)
    os.replace(path + ".tmp", path)
