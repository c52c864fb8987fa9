"""Server time of the emulator: an injectable clock, optionally sped up."""

from __future__ import annotations

import time
from typing import Callable

SECONDS_PER_DAY = 86_400


class EmulatorClock:
    """Time as the server judges it: rate windows, UTC days and token expiry all use now().

    With speedup s, every second of the source clock after creation counts as s seconds, so
    speedup=60 turns a real second into a rate-window minute.
    """

    def __init__(self, source: Callable[[], float] | None = None, speedup: float = 1.0) -> None:
        if speedup <= 0:
            raise ValueError("speedup must be > 0")
        self._source = source or time.time
        self._speedup = speedup
        self._origin = self._source()

    def now(self) -> float:
        elapsed = self._source() - self._origin
        return self._origin + elapsed * self._speedup


def utc_day(epoch_seconds: float) -> int:
    """Days since 1970-01-01 UTC: quotas reset when this changes."""
    return int(epoch_seconds // SECONDS_PER_DAY)
