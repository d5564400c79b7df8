"""One fake GitHub job for the action's tests, on the host (node) and in guests (python): the fake
Runner.Worker runs main, the given steps and post, while a process outside its tree keeps opening a file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
WORKER = HERE / "fake_worker.py"


class Job:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.ws = tmp / "ws"
        self.temp = tmp / "runner-temp"
        for d in (self.ws, self.temp):
            d.mkdir(parents=True, exist_ok=True)
        self.files = {n: tmp / n for n in ("summary.md", "env", "state", "output")}
        self.outsider_file = tmp / "outsider-marker"
        self.results = []

    def env(self, extra_path: str = "") -> dict:
        path = os.environ.get("PATH", "/usr/bin:/bin")
        return {"GITHUB_WORKSPACE": str(self.ws), "RUNNER_TEMP": str(self.temp),
                "GITHUB_STEP_SUMMARY": str(self.files["summary.md"]), "GITHUB_ENV": str(self.files["env"]),
                "GITHUB_STATE": str(self.files["state"]), "GITHUB_OUTPUT": str(self.files["output"]),
                "PATH": f"{extra_path}:{path}" if extra_path else path,
                "ASSAY_ACTION_READY_TIMEOUT": "300"}

    def run(self, main, post, steps, inputs, extra_path="", timeout=600):
        """main, post: argv of the two action steps; steps: argv lists run between them."""
        inp = {f"INPUT_{k.upper()}": v for k, v in inputs.items()}
        plan = {"env": self.env(extra_path),
                "steps": [{"argv": main, "env": inp}] + [{"argv": s} for s in steps] +
                         [{"argv": post, "env": inp, "state": True}]}
        (self.tmp / "plan.json").write_text(json.dumps(plan))
        stop = threading.Event()

        def outsider():   # not a descendant of the worker: must never be in the log
            while not stop.is_set():
                with open(self.outsider_file, "w"):
                    pass
                time.sleep(0.01)
        t = threading.Thread(target=outsider, daemon=True)
        t.start()
        try:
            subprocess.run([sys.executable, str(WORKER), str(self.tmp / "plan.json"), str(self.tmp / "results.json")],
                           check=True, timeout=timeout)
        finally:
            stop.set()
            t.join()
        self.results = json.loads((self.tmp / "results.json").read_text())
        return self.results

    def read(self, name: str) -> str:
        p = self.files[name]
        return p.read_text() if p.exists() else ""

    def events_path(self):
        for line in self.read("env").splitlines():
            if line.startswith("ASSAY_EVENTS="):
                return Path(line.split("=", 1)[1])
        return None

    def events(self):
        p = self.events_path()
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p else []
