"""Host-side checks of the matrix machinery that need no VM, no network and no root.

    .venv/bin/python -m pytest kernel-matrix/test_kernel_matrix.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fetch  # noqa: E402
import matrix  # noqa: E402
import payload  # noqa: E402
import qemu  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402


def test_matrix_file_loads_and_every_kernel_runs_both_backends():
    rows = matrix.load()
    assert {r.id for r in rows} >= {"5.10", "6.1", "6.12", "7.2", "5.10-bookworm"}
    for r in rows:
        assert ("bpf" in r.lsm.split(",")) is (r.enforcer == "lsm")
        assert r.expect in ("pass", "xfail")
    # every kernel once with bpf in the LSM list, once with Ubuntu's list (fmod_ret)
    by_kernel = {}
    for r in rows:
        by_kernel.setdefault(r.kernel.id, set()).add(r.enforcer)
    assert all(v == {"lsm", "fmod_ret"} for v in by_kernel.values()), by_kernel
    for r in rows:
        if r.enforcer == "fmod_ret":
            assert r.lsm == "lockdown,capability,landlock,yama,apparmor"
            assert r.default is matrix.select(rows, r.id.replace("-fmod_ret", ""))[0].default


def test_a_row_whose_lsm_list_contradicts_its_enforcer_is_rejected(tmp_path):
    good = matrix.MATRIX_FILE.read_text()
    text = good.replace('userland: bullseye\n    lsm: *ubuntu_lsm\n', 'userland: bullseye\n', 1)
    assert text != good
    bad = tmp_path / "matrix.yaml"
    bad.write_text(text)
    with pytest.raises(matrix.MatrixError, match="5.10-fmod_ret: enforcer fmod_ret needs `bpf` absent"):
        matrix.load(bad)


def test_workflow_lists_every_row():
    wf = (matrix.REPO / ".github/workflows/kernel-matrix.yml").read_text()
    for r in matrix.load():
        assert f'"{r.id}"' in wf, f"row {r.id} missing from the workflow's matrix"


def test_select_rejects_unknown_rows():
    rows = matrix.load()
    assert [r.id for r in matrix.select(rows, "6.1,5.10")] == ["6.1", "5.10"]
    with pytest.raises(matrix.MatrixError):
        matrix.select(rows, "4.19")


def test_default_selection_leaves_out_the_slow_rows():
    rows = matrix.load()
    default = [r.id for r in matrix.select(rows, "")]
    assert "6.12-arm64" not in default and "6.1" in default
    assert [r.id for r in matrix.select(rows, "all")] == [r.id for r in rows]
    assert [r.id for r in matrix.select(rows, "6.12-arm64")] == ["6.12-arm64"]


def test_arm64_row_boots_with_the_aarch64_emulator():
    row = matrix.select(matrix.load(), "6.12-arm64")[0]
    assert row.arch.name == "arm64" and row.userland.arch == "arm64"
    argv = qemu.qemu_argv(row.arch, Path("k"), Path("i"), row.lsm, Path("r"))
    assert argv[0] == "qemu-system-aarch64" and "virt" in argv
    assert any(a.startswith("console=ttyAMA0 ") for a in argv)
    assert argv.count("-serial") == 1  # one UART: the result comes on the console
    amd = qemu.qemu_argv(matrix.ARCHES["amd64"], Path("k"), Path("i"), row.lsm, Path("r"))
    assert amd[0] == "qemu-system-x86_64" and amd.count("-serial") == 2
    assert fetch.rootfs_key(row.userland).startswith("trixie-arm64-")


def test_row_arches_must_agree(tmp_path):
    text = matrix.MATRIX_FILE.read_text() + '  - id: "bad"\n    kernel: "6.12-arm64"\n    userland: trixie\n'
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(matrix.MatrixError, match="arm64"):
        matrix.load(tmp_path / "m.yaml")


def test_xfail_row_needs_a_reason(tmp_path):
    text = matrix.MATRIX_FILE.read_text() + '  - id: "bad"\n    kernel: "6.1"\n    userland: bookworm\n    expect: xfail\n'
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(matrix.MatrixError, match="reason"):
        matrix.load(tmp_path / "m.yaml")


def test_cpio_writer_is_readable_by_gnu_cpio(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("hello")
    (src / "link").symlink_to("sub/f.txt")
    out = tmp_path / "a.cpio"
    with open(out, "wb") as fh:
        c = qemu.Cpio(fh)
        c.add_file("init", b"#!/bin/sh\n", 0o755)
        c.add_tree("opt/x", src)
        c.close()
    assert out.stat().st_size % 512 == 0
    listing = subprocess.run(["cpio", "-itv", "--quiet"], stdin=open(out, "rb"), capture_output=True,
                             text=True, check=True).stdout
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()]
    # parents come before children: the kernel does not create missing directories
    assert names.index("opt") < names.index("opt/x") < names.index("opt/x/sub") < names.index("opt/x/sub/f.txt")
    assert "init" in names and "opt/x/link" in names
    dest = tmp_path / "out"
    dest.mkdir()
    subprocess.run(["cpio", "-id", "--quiet"], stdin=open(out, "rb"), cwd=dest, check=True)
    assert (dest / "opt/x/sub/f.txt").read_text() == "hello"
    assert (dest / "init").stat().st_mode & 0o111


def test_read_result_handles_serial_noise(tmp_path):
    f = tmp_path / "r"
    f.write_bytes(b"garbage\r\n" + qemu.BEGIN.encode() + b"\r\n" + json.dumps({"a": 1}).encode()
                  + b"\r\n" + qemu.END.encode() + b"\r\n")
    assert qemu.read_result(f) == {"a": 1}
    # On a shared console the last framed result counts (test output may quote the marker).
    f.write_bytes(b"[    1.0] boot\r\n" + qemu.BEGIN.encode() + b" quoted\r\n" + qemu.BEGIN.encode()
                  + b"\r\n" + json.dumps({"b": 2}).encode() + b"\r\n" + qemu.END.encode() + b"\r\n")
    assert qemu.read_result(f) == {"b": 2}
    f.write_bytes(qemu.BEGIN.encode() + b'\n{"a": ')
    assert "truncated" in qemu.read_result(f)
    assert "no result" in qemu.read_result(tmp_path / "missing")


def test_upstream_version():
    assert fetch.upstream_version("1:1.1.2-0+deb12u1") == "1.1.2"
    assert fetch.upstream_version("1:0.3-2+deb11u1") == "0.3"
    assert fetch.upstream_version("3.9.2-3") == "3.9.2"


def test_newest_uses_debian_version_order():
    cands = [("a", "6.12.9-1"), ("b", "6.12.118-1"), ("c", "6.12.100-1~bpo")]
    assert fetch.newest(cands) == ("b", "6.12.118-1")


def test_release_from_member_path():
    assert fetch._release_from_path("boot/vmlinuz-6.1.0-57-cloud-amd64") == "6.1.0-57-cloud-amd64"
    assert fetch._release_from_path("usr/lib/modules/7.2.13+deb14-cloud-amd64/vmlinuz") == "7.2.13+deb14-cloud-amd64"


def test_module_names_from_package_paths():
    assert fetch._module_name("./lib/modules/6.1.0-57-cloud-amd64/kernel/net/sctp/sctp.ko") == "sctp"
    assert fetch._module_name("usr/lib/modules/7.2/kernel/crypto/crc32c-cryptoapi.ko.xz") == "crc32c_cryptoapi"
    assert fetch._module_name("usr/lib/modules/7.2/vmlinuz") is None
    assert "sctp" in fetch.MODULES


def test_a_kernel_record_without_its_modules_is_fetched_again(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "CACHE", tmp_path)
    monkeypatch.setattr(fetch, "kernel_record_path", lambda spec: tmp_path / "k.json")
    (tmp_path / "vmlinuz").write_bytes(b"x" * 10)
    (tmp_path / "sctp.ko").write_bytes(b"m")
    rec = {"vmlinuz": "vmlinuz", "size": 10, "modules": ["sctp.ko"], "modules_wanted": list(fetch.MODULES)}
    (tmp_path / "k.json").write_text(json.dumps(rec))
    assert fetch.cached_kernel(None)["path"] == str(tmp_path / "vmlinuz")
    (tmp_path / "sctp.ko").unlink()
    assert fetch.cached_kernel(None) is None          # a module file went missing
    rec.pop("modules_wanted")
    (tmp_path / "k.json").write_text(json.dumps(rec))
    assert fetch.cached_kernel(None) is None          # a record from before modules were fetched


def _dist(target, name, version, requires=(), requires_python=None):
    d = target / f"{name}-{version}.dist-info"
    d.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    if requires_python:
        lines.append(f"Requires-Python: {requires_python}")
    lines += [f"Requires-Dist: {r}" for r in requires]
    (d / "METADATA").write_text("\n".join(lines) + "\n")


def test_closure_uses_the_guest_python_markers(tmp_path):
    # What pip leaves for a 3.9 guest when it evaluated markers with the host's 3.11.
    _dist(tmp_path, "pytest", "8.4.2", ['tomli>=1; python_version < "3.11"', "pluggy>=1.5"])
    _dist(tmp_path, "pluggy", "1.6.0")
    _dist(tmp_path, "ruamel.yaml", "0.19.1", ['ruamel.yaml.clib>=0.2; platform_python_implementation=="CPython"'])
    roots = [Requirement("pytest>=7"), Requirement("ruamel.yaml>=0.17")]
    add, cons = payload._problems(tmp_path, roots, "3.9.2")
    assert add == ["tomli>=1"] and cons == []
    add, cons = payload._problems(tmp_path, roots, "3.11.2")
    assert add == [] and cons == []


def test_closure_rejects_dists_for_a_newer_python(tmp_path):
    _dist(tmp_path, "pytest", "9.1.1", requires_python=">=3.10")
    add, cons = payload._problems(tmp_path, [Requirement("pytest>=7")], "3.9.2")
    assert cons == ["pytest!=9.1.1"]


def test_mirror_override(monkeypatch):
    fetch.debian_mirrors.cache_clear()
    monkeypatch.setenv("ASSAY_DEBIAN_MIRROR", "http://mirror.invalid/debian/")
    monkeypatch.delenv("ASSAY_DEBIAN_SECURITY_MIRROR", raising=False)
    monkeypatch.setattr(fetch, "_apt_source_uris", lambda: [])
    try:
        assert fetch.debian_mirrors() == ("http://mirror.invalid/debian", "http://mirror.invalid/debian-security")
        assert fetch.suite_uri("bookworm-security").endswith("/debian-security")
        assert fetch.suite_uri("sid").endswith("/debian")
    finally:
        fetch.debian_mirrors.cache_clear()


def _boot(tmp_path, name, result, seconds=1.0):
    log = tmp_path / f"{name}.console.log"
    log.write_text("[  1.0] Oops: int3: 0000 [#1] SMP NOPTI\n" if result is None else "ok\n")
    return qemu.Boot(0, False, seconds, log, result, "" if result else "the guest sent no result")


GOOD = {"guest": {}, "report": {"counts": {"passed": 3}}, "exit_code": 0}


def _run_row(tmp_path, monkeypatch, boots):
    import run
    row = matrix.select(matrix.load(), "6.1")[0]
    monkeypatch.setattr(qemu, "boot_row", lambda *a, **k: boots.pop(0))
    kernel = {"release": "r", "package": "p", "version": "v"}
    return run.run_row(row, kernel, {"libbpf_version": "1.1.2", "python_full": "3.11.2"}, tmp_path, tmp_path,
                       [], "tests/vm", 900)


@pytest.mark.parametrize("outcomes,status,boots_used", [
    ([GOOD], "PASS", 1),
    ([None, GOOD], "PASS", 2),
    ([None, None, GOOD], "PASS", 3),
    ([None, None, None, GOOD], "FAIL", 3),  # at most three boots
])
def test_a_guest_that_dies_is_booted_again(tmp_path, monkeypatch, outcomes, status, boots_used):
    boots = [_boot(tmp_path, str(i), r) for i, r in enumerate(outcomes)]
    entry = _run_row(tmp_path, monkeypatch, boots)
    assert len(outcomes) - len(boots) == boots_used
    assert entry["status"] == status
    assert len(entry["failed_boots"]) == boots_used - 1
    for failed in entry["failed_boots"]:
        assert failed["kernel_messages"] == ["[  1.0] Oops: int3: 0000 [#1] SMP NOPTI"]
        assert ".attempt" in failed["console_log"]
    if boots_used > 1:
        import run
        assert f"(boot {boots_used})" in run.table([entry])


def test_no_third_boot_after_two_timeouts(tmp_path, monkeypatch):
    # Two guests that ran into the 900 s timeout (no hang was detected): a third would double the cost.
    boots = [_boot(tmp_path, "a", None, 900.0), _boot(tmp_path, "b", None, 900.0), _boot(tmp_path, "c", GOOD)]
    entry = _run_row(tmp_path, monkeypatch, boots)
    assert len(boots) == 1 and entry["status"] == "FAIL" and len(entry["failed_boots"]) == 1
    assert entry["no_result"]["kernel_messages"]


def test_a_failing_test_is_not_retried(tmp_path, monkeypatch):
    bad = {"guest": {}, "report": {"counts": {"passed": 2, "failed": 1}}, "exit_code": 1}
    boots = [_boot(tmp_path, "a", bad), _boot(tmp_path, "b", None)]
    entry = _run_row(tmp_path, monkeypatch, boots)
    assert len(boots) == 1 and entry["status"] == "FAIL" and entry["failed_boots"] == []


def test_a_hang_names_the_running_test_and_the_first_kernel_complaint():
    import run
    console = "\n".join([
        "[   9.1] assay-vm: test start tests/vm/test_vm_load.py::test_attach",
        "tests/vm/test_vm_load.py .",
        "[  20.2] assay-vm: test start tests/vm/test_vm_enforce.py::test_deny",
        "[ 884.9] rcu: INFO: rcu_sched self-detected stall on CPU",
        "[ 884.9] Call Trace:",
        "[ 884.9]  text_poke_bp_batch+0x9/0x1",
        "[ 900.1] assay-vm: test start tests/vm/test_vm_enforce.py::test_later",
        "[ 901.0] watchdog: BUG: soft lockup - CPU#1 stuck for 23s! [python3:92]",
    ])
    info = qemu.kernel_problem(console, context=3)
    assert info["last_test_started"] == "tests/vm/test_vm_enforce.py::test_deny"
    assert info["first_problem"] == console.splitlines()[3:6]
    assert len(info["kernel_messages"]) == 2
    text = run.hang_summary({"row": "5.10", "failed_boots": [info], "no_result": info})
    assert "5.10 boot 1: no result; test running: tests/vm/test_vm_enforce.py::test_deny" in text
    assert "5.10 boot 2: no result" in text and "text_poke_bp_batch" in text
    assert run.hang_summary({"row": "6.1", "failed_boots": [], "no_result": None}) == ""


def test_a_hung_guest_kernel_is_stopped_before_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(qemu, "HANG_GRACE", 1)
    script = "echo booting; sleep 1; echo '[ 22.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [python3:92]'; exec sleep 60"
    b = qemu._boot(["sh", "-c", script], tmp_path / "console.log", tmp_path / "result", 50, False)
    assert b.result is None and b.seconds < 20 and not b.timed_out
    assert "guest kernel hung (" in b.error and "soft lockup" in b.error
    # the same guest without the sign runs into the timeout
    b = qemu._boot(["sh", "-c", "echo booting; exec sleep 60"], tmp_path / "console.log", tmp_path / "result", 3, False)
    assert b.timed_out and b.error == "killed after 3 s"


def test_a_rows_only_expression_narrows_its_guest_tests():
    import run
    rows = {r.id: r for r in matrix.load()}
    assert run.with_only([], "") == []
    assert run.with_only(["-x"], "test_vm_load") == ["-x", "-k", "test_vm_load"]
    assert run.with_only(["-k", "tamper"], "test_vm_load or test_guest_env") == \
        ["-k", "(tamper) and (test_vm_load or test_guest_env)"]
    assert "test_vm_load" in rows["5.10-bookworm"].only and "not test_vm_reload" in rows["5.10"].only
    assert rows["6.1-fmod_ret"].only == ""   # the one row that runs everything
