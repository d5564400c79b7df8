"""The Wilson gate: the lower bound of the Wilson score interval, the rounded score entries are
gated on, and the bucket (allow, needs_review, deny, skipped) each profile entry lands in."""
from __future__ import annotations

import math
from typing import Optional

import attrs

from assay.learning.constants import NET_CONNECT
from assay.learning.generalisation import is_relative
from assay.learning.profile import Entry


def wilson_lower_bound(k: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval for k successes in n trials (0 when n is 0)."""
    if n <= 0:
        return 0.0
    p = k / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z2 / n))


def score(k: int, n: int, z: float = 1.96) -> float:
    """The gated score: the Wilson bound rounded to 2 places, the number `profile show` prints.
    Gating on the shown number keeps 9/10 (0.5958 -> 0.60) at a 0.6 threshold, as in the worked values."""
    return round(wilson_lower_bound(k, n, z), 2)


def runs_needed(min_stability: float, z: float = 1.96, limit: int = 100000) -> Optional[int]:
    """Fewest runs after which an item seen in every run is allowed (k = n scores n / (n + z^2))."""
    if min_stability >= 1:
        return None
    # n / (n + z^2) >= s  <=>  n >= s z^2 / (1 - s); start just below and let score()'s rounding decide
    n = max(1, int(min_stability * z * z / (1 - min_stability)) - 2)
    while n <= limit:
        if score(n, n, z) >= min_stability:
            return n
        n += 1
    return None


@attrs.frozen
class Decision:
    kind: str
    value: str
    bucket: str             # allow | needs_review | deny | skipped
    score: float
    runs_seen: int
    total_runs: int
    reason: str


def gate(entry: Entry, total_runs: int, min_stability: float = 0.7, review_threshold: float = 0.6,
         min_runs: int = 1, new_is_risky: bool = False, z: float = 1.96) -> Decision:
    s = score(entry.runs_seen, total_runs, z)

    def d(bucket: str, reason: str) -> Decision:
        return Decision(entry.kind, entry.value, bucket, s, entry.runs_seen, total_runs, reason)

    if total_runs < min_runs:
        if new_is_risky:
            return d("needs_review", f"only {total_runs} runs < min-runs {min_runs} (--new-is-risky)")
        return d("skipped", f"only {total_runs} runs < min-runs {min_runs}")
    if is_relative(entry.kind, entry.value):
        return d("needs_review", "relative path: the working directory was unknown when recorded")
    why = unexpressible(entry.kind, entry.value)
    if why:
        return d("needs_review", f"cannot be written as a policy glob: {why}")
    if s >= min_stability:
        return d("allow", f"wilson {s:.2f} >= {min_stability}")
    if s >= review_threshold:
        return d("needs_review", f"{review_threshold} <= wilson {s:.2f} < {min_stability}")
    return d("deny", f"wilson {s:.2f} < {review_threshold}")


def unexpressible(kind: str, value: str) -> Optional[str]:
    """Why the policy loader would refuse VALUE as an allowed item (e.g. a file name with '*'), or None."""
    from assay.policy import parse_dest, parse_path_glob   # the loader is the one judge of its grammar

    try:
        if kind == NET_CONNECT:
            parse_dest(value)
        else:
            parse_path_glob(value)
    except ValueError as e:
        return str(e)
    return None
