"""Runs inside a kernel-matrix guest, started by /init as root.

Runs the selected pytest tests (or, for the demo, one shell command) with the console as
output, sends a JSON result over the second serial line (/dev/ttyS1; on arm64 the console,
framed) and powers the VM off.
Only the standard library is used: it must work on every guest Python (3.9+).
"""
import collections
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import termios
import threading
import time

ROW_FILE = "/etc/assay-vm/row.json"
REPORT_FILE = "/tmp/assay-vm-report.json"
RESULT_TTY = "/dev/ttyS1"
SYSLOG_ACTION_CONSOLE_LEVEL = 8
BEGIN, END = "ASSAY-VM-RESULT-BEGIN", "ASSAY-VM-RESULT-END"
RB_POWER_OFF = 0x4321FEDC
TAIL_LINES = 80


def say(msg):
    print("assay-vm: " + msg, flush=True)


def dpkg_version(package):
    try:
        with open("/var/lib/dpkg/status") as fh:
            stanzas = fh.read().split("\n\n")
    except OSError:
        return None
    for st in stanzas:
        fields = dict(line.split(": ", 1) for line in st.splitlines() if ": " in line and not line.startswith(" "))
        if fields.get("Package") == package and "installed" in fields.get("Status", ""):
            return fields.get("Version")
    return None


def read_text(path):
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError as e:
        return "unreadable: %s" % e


def guest_facts(row):
    return {
        "kernel_release": os.uname().release,
        "python": platform.python_version(),
        "libbpf_package": row.get("libbpf_package"),
        "libbpf_version": dpkg_version(row.get("libbpf_package", "")),
        "lsm": read_text("/sys/kernel/security/lsm"),
    }


def guest_env():
    env = dict(os.environ)
    env.update({
        "ASSAY_VM": "1",
        "ASSAY_VM_ROW": ROW_FILE,
        "PYTHONPATH": "/opt/assay/pkg:/opt/assay/deps:/opt/assay/guest",
        "HOME": "/root",
        "TMPDIR": "/tmp",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "TERM": "dumb",
    })
    return env


def _signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def run_streaming(argv, env, cwd, timeout):
    """Runs argv with its output copied to the console; returns (rc, last lines, timed_out)."""
    tail = collections.deque(maxlen=TAIL_LINES)
    tail_lock = threading.Lock()
    # Own process group, so a timeout reaches the tests' children (the monitor, probes) too.
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def pump():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with tail_lock:
                tail.append(line)
            print(line, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        # SIGINT first: pytest then reports the interrupted test and finishes its session.
        timed_out = True
        say("guest timeout (%d s): interrupting the tests" % timeout)
        _signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # A descendant that left the group may still hold the pipe: do not wait for it forever.
    reader.join(5)
    with tail_lock:
        return proc.returncode, list(tail), timed_out


def run_pytest(row, env):
    argv = [sys.executable, "-m", "pytest", "-m", "vm", "-p", "no:cacheprovider",
            "-p", "assay_vm_report", "-rA", "--color=no"]
    argv += row.get("pytest_args", [])
    argv.append(row.get("tests_dir", "/opt/assay/src/tests"))
    env = dict(env, ASSAY_VM_REPORT=REPORT_FILE)
    say("running " + " ".join(argv[1:]))
    rc, tail, timed_out = run_streaming(argv, env, "/tmp", row.get("guest_timeout", 240))
    result = {"mode": "pytest", "exit_code": rc, "timed_out": timed_out, "tail": tail}
    try:
        with open(REPORT_FILE) as fh:
            result["report"] = json.load(fh)
    except (OSError, ValueError) as e:
        result["report_error"] = "no pytest report: %s" % e
    return result


def run_command(row, env):
    say("running: " + row["cmd"])
    rc, tail, timed_out = run_streaming(["/bin/sh", "-c", row["cmd"]], env, "/root",
                                        row.get("guest_timeout", 240))
    return {"mode": "cmd", "exit_code": rc, "timed_out": timed_out, "tail": tail}


def quiet_console():
    # The result may share the console: no kernel message may land inside the JSON line.
    ctypes.CDLL(None, use_errno=True).klogctl(SYSLOG_ACTION_CONSOLE_LEVEL, None, 1)


def send_result(result, tty=RESULT_TTY):
    data = "\n%s\n%s\n%s\n" % (BEGIN, json.dumps(result, sort_keys=True), END)
    if tty != RESULT_TTY:
        quiet_console()
    fd = os.open(tty, os.O_WRONLY | os.O_NOCTTY)
    try:
        attrs = termios.tcgetattr(fd)
        attrs[1] &= ~termios.OPOST  # no \n -> \r\n rewriting on the result line
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
        view = data.encode()
        while view:
            view = view[os.write(fd, view):]
        termios.tcdrain(fd)  # the UART must have sent it before the power goes
    finally:
        os.close(fd)


def power_off():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sync()
    libc.reboot(RB_POWER_OFF)
    say("reboot(RB_POWER_OFF) failed: errno %d" % ctypes.get_errno())


def main():
    started = time.monotonic()
    result = {}
    row = {}
    try:
        with open(ROW_FILE) as fh:
            row = json.load(fh)
        result["guest"] = guest_facts(row)
        env = guest_env()
        if row.get("mode") == "cmd":
            result.update(run_command(row, env))
        else:
            result.update(run_pytest(row, env))
    except Exception as e:  # report anything rather than leave the runner guessing
        result["guest_error"] = "%s: %s" % (type(e).__name__, e)
        say(result["guest_error"])
    result["guest_seconds"] = round(time.monotonic() - started, 2)
    try:
        send_result(result, row.get("result_tty", RESULT_TTY))
    finally:
        power_off()


if __name__ == "__main__":
    main()
