"""Every workflow in .github/workflows/: actionlint clean, and the repository's policy
(scripts/ci/check_workflows.py): top-level `permissions: contents: read`, actions pinned by
commit SHA, fork gating for self-hosted jobs, images pinned by digest. Negative cases show
the checker (and actionlint) do fail.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts" / "ci"))
import check_workflows as cw  # noqa: E402

SHA = "3d3c42e5aac5ba805825da76410c181273ba90b1"
DIGEST = "sha256:" + "ab" * 32
WORKFLOWS = cw.workflow_files()


def _load(name: str) -> dict:
    return YAML(typ="safe", pure=True).load((REPO / ".github/workflows" / name).read_text())


def _write(tmp_path: Path, text: str, name: str = "wf.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = f"""\
name: good
on: [push]
permissions:
  contents: read
jobs:
  build:
    runs-on: ubuntu-24.04
    container:
      image: debian:12@{DIGEST}
    services:
      db:
        image: postgres:16@{DIGEST}
    steps:
      - uses: actions/checkout@{SHA}  # v7.0.1
      - uses: ./.github/actions/local
      - uses: docker://alpine:3.20@{DIGEST}
      - run: echo ok
  selfhosted:
    if: github.event.pull_request.head.repo.fork == false
    runs-on: [self-hosted, linux, arm64]
    permissions:
      contents: write
    steps:
      - run: echo ok
