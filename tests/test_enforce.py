"""Rule paths to inode keys (seed section 3), map filling speed, and the native fail-closed exit 40."""
from __future__ import annotations

import ctypes
import os
import subprocess
import time

import pytest

from assay import abi, enforce
from assay.errors import InputError
from assay.policy import parse_policy


def policy(rules_yaml: str, path="p.yaml"):
    return parse_policy('version: "2.0"\nname: t\nruntime_monitor:\n  enabled: true\n  rules:\n' + rules_yaml, path)


def test_keys_cover_both_dev_encodings_and_gen_fallback():
    dev = os.makedev(259, 300)  # a minor above 255 makes the two encodings differ in every bit group
    keys = [abi.InodeKey.from_buffer_copy(k) for k in enforce.InodeId(dev=dev, ino=42, gen=7, is_dir=False).keys()]
    got = {(k.dev, k.gen) for k in keys}
    old = (259 << 20) | 300
    assert got == {(dev, 7), (old, 7), (dev, 0), (old, 0)}
    assert all(k.ino == 42 for k in keys)
    assert dev != old
    no_gen = [abi.InodeKey.from_buffer_copy(k) for k in enforce.InodeId(dev=dev, ino=42, gen=None, is_dir=False).keys()]
    assert {(k.dev, k.gen) for k in no_gen} == {(dev, 0), (old, 0)}


