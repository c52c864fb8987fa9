"""What the send stage answers for one queue message, and what it counts per process."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from shared.ledger import LedgerEntry


@dataclass(frozen=True)
class Handled:
    """What became of one queue message (returned for the host's log and for tests)."""

    request_id: str
    state: str  # sent | deferred | refused | dead | duplicate | busy | pacer
    reason: str = ""
    account: str = ""
    code: int = 0
    delay_seconds: int = 0
    # The ledger row as it stands when it is final (recorded or found by this delivery): its event.
    row: LedgerEntry | None = field(default=None, compare=False, repr=False)


@dataclass
class RelayStats:
    """Counts for the simulation and the benchmarks (per process)."""

    late: int = 0  # requests that came back after their booked slot plus the tolerance
    late_rebooked: int = 0  # ...of which could not go at once and were booked again (or wait)
    lapsed: int = 0  # grants that got old waiting for an SMTP session and were not taken again
    session_waits: int = 0  # decisions put off while this process had no SMTP session free for an account free now


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
