"""The Wilson gate: the lower bound of the Wilson score interval, and the rounded score entries are gated on."""
from __future__ import annotations

import math
from typing import Optional


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
