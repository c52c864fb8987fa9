"""Backoff arithmetic for re-enqueued requests. Pure."""

from __future__ import annotations

import math
import random
from typing import Any

# A queue message can be hidden for at most 7 days.
MAX_VISIBILITY_SECONDS = 7 * 24 * 3600 - 60
MAX_JITTER_SECONDS = 30.0


def retry_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with equal jitter: in [d/2, d] for d = min(cap, base * 2**(attempt-1))."""
    source: Any = rng if rng is not None else random
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return min(MAX_VISIBILITY_SECONDS, ceiling / 2 + source.uniform(0, ceiling / 2))


def visibility_for(wait_seconds: float, jitter_fraction: float = 0.1, rng: random.Random | None = None) -> int:
    """Whole seconds to hide a re-enqueued message for a known wait, with a little jitter so a
    crowd deferred to the same instant does not wake together."""
    source: Any = rng if rng is not None else random
    wait = max(0.0, wait_seconds)
    # At most half a minute of jitter: enough to spread a crowd, never hours on a day-long wait.
    jitter = (
        source.uniform(0, min(MAX_JITTER_SECONDS, max(1.0, wait * jitter_fraction))) if jitter_fraction > 0 else 0.0
    )
    return math.ceil(min(MAX_VISIBILITY_SECONDS, wait + jitter))
