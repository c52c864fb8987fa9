"""Submission quotas of HVE: per-account external rate and daily quota, tenant daily quota.

A submission is counted by the server's clock when it arrives (end of DATA), and only once it
is accepted: refused messages use no slot, exactly as a client that counts from the 250 expects.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque

from . import replies
from .clock import utc_day
from .config import Limits


class _DailyCounter:
    """Count that starts again at 0 when the UTC day changes."""

    __slots__ = ("day", "count")

    def __init__(self) -> None:
        self.day = -1
        self.count = 0

    def value(self, day: int) -> int:
        return self.count if day == self.day else 0

    def add(self, day: int, amount: int) -> None:
        if day != self.day:
            self.day, self.count = day, 0
        self.count += amount


class SubmissionLimiter:
    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._lock = threading.Lock()
        self._external_times: dict[str, deque[float]] = defaultdict(deque)
        self._external_daily: dict[str, _DailyCounter] = defaultdict(_DailyCounter)
        self._tenant_daily = _DailyCounter()

    def admit(self, account: str, internal: int, external: int, now: float) -> str | None:
        """Record an arriving message and return None, or return the reply refusing it.

        Daily quotas are checked before the per-minute rate because they stay closed longer,
        so the reply tells the client the more useful thing to back off for.
        """
        limits = self._limits
        day = utc_day(now)
        key = account.lower()
        with self._lock:
            tenant_cap = limits.tenant_recipients_per_day
            if tenant_cap is not None and self._tenant_daily.value(day) + internal + external > tenant_cap:
                return replies.tenant_daily_quota_exceeded(account)
            if external:
                daily = self._external_daily[key]
                daily_cap = limits.external_recipients_per_day
                if daily_cap is not None and daily.value(day) + external > daily_cap:
                    return replies.external_daily_quota_exceeded(account)
                window = self._external_times[key]
                while window and window[0] <= now - limits.rate_window_seconds:
                    window.popleft()
                rate_cap = limits.external_messages_per_window
                if rate_cap is not None and len(window) >= rate_cap:
                    return replies.external_rate_exceeded(account)
                window.append(now)
                daily.add(day, external)
            self._tenant_daily.add(day, internal + external)
        return None

    def reset(self) -> None:
        with self._lock:
            self._external_times.clear()
            self._external_daily.clear()
            self._tenant_daily = _DailyCounter()
