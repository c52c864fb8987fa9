"""Send latency as a small fixed-bucket histogram: arithmetic only (no I/O).

Latency is the time from when the relay first saw a request (the ledger's `first_received`) to HVE's
`250` for its last transaction. Each sent request adds 1 to one counter of its hourly aggregate row
(`latency.<upper bound>`, e.g. `latency.5` for 2 s < latency <= 5 s, `latency.inf` above the last
bound), so the histogram rides the row's existing counters: no extra row, no extra write, and
merging histograms (shards, rollups of closed days, several hours into a day) is adding counters.

Quantiles are estimated as the upper bound of the bucket that holds the ceil(q * n)-th fastest
request: the true value is at most that (never optimistic), and at most one bucket width above it.
Past the last finite bound the estimate is None (more than an hour: no upper bound is known).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Upper bounds in seconds; a last bucket holds everything above the last one.
BOUNDS: tuple[int, ...] = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
PREFIX = "latency."
NAMES: tuple[str, ...] = tuple(f"{PREFIX}{b}" for b in BOUNDS) + (f"{PREFIX}inf",)
_INDEX = {name: i for i, name in enumerate(NAMES)}


def bucket_index(seconds: float) -> int:
    """The bucket of a latency: the first bound it does not exceed (negative, e.g. clock skew
    between instances: the first)."""
    if not seconds > 0:  # also NaN
        return 0
    for i, bound in enumerate(BOUNDS):
        if seconds <= bound:
            return i
    return len(BOUNDS)


def counter_name(seconds: float) -> str:
    """The aggregate counter one request with this latency adds 1 to."""
    return NAMES[bucket_index(seconds)]


def histogram(counts: Mapping[str, int]) -> list[int]:
    """The histogram (len(BOUNDS) + 1 buckets) held in one set of aggregate counters."""
    out = [0] * len(NAMES)
    for name, n in counts.items():
        i = _INDEX.get(name)
        if i is not None:
            out[i] += int(n)
    return out


def merge(histograms: Iterable[Sequence[int]]) -> list[int]:
    """Bucket-wise sum: the histogram of all the requests of the parts."""
    out = [0] * len(NAMES)
    for h in histograms:
        if len(h) != len(NAMES):
            raise ValueError(f"a histogram has {len(NAMES)} buckets, not {len(h)}")
        for i, n in enumerate(h):
            out[i] += n
    return out


def quantile(hist: Sequence[int], q: float) -> float | None:
    """Estimate of the q-quantile (0 < q <= 1): the upper bound of the bucket holding the
    ceil(q * n)-th fastest request. None when the histogram is empty or that bucket is the last
    (above BOUNDS[-1])."""
    if not 0 < q <= 1:
        raise ValueError("q must be in (0, 1]")
    total = sum(n for n in hist if n > 0)
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total - 1e-9))
    seen = 0
    for i, n in enumerate(hist):
        seen += max(0, n)
        if seen >= rank:
            return float(BOUNDS[i]) if i < len(BOUNDS) else None
    return None  # not reached


def summary(hist: Sequence[int]) -> dict[str, Any]:
    """count, histogram, p50 and p95 (seconds; None above the last bound) of one histogram."""
    return {"count": sum(hist), "histogram": list(hist), "p50": quantile(hist, 0.5), "p95": quantile(hist, 0.95)}


def slower_key(s: Mapping[str, Any]) -> tuple[float, float, int]:
    """Sort key of a `summary`, slowest first when reversed: p95, then p50 (None: above the last
    bound, the slowest), then the number of requests."""

    def seconds(v: float | None) -> float:
        return math.inf if v is None else float(v)

    return (seconds(s["p95"]), seconds(s["p50"]), int(s["count"]))