"""


def test_workflows_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "release.yml"} <= names, names


@pytest.mark.parametrize("wf", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_policy(wf):
    # Every file in .github/workflows/ (kernel-matrix.yml too, once it exists).
    assert cw.check_workflow(wf) == []


def test_actionlint_clean():
    res = cw.run_actionlint(WORKFLOWS)
    assert res.returncode == 0, res.stdout + res.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path):
    bad = _write(tmp_path, GOOD.replace("runs-on: ubuntu-24.04", "runs-on: ubuntu-24.04\n    timeout-minutes: soon")
                 .replace("run: echo ok", "run: echo ${{ github.event.no_such_thing.oops( }}", 1))
    res = cw.run_actionlint([bad])
    assert res.returncode != 0
    assert "wf.yml" in res.stdout


def test_checker_accepts_a_compliant_workflow(tmp_path):
    assert cw.check_workflow(_write(tmp_path, GOOD)) == []


@pytest.mark.parametrize("mutation, expect", [
    (lambda t: t.replace("permissions:\n  contents: read\n", "", 1), "no top-level `permissions:`"),
    (lambda t: t.replace("  contents: read\n", "  contents: write\n", 1), "contents is 'write'"),
    (lambda t: t.replace("  contents: read\n", "  contents: read\n  packages: write\n", 1),
     "top-level permission packages: write"),
    (lambda t: t.replace("permissions:\n  contents: read\n", "permissions: read-all\n", 1), "need a mapping"),
    (lambda t: t.replace("    permissions:\n      contents: write\n", "    permissions: write-all\n"), "write-all"),
    (lambda t: t.replace(f"actions/checkout@{SHA}", "actions/checkout@v4"), "not pinned by a 40-hex commit SHA"),
    (lambda t: t.replace(f"actions/checkout@{SHA}", f"actions/checkout@{SHA[:12]}"), "not pinned"),
    (lambda t: t.replace(f"actions/checkout@{SHA}", "actions/checkout@main"), "not pinned"),
    (lambda t: t.replace("    if: github.event.pull_request.head.repo.fork == false\n", ""), "may run self-hosted"),
    (lambda t: t.replace("github.event.pull_request.head.repo.fork == false",
                         "github.event_name == 'push'"), "may run self-hosted"),
    (lambda t: t.replace(f"debian:12@{DIGEST}", "debian:12"), "jobs.build.container.image"),
    (lambda t: t.replace(f"postgres:16@{DIGEST}", "postgres:16"), "jobs.build.services.db.image"),
    (lambda t: t.replace(f"alpine:3.20@{DIGEST}", "alpine:3.20"), "image `alpine:3.20`"),
])
def test_checker_rejects(tmp_path, mutation, expect):
    text = mutation(GOOD)
    assert text != GOOD, "mutation did not apply"
    problems = cw.check_workflow(_write(tmp_path, text))
    assert any(expect in p for p in problems), problems


def test_checker_treats_expression_runners_as_possibly_self_hosted(tmp_path):
    text = GOOD.replace("runs-on: ubuntu-24.04", "runs-on: ${{ matrix.os }}")
    problems = cw.check_workflow(_write(tmp_path, text))
    assert any("jobs.build may run self-hosted" in p for p in problems), problems


def test_checker_cli_fails_on_missing_permissions(tmp_path):
    good = _write(tmp_path, GOOD, "good.yml")
    bad = _write(tmp_path, GOOD.replace("permissions:\n  contents: read\n", "", 1), "bad.yml")
    script = REPO / "scripts/ci/check_workflows.py"
    ok = subprocess.run([sys.executable, str(script), str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    res = subprocess.run([sys.executable, str(script), str(good), str(bad)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 1
    assert "bad.yml: no top-level `permissions:`" in res.stdout
    assert "good.yml" not in res.stdout
    full = subprocess.run([sys.executable, str(script), "--actionlint"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert full.returncode == 0, full.stdout + full.stderr


# ---- what the issue asks of each workflow, read from the YAML

def _runs(doc: dict) -> List[str]:
    return [str(s.get("run", "")) for j in doc["jobs"].values() for s in j.get("steps", [])]


def test_ci_workflow_covers_lint_tests_bpf_wheel_and_logs():
    doc = _load("ci.yml")
    assert "pull_request" in doc["on"] and "push" in doc["on"]
    runs = "\n".join(_runs(doc))
    for needle in ("compileall", "shellcheck", "check_workflows.py --actionlint", "pytest",
                   "make test-host", "make deps bpf", "make wheel"):
        assert needle in runs, needle
    uploads = [s for j in doc["jobs"].values() for s in j["steps"]
               if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    smoke = [s for s in uploads if s["with"]["name"] == "smoke-logs"]
    assert smoke and smoke[0]["if"] == "always()"


def test_release_workflow_gates_builds_tests_and_publishes():
    doc = _load("release.yml")
    assert doc["on"]["push"]["tags"] == ["v*"]
    jobs = doc["jobs"]
    runs = {jid: "\n".join(str(s.get("run", "")) for s in j["steps"]) for jid, j in jobs.items()}
    assert "scripts/ci/check_release.sh" in runs["check"]
    assert "make wheel" in runs["build"] and "--sdist" in runs["build"]
    assert "check_release.sh --dist dist" in runs["build"]
    assert "make -o wheel matrix" in runs["matrix"]  # the downloaded wheel, not a rebuilt one
    assert jobs["matrix"]["needs"] == "build"
    assert set(jobs["publish"]["needs"]) == {"build", "matrix"}
    assert "scripts/ci/publish_idempotent.sh" in runs["publish"]
    env = next(s["env"] for s in jobs["publish"]["steps"] if "publish_idempotent" in str(s.get("run", "")))
    assert env["PUBLISH_TOKEN"] == "${{ secrets.PUBLISH_TOKEN }}"
    # The only write permission is on the job that creates the GitHub release.
    writers = {jid for jid, j in jobs.items()
               if any(v == "write" for v in (j.get("permissions") or {}).values())}
    assert writers == {"github-release"}
    assert "${{ secrets." not in "\n".join(runs.values())  # secrets reach scripts via env only


def test_action_yml_is_a_node20_action_with_the_issues_inputs():
    doc = YAML(typ="safe", pure=True).load((REPO / "action.yml").read_text())
    assert doc["runs"]["using"] == "node20"
    for key in ("main", "post"):
        assert (REPO / doc["runs"][key]).is_file(), doc["runs"][key]
    assert set(doc["inputs"]) == {"policy", "mode", "version", "install", "scope-pid", "fail-on", "events"}
    defaults = {k: v.get("default") for k, v in doc["inputs"].items()}
    assert defaults["mode"] == "audit" and defaults["install"] == "true" and defaults["fail-on"] == "blocked"
    assert "events" in doc["outputs"]
    # JS stays a thin launcher: node's own modules only, no package.json, no node_modules
    for js in (REPO / "action").glob("*.js"):
        for mod in __import__("re").findall(r"require\('([^']+)'\)", js.read_text()):
            assert mod in ("child_process", "fs", "os", "path", "./lib"), (js.name, mod)
    assert not (REPO / "action" / "package.json").exists() and not (REPO / "node_modules").exists()


def test_action_example_runs_the_local_action_in_audit_mode_on_a_hosted_runner():
    doc = _load("action-example.yml")
    job = doc["jobs"]["audit"]
    assert job["runs-on"].startswith("ubuntu-")
    steps = job["steps"]
    i = next(n for n, s in enumerate(steps) if s.get("uses") == "./")
    assert steps[i]["with"]["mode"] == "audit"
    assert any("run" in s for s in steps[i + 1:]), "no step after the guard for it to watch"
    upload = [s for s in steps[i + 1:] if str(s.get("uses", "")).startswith("actions/upload-artifact@")]
    assert upload and upload[0]["if"] == "always()" and "steps.assay.outputs.events" in upload[0]["with"]["path"]
