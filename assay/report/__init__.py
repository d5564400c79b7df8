"""`assay report`: an event log or run record summarised for people (Markdown, text) or tools (JSON)."""
from __future__ import annotations

import json
from typing import Optional

from assay.errors import UsageError
from assay.report import markdown, model, text
from assay.report.load import EventLog, load, parse_events, parse_monitor_log
from assay.report.model import Report, build

FORMATS = ("markdown", "text", "json")

__all__ = ["EventLog", "Report", "FORMATS", "build", "load", "parse_events", "parse_monitor_log", "render",
           "report_file"]


def render(r: Report, fmt: str, max_bytes: Optional[int] = markdown.DEFAULT_MAX_BYTES) -> str:
    if fmt == "markdown":
        return markdown.render(r, max_bytes)
    if fmt == "text":
        return text.render(r)
    if fmt == "json":
        return json.dumps(model.as_dict(r), indent=2, sort_keys=True) + "\n"
    raise UsageError(f"--format: invalid value {fmt!r} (choose {', '.join(FORMATS)})")


def report_file(path: str, fmt: str = "markdown", workspace: Optional[str] = None,
                monitor_log: Optional[str] = None, max_bytes: Optional[int] = markdown.DEFAULT_MAX_BYTES) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format: invalid value {fmt!r} (choose {', '.join(FORMATS)})")
    return render(build(load(path, monitor_log), workspace), fmt, max_bytes)
