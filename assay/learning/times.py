"""Timestamps: ISO 8601 in, one canonical UTC spelling out (runs and profiles compare them as strings)."""
from __future__ import annotations

import datetime


def _parse_time(text: str) -> datetime.datetime:
    """ISO 8601 -> aware UTC datetime. Accepts a trailing Z (fromisoformat only does from 3.11)."""
    if not isinstance(text, str) or not text:
        raise ValueError("expected an ISO 8601 timestamp string")
    s = text.strip()
    if s[-1:] in ("Z", "z"):
        s = s[:-1] + "+00:00"
    dt = datetime.datetime.fromisoformat(s)
    if dt.tzinfo is None:       # naive times are taken as UTC rather than the local zone of the reader
        dt = dt.replace(tzinfo=datetime.timezone.utc)
    return dt.astimezone(datetime.timezone.utc)


def _fmt_time(dt: datetime.datetime) -> str:
    spec = "microseconds" if dt.microsecond else "seconds"
    return dt.astimezone(datetime.timezone.utc).isoformat(timespec=spec).replace("+00:00", "Z")


def canonical_time(text: str) -> str:
    """One spelling per instant, so equal times compare equal as strings too."""
    return _fmt_time(_parse_time(text))


def now_utc() -> str:
    return _fmt_time(datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))