def test_identify_matches_stat(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    ident = enforce.identify(str(f))
    st = os.stat(f)
    assert (ident.dev, ident.ino, ident.is_dir) == (st.st_dev, st.st_ino, False)


def test_identify_does_not_follow_symlinks(tmp_path):
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert enforce.identify(str(tmp_path / "link")).ino == os.lstat(tmp_path / "link").st_ino


def test_symlink_rule_enforces_target_and_says_so(tmp_path):
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    p = enforce.plan(policy(f"    - id: r\n      type: file_open\n      match: {{ path_globs: ['{tmp_path}/link'] }}\n"
                            "      action: deny\n"))
    assert p.entries[0].inode.ino == os.stat(tmp_path / "target").st_ino
    assert any("symbolic link" in n for n in p.notes)


def test_missing_path_is_an_error_with_position(tmp_path):
    with pytest.raises(InputError) as e:
        enforce.plan(policy(f"    - id: r\n      type: file_open\n      match: {{ path_globs: ['{tmp_path}/nope'] }}\n"
                            "      action: deny\n"))
    assert str(e.value).startswith("p.yaml:8:") and "does not exist" in str(e.value)
    assert e.value.exit_code == 1


def test_missing_path_allowed_is_covered_by_parent_subtree(tmp_path):
    p = enforce.plan(policy(f"    - id: r\n      type: file_open\n      match: {{ path_globs: ['{tmp_path}/a/nope'] }}\n"
                            "      action: deny\n      allow_missing: true\n"))
    (e,) = p.entries
    assert e.map_name == "file_deny_dirs" and e.inode.ino == os.stat(tmp_path).st_ino
    assert any(f"{tmp_path}/**" in n for n in p.notes)


def test_subtree_on_a_file_is_an_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        enforce.plan(policy(f"    - id: r\n      type: file_open\n      match: {{ path_globs: ['{tmp_path}/f/**'] }}\n"
                            "      action: deny\n"))


def test_plan_maps_and_actions(tmp_path):
    for n in ("a", "b"):
        (tmp_path / n).write_text(n)
    (tmp_path / "d" / "pub").mkdir(parents=True)
    p = enforce.plan(policy(
        f"    - id: files\n      type: file_open\n      match: {{ path_globs: ['{tmp_path}/a'] }}\n      action: alert\n"
        f"    - id: tree\n      type: file_open\n      match: {{ path_globs: ['{tmp_path}/d/**', '{tmp_path}/b'],"
        f" not: {{ path_globs: ['{tmp_path}/d/pub/**'] }} }}\n      action: deny\n"))
    got = {(e.map_name, os.path.basename(e.path), e.action) for e in p.entries}
    assert got == {("file_deny", "a", abi.Action.ALERT), ("file_deny_dirs", "d", abi.Action.DENY),
                   ("file_deny", "b", abi.Action.DENY), ("file_allow_dirs", "pub", abi.Action.DENY)}
    assert p.rule_bits("file") == (abi.RULES_DENY | abi.RULES_DENY_DIRS | abi.RULES_ALLOW_DIRS
                                   | abi.RULES_DENY_NAMES)
    assert p.rule_names == {1: "files", 2: "tree"}
    # every exact deny also by its place: the identity of its directory and its name
    parent = enforce.identify(str(tmp_path))
    assert {(n.map_name, n.name, n.rule_index, n.parent) for n in p.names} == {
        ("file_deny_names", b"a", 1, parent), ("file_deny_names", b"b", 2, parent)}
    key = abi.NameKey.from_buffer_copy(p.names[0].keys()[0])
    assert (key.parent_ino, key.name_len, key.name_hash) == (parent.ino, 1, abi.name_hash(p.names[0].name))


def test_name_hash_is_fnv1a_over_zero_padded_chunks():
    # FNV-1a 64 of one chunk; the kernel side (bpf/src/file.bpf.h) reads the same chunks
    assert abi.name_hash(b"") == abi.FNV_OFFSET
    one = ((abi.FNV_OFFSET ^ int.from_bytes(b"a", "little")) * abi.FNV_PRIME) & (2 ** 64 - 1)
    assert abi.name_hash(b"a") == one
    assert abi.name_hash(b"a" * 8) != abi.name_hash(b"a" * 9) != abi.name_hash(b"a" * 10)


@pytest.mark.root
def test_ten_thousand_rules_load_fast(tmp_path, obj_path):
    from assay.bpf import Object

    d = tmp_path / "many"
    d.mkdir()
    paths = []
    for i in range(10000):
        f = d / f"f{i}"
        f.write_text("")
        paths.append(str(f))
    pol = policy("    - id: many\n      type: file_open\n      match:\n        path_globs:\n" +
                 "".join(f"          - {p}\n" for p in paths) + "      action: deny\n")
    with Object(obj_path) as obj:
        for prog in obj.programs.values():
            prog.autoload = False
        obj.load()
        t0 = time.perf_counter()
        p = enforce.plan(pol)
        t1 = time.perf_counter()
        written = enforce.apply(p, obj.maps)
        t2 = time.perf_counter()
        assert written == len(list(obj.maps["file_deny"].keys())) + len(list(obj.maps["file_deny_names"].keys()))
        assert len(list(obj.maps["name_dirs"].keys())) == len(p.names[0].gate_keys())  # one directory
        assert obj.maps["file_deny"].lookup(p.entries[123].inode.keys()[0]) is not None
    # four keys per file with a generation (ext4), two without one (tmpfs)
    by_inode, by_name = sum(len(e.inode.keys()) for e in p.entries), sum(len(n.keys()) for n in p.names)
    assert written == by_inode + by_name and by_inode >= 2 * 10000 and by_name >= 10000
    print(f"\n10k rules: resolve {t1 - t0:.3f}s, map fill {t2 - t1:.3f}s, total {t2 - t0:.3f}s")
    assert t2 - t0 < 1.0


@pytest.mark.root
def test_a_policy_no_backend_can_enforce_fails_closed_with_40(assay_cmd, tmp_path, obj_path):
    """A subtree on /proc: the LSM forms judge it but do not load on this kernel, and the host
    backend refuses it (fanotify cannot watch a pseudo filesystem). The workload never runs."""
    from assay import doctor
    checks = {c.name: c for c in doctor.run_checks(obj_path)}
    if checks["enforcer_lsm"].ok or checks["enforcer_fmod_ret"].ok:
        pytest.skip("this kernel runs BPF trampoline programs: the guests cover the enforcing case")
    pol = tmp_path / "p.yaml"
    pol.write_text('version: "2.0"\nname: t\nruntime_monitor:\n  enabled: true\n  rules:\n'
                   "    - id: s\n      type: file_open\n      match: { path_globs: ['/proc/sys/**'] }\n"
                   "      action: deny\n")
    marker = tmp_path / "ran"
    p = subprocess.run(assay_cmd + ["monitor", "--policy", str(pol), "--", "touch", str(marker)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 40, p.stderr
    lines = [line for line in p.stderr.splitlines() if not line.startswith("assay: note")]
    assert "no enforcement backend works" in lines[0] and "Traceback" not in p.stderr
    # one line per backend, each with its reason
    assert [line.split(":")[0].strip() for line in lines[1:4]] == ["lsm", "fmod_ret", "host"]
    assert "rule s: the host backend cannot" in lines[3]
    assert not marker.exists(), "the workload ran although enforcement failed"



def _e(map_name, path, rule):
    ident = enforce.InodeId(dev=1, ino=abs(hash(path)) % 10**9, gen=None, is_dir=map_name.endswith("_dirs"))
    return enforce.Entry(map_name, ident, rule, enforce.abi.Action.DENY, path)


def test_one_rules_exception_never_lifts_another_rules_deny():
    # rule 1: deny /l/** not /l/d/pub/ok/**; rule 2: deny /l/d/** not /l/d/pub/**, /l/d/keep;
    # rule 3: deny /s/** not /s/k; rule 4: deny /s/k (same level: the kernel keeps it already).
    entries = [_e("file_deny_dirs", "/l", 1), _e("file_allow_dirs", "/l/d/pub/ok", 1),
               _e("file_deny_dirs", "/l/d", 2), _e("file_allow_dirs", "/l/d/pub", 2), _e("file_allow", "/l/d/keep", 2),
               _e("file_deny_dirs", "/s", 3), _e("file_allow", "/s/k", 3), _e("file_deny", "/s/k", 4),
               _e("exec_deny_dirs", "/", 5)]
    notes = []
    added = enforce._keep_other_rules(entries, {i: f"r{i}" for i in range(1, 6)}, notes)
    got = sorted((e.map_name, e.path, e.rule_index) for e in added)
    # rule 1 repeats its deny where rule 2 excepts; rule 2 lifts nothing of rule 1's exception
    # (/l/d/pub/ok is below rule 2's own exception /l/d/pub); file rules never touch exec rules.
    assert got == [("file_deny", "/l/d/keep", 1), ("file_deny_dirs", "/l/d/pub", 1)]
    assert len(notes) == 2 and all("is an exception of rule r2 only" in n for n in notes)


def test_the_allow_list_catch_all_judges_execve_but_not_mappings(tmp_path):
    """deny / (all of it) except some programs: the shared libraries those programs map are in no
    list, so the catch-all's entries carry the flag that keeps mmap/mprotect out of it."""
    (tmp_path / "tools").mkdir()
    pol = policy("    - id: allow-list\n      type: proc_exec\n      match:\n        path_globs: ['/**']\n"
                 f"        not: {{ path_globs: ['{tmp_path}/tools/**'] }}\n      action: deny\n"
                 f"    - id: narrow\n      type: proc_exec\n      match: {{ path_globs: ['{tmp_path}/**'] }}\n"
                 "      action: deny\n")

    class FakeMap:
        def __init__(self):
            self.items = []

        def update_many(self, items):
            self.items += items

    maps = {name: FakeMap() for name in ("exec_deny_dirs", "exec_allow_dirs", "subtree_devs", "exec_deny",
                                          "exec_allow")}
    enforce.apply(enforce.plan(pol), maps)
    refs = {}
    for k, v in maps["exec_deny_dirs"].items:
        key, ref = abi.InodeKey.from_buffer_copy(k), abi.RuleRef.from_buffer_copy(v)
        refs[key.ino] = (ref.rule_id, ref.action)
    assert refs[os.stat("/").st_ino] == (1, int(abi.Action.DENY) | abi.ACT_FLAG_NOT_MAPS)
    assert refs[os.stat(tmp_path).st_ino] == (2, int(abi.Action.DENY))  # narrower rules judge mappings too


def test_graceful_kill_grace_is_known_for_net_rules_too():
    pol = parse_policy(
        'version: "2.0"\nname: t\nruntime_monitor:\n  enabled: true\n  rules:\n'
        "    - id: no-ssh\n      type: net_connect\n      match: { dest_globs: ['22'] }\n      action: trigger_kill\n"
        "kill_switch: { enabled: true, mode: graceful, grace_period_ms: 700, triggers: [ { on_rule: no-ssh } ] }\n",
        "p.yaml")
    assert enforce.plan(pol).kill_graceful == {1: 700}
