"""Scheduled send (`sendAt`): parsing, the 7-day bound, and how long an early request waits.

The contract (`contract.validate_request`, `contract.check_send_at`) turns these into refusals.

Pure policy: no I/O. The send stage holds an early request on the queue (a copy with a visibility
delay: the storage queue hides a message for at most 7 days, hence the bound), without a send, an
attempt or a governor slot (shared/send/hold.py), and counts the request's age limit from `sendAt`.
Not to be confused with shared/send/schedule.py, the send stage's step that finds an account and a
slot for each transaction.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from shared.send.retry import MAX_VISIBILITY_SECONDS

# The storage queue's longest visibility timeout: a request may be scheduled this far ahead at most
# (of the relay's clock when it reads the request).
MAX_SEND_AHEAD_SECONDS = 7 * 24 * 3600

# RFC 3339 (the ISO 8601 profile JSON Schema calls date-time): date, time with seconds, optional
# fraction, and an offset or Z. A time without an offset is refused: whose local time would it be?
_SEND_AT = re.compile(
    r"^(?P<date>\d{4}-\d{2}-\d{2})[Tt](?P<h>\d{2}):(?P<m>\d{2}):(?P<s>\d{2})(?:\.(?P<frac>\d{1,9}))?"
    r"(?:(?P<z>[Zz])|(?P<sign>[+-])(?P<oh>\d{2}):(?P<om>\d{2}))",
    re.ASCII,  # ASCII digits only (\d would take any script's)
)
_FORMAT_HINT = "an ISO 8601 date and time with seconds and an offset or Z, e.g. 2026-11-02T09:00:00+01:00"


class BadSendAt(ValueError):
    """`sendAt` is not a date and time the relay reads; the message says what it must be (never
    quoting the producer's text)."""


def parse_send_at(value: Any) -> float | None:
    """Epoch seconds of a request's `sendAt`, None when it names none."""
    if value is None:
        return None
    match = _SEND_AT.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise BadSendAt(f"sendAt must be {_FORMAT_HINT}")
    try:
        offset = timedelta(0)
        if not match.group("z"):
            hours, minutes = int(match.group("oh")), int(match.group("om"))
            if hours > 23 or minutes > 59:
                raise ValueError("offset")
            offset = timedelta(hours=hours, minutes=minutes) * (-1 if match.group("sign") == "-" else 1)
        year, month, day = (int(part) for part in match.group("date").split("-"))
        fraction = (match.group("frac") or "0")[:6].ljust(6, "0")
        when = datetime(
            year,
            month,
            day,
            int(match.group("h")),
            int(match.group("m")),
            int(match.group("s")),
            int(fraction),
            tzinfo=timezone(offset),
        )
        return when.timestamp()
    except (ValueError, OverflowError):
        raise BadSendAt(f"sendAt is not a real date and time ({_FORMAT_HINT})") from None


def hold_seconds(send_at: float | None, now: float) -> float:
    """How long an early request goes back on the queue for: the time left until `sendAt`, at most
    the queue's longest visibility timeout (it then comes back early and is held again); 0 when due."""
    if send_at is None or send_at <= now:
        return 0.0
    return min(send_at - now, float(MAX_VISIBILITY_SECONDS))


def held_reason(send_at: float) -> str:
    """The ledger's reason for a request held until its sendAt (a time, never an address)."""
    return "scheduled: not before " + datetime.fromtimestamp(send_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
