"""Delivery confirmation, the pure part: which message-trace queries to make, whether Graph would
accept them, how many requests may be spent, how trace rows match our Message-IDs, and how a
request's per-recipient statuses turn into counts and exact deltas.

No I/O here: the adapter (shared/delivery/trace.py) reads Graph and Table storage.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

# Graph's exchangeMessageTraceStatus values (`recalled` only with Prefer: include-unknown-enum-members).
STATUSES = (
    "delivered",
    "failed",
    "pending",
    "expanded",
    "quarantined",
    "filteredAsSpam",
    "gettingStatus",
    "recalled",
    "unknownFutureValue",
)
# Still moving: re-read until final or older than DELIVERY_TRACE_MAX_AGE.
OPEN_STATUSES = frozenset({"pending", "gettingStatus"})
# Worth a getDetailsByRecipient call for the reason.
DETAIL_STATUSES = frozenset({"failed", "quarantined"})

MAX_SPAN = timedelta(days=10)  # receivedDateTime le - ge, at most
MAX_LOOKBACK = timedelta(days=90)  # receivedDateTime ge, no earlier than now minus this
MAX_PAGE_SIZE = 5000
THROTTLE_WINDOW_SECONDS = 300.0

_MESSAGE_ID = re.compile(r"^<?([0-9a-f]{40})(?:\.(\d{1,6}))?@([^<>@\s]+)>?$", re.IGNORECASE)


class FilterRefused(ValueError):
    """A message-trace filter Graph would answer with 400: never sent."""


def graph_time(when: datetime) -> str:
    """A full UTC date-time literal, unquoted, as Graph's `$filter` wants it."""
    if when.tzinfo is None:
        raise ValueError("a trace bound must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _odata_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def check_window(start: datetime, end: datetime, now: datetime) -> None:
    """Graph's rules for receivedDateTime: both bounds, start before end, span at most 10 days,
    start no more than 90 days ago, end not after now."""
    if start >= end:
        raise FilterRefused(f"trace window starts at {graph_time(start)}, not before its end {graph_time(end)}")
    if end - start > MAX_SPAN:
        raise FilterRefused(f"trace window spans {end - start}, more than Graph's {MAX_SPAN.days} days")
    if start < now - MAX_LOOKBACK:
        raise FilterRefused(f"trace window starts at {graph_time(start)}, more than {MAX_LOOKBACK.days} days ago")
    if end > now:
        raise FilterRefused(f"trace window ends at {graph_time(end)}, after now ({graph_time(now)})")


def trace_filter(sender: str, start: datetime, end: datetime, now: datetime) -> str:
    """The `$filter` of one trace query: one sender, both date bounds. Raises FilterRefused for
    what Graph would refuse, so such a query is never sent."""
    if not sender or "@" not in sender:
        raise FilterRefused(f"not a sender address: {sender!r}")
    check_window(start, end, now)
    return (
        f"senderAddress eq {_odata_string(sender)} and receivedDateTime ge {graph_time(start)} "
        f"and receivedDateTime le {graph_time(end)}"
    )


@dataclass(frozen=True)
class TraceConfig:
    overlap: timedelta = timedelta(minutes=30)
    max_age: timedelta = timedelta(days=3)
    span: timedelta = timedelta(hours=6)
    end_lag: timedelta = timedelta(minutes=1)
    requests_per_5min: int = 60
    page_size: int = MAX_PAGE_SIZE
    details_per_run: int = 10
    retry_after_max: timedelta = timedelta(hours=1)
    # Around each hour in which an account sent mail: the relay's clock and Exchange's differ a
    # little, and a send is counted under the hour it finished in, a moment after Exchange took it.
    send_margin: timedelta = timedelta(minutes=10)

    def __post_init__(self) -> None:
        if not timedelta(0) < self.span <= MAX_SPAN:
            raise ValueError(f"the trace span must be more than 0 and at most {MAX_SPAN.days} days")
        if not timedelta(0) < self.max_age < MAX_LOOKBACK:
            raise ValueError(f"the trace max age must be more than 0 and less than {MAX_LOOKBACK.days} days")
        if not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"the trace page size must be 1..{MAX_PAGE_SIZE}")


@dataclass(frozen=True)
class AccountCursor:
    """Where one account's reconciliation stands.

    `watermark`: trace read completely up to here at least once. `recheck_from`: from here on,
    rows must be read again (a recipient still pending, or a run stopped before re-reading them);
    None when nothing older than the overlap needs it. `not_before`: Graph asked us to wait."""

    account: str
    watermark: datetime | None = None
    recheck_from: datetime | None = None
    not_before: datetime | None = None
    # When a run last read one of this account's windows through (or found nothing to read up to
    # its plan's end): when the watermark was read.
    finished: datetime | None = None
    # Narrower windows than DELIVERY_TRACE_SPAN: one needed more pages than a run may spend.
    span: timedelta | None = None


# Narrowest window a too-full one is cut to (whole seconds, as the filter writes them).
MIN_SPAN = timedelta(minutes=1)


def narrower(cursor: AccountCursor, start: datetime, end: datetime) -> AccountCursor:
    """The cursor once the window start..end took a whole run's budget without being read
    through: from now on its windows are half as long (at least MIN_SPAN), so each fits in a run
    and progress is saved after each. Without this the account stayed first in line, spent every
    run's budget on the same window and never moved on, and no other account was read."""
    half = timedelta(seconds=max(MIN_SPAN.total_seconds(), (end - start).total_seconds() // 2))
    return replace(cursor, span=half if cursor.span is None else min(cursor.span, half))


def wider(cursor: AccountCursor, pages: int, cfg: TraceConfig) -> AccountCursor:
    """After a run read the account's plan to its end, its fullest window taking `pages` requests:
    narrowed windows double again while twice as many pages would still fit in half a budget."""
    if cursor.span is None or 4 * pages > cfg.requests_per_5min:
        return cursor
    doubled = cursor.span * 2
    return replace(cursor, span=None if doubled >= cfg.span else doubled)


def visit_order(accounts: Iterable[str], cursors: Mapping[str, AccountCursor]) -> list[str]:
    """The accounts in the order a run reads them: the one that last had a window read through
    longest ago first (never: before any), configuration order among equals. An account the
    budget cut short before any window keeps its old time and goes first next run; one that moved
    on goes to the back, even with windows left (a long backlog does not hold the others up). So
    whatever the number of accounts, each is reached within a bounded number of runs (a window
    that a whole run's budget cannot read is narrowed, see `narrower`)."""
    order = list(dict.fromkeys(accounts))
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(order, key=lambda a: (cursors[a].finished or oldest if a in cursors else oldest, order.index(a)))


def sent_ranges(hours: Iterable[int], margin: timedelta) -> list[tuple[datetime, datetime]]:
    """The time ranges in which an account sent mail, from the UTC hours (epoch seconds) in which
    it did, each widened by `margin`, overlapping ones merged."""
    ranges: list[tuple[datetime, datetime]] = []
    for hour in sorted(set(hours)):
        start = datetime.fromtimestamp(hour, UTC) - margin
        end = datetime.fromtimestamp(hour + 3600, UTC) + margin
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((start, end))
    return ranges


def only_sent(
    spans: list[tuple[datetime, datetime]], ranges: list[tuple[datetime, datetime]]
) -> list[tuple[datetime, datetime]]:
    """The parts of planned windows in which the account sent mail (whole seconds, as the filter
    writes them), oldest first: a window without mail of the relay's is not asked for. Adjacent
    parts are joined only up to the longest planned window (DELIVERY_TRACE_SPAN): a run saves its
    progress after each window, and Graph takes no window longer than 10 days."""
    out: list[tuple[datetime, datetime]] = []
    longest = max((end - start for start, end in spans), default=timedelta(0))
    for start, end in spans:
        for lo, hi in ranges:
            a = max(start, _whole_seconds(lo))
            b = min(end, _ceil_seconds(hi))
            if a < b:
                if out and out[-1][1] >= a and max(out[-1][1], b) - out[-1][0] <= longest:
                    out[-1] = (out[-1][0], max(out[-1][1], b))
                else:
                    out.append((a, b))
    return out


def _ceil_seconds(when: datetime) -> datetime:
    whole = when.replace(microsecond=0)
    return whole if whole == when else whole + timedelta(seconds=1)


def plan_spans(cursor: AccountCursor, now: datetime, cfg: TraceConfig) -> list[tuple[datetime, datetime]]:
    """The windows one run reads for an account, oldest first, each acceptable to Graph.

    Start: the watermark minus the overlap (rows appear 5-10 minutes late), or earlier when
    recipients are still open; never before now - max age (nor 90 days). End: now - a small lag,
    so a clock a little ahead of Exchange's never asks for the future.

    The overlap is re-read only for rows that could have been missing when the watermark was read
    (`finished`): received less than the overlap before that. A backlog read one window a run (the
    budget) then moves on by whole windows; re-reading the overlap before each put a window no
    longer than the overlap back where it started, run after run."""
    # Whole seconds, as the filter writes them: the cursor then means exactly what was asked.
    end = _whole_seconds(now - cfg.end_lag)
    step = cfg.span if cursor.span is None else min(cfg.span, max(MIN_SPAN, cursor.span))
    floor = now - cfg.max_age
    if cursor.watermark is None:
        start = floor
    else:
        start = cursor.watermark - cfg.overlap
        if cursor.finished is not None:
            start = max(start, min(cursor.watermark, cursor.finished - cfg.overlap))
        if cursor.recheck_from is not None:
            start = min(start, cursor.recheck_from)
    # Down to the second for what must be read (an open row's exact time), up for the limits.
    lowest = _whole_seconds(
        max(floor, now - MAX_LOOKBACK + timedelta(minutes=1)) + timedelta(seconds=1) - timedelta(microseconds=1)
    )
    start = max(_whole_seconds(start), lowest)
    spans = []
    while start < end:
        stop = min(end, start + step)
        spans.append((start, stop))
        start = stop
    return spans


def _whole_seconds(when: datetime) -> datetime:
    return when.replace(microsecond=0)


def after_span(
    cursor: AccountCursor, span_end: datetime, oldest_open: datetime | None, *, finished: bool
) -> AccountCursor:
    """The cursor once the spans up to `span_end` are read completely.

    `oldest_open`: the earliest send time of a request still open among the rows read in this run.
    Finished: everything was re-read, so only what is still open needs a recheck. Stopped early:
    the part after `span_end` was not re-read, so a recheck must start there at the latest."""
    watermark = span_end if cursor.watermark is None else max(cursor.watermark, span_end)
    if finished:
        recheck = oldest_open
    else:
        recheck = span_end if oldest_open is None else min(oldest_open, span_end)
    return replace(cursor, watermark=watermark, recheck_from=recheck)


class RequestBudget:
    """At most `limit` Graph trace requests in any 5-minute window (Graph allows 100 per tenant,
    shared with every other tool). `spent` holds the epoch seconds of recent requests."""

    def __init__(self, limit: int, spent: Iterable[float] = (), window: float = THROTTLE_WINDOW_SECONDS) -> None:
        self.limit = limit
        self.window = window
        self.spent = sorted(spent)

    def _prune(self, now: float) -> None:
        self.spent = [t for t in self.spent if t > now - self.window]

    def available(self, now: float) -> int:
        self._prune(now)
        return max(0, self.limit - len(self.spent))

    def take(self, now: float) -> bool:
        if self.available(now) <= 0:
            return False
        self.spent.append(now)
        return True

    def free_at(self, now: float) -> float:
        """When the next request may go."""
        self._prune(now)
        if len(self.spent) < self.limit:
            return now
        return self.spent[len(self.spent) - self.limit] + self.window


@dataclass(frozen=True)
class TraceRow:
    """One row of message trace, already stripped of the address: the recipient is its hash."""

    trace_id: str
    digest: str
    chunk: int
    domain: str
    recipient_hash: str
    status: str
    received: datetime


def parse_message_id(value: str | None) -> tuple[str, int, str] | None:
    """Our deterministic Message-ID `<sha256(request id)[:40][.chunk]@domain>`: (digest, chunk,
    domain); None for mail the relay did not send."""
    match = _MESSAGE_ID.match((value or "").strip())
    if not match:
        return None
    return match.group(1).lower(), int(match.group(2) or 0), match.group(3).lower()


def normal_status(value: object) -> str:
    text = str(value or "")
    for status in STATUSES:
        if status.lower() == text.lower():
            return status
    return "unknownFutureValue"


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        # Graph may send 7 fractional digits; Python takes 6.
        match = re.match(r"^(.*T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})?$", value)
        if not match:
            return None
        try:
            parsed = datetime.fromisoformat(
                match.group(1) + ((match.group(2) or "")[:7]) + (match.group(3) or "+00:00").replace("Z", "+00:00")
            )
        except ValueError:
            return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class RecipientStatus:
    status: str
    chunk: int
    received: datetime
    reason: str = ""


def merge_status(old: RecipientStatus | None, row: TraceRow) -> RecipientStatus:
    """A recipient's status after reading `row`. A recipient has one row per message; a later
    transaction of the same request (a follow-up) wins over an earlier one, and for the same
    message the row read now is Exchange's current view."""
    if old is not None and (old.chunk > row.chunk):
        return old
    reason = old.reason if old is not None and old.status == row.status and old.chunk == row.chunk else ""
    return RecipientStatus(row.status, row.chunk, row.received, reason)


def counts(statuses: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(statuses).items()))


def count_delta(old: Mapping[str, int], new: Mapping[str, int]) -> dict[str, int]:
    """new - old per status, zero entries left out: re-reading the same rows gives {}."""
    keys = set(old) | set(new)
    return {k: new.get(k, 0) - old.get(k, 0) for k in sorted(keys) if new.get(k, 0) != old.get(k, 0)}


def is_open(statuses: Iterable[str]) -> bool:
    return any(s in OPEN_STATUSES for s in statuses)


def delivery_rates(totals: Mapping[str, int]) -> dict[str, float | int | None]:
    """Shares of traced recipients: delivered, failed, quarantined, spam, still open."""
    total = sum(totals.values())

    def share(*names: str) -> float | None:
        return None if total == 0 else round(sum(totals.get(n, 0) for n in names) / total, 4)

    return {
        "traced": total,
        "delivered": share("delivered", "expanded"),
        "failed": share("failed"),
        "quarantined": share("quarantined"),
        "filteredAsSpam": share("filteredAsSpam"),
        "open": share(*OPEN_STATUSES),
    }


def retry_at(
    now: datetime, retry_after: float | None, fallback: float = 60.0, cap: timedelta = timedelta(hours=1)
) -> datetime:
    """When to ask Graph again after a 429: its Retry-After, at least 1 s and at most `cap` (an
    absurd value such as 1e11 or 1e15 seconds waits `cap`); `fallback` when it gave none."""
    limit = max(1.0, cap.total_seconds())
    if retry_after is None or math.isnan(retry_after):
        wait = fallback
    else:
        wait = max(1.0, retry_after)
    return now + timedelta(seconds=min(wait, limit))


def row_problem(item: Mapping[str, object]) -> str | None:
    """Why a trace row cannot be read (a field of the wrong type), or None. Such a row is counted
    as unmatched with this reason; the run goes on."""
    for name in ("messageId", "recipientAddress", "receivedDateTime"):
        if not isinstance(item.get(name), str):
            return f"{name} is not a string"
    for name in ("status", "id", "senderAddress"):
        if item.get(name) is not None and not isinstance(item.get(name), str):
            return f"{name} is not a string"
    if parse_time(item.get("receivedDateTime")) is None:
        return "receivedDateTime is not a date-time"
    return None


@dataclass
class RunTally:
    """What one reconciliation did, for the CLI, logs and tests."""

    requests: int = 0  # Graph HTTP requests
    rows: int = 0  # trace rows read
    matched: int = 0  # rows joined to a ledger request
    unmatched: int = 0  # rows of mail the relay did not send (or no longer knows), and unreadable rows
    unreadable: Counter = field(default_factory=Counter)  # unreadable rows (part of unmatched), by reason
    changed_requests: int = 0  # requests whose counts changed
    details: int = 0  # getDetailsByRecipient calls
    stopped: str = ""  # why the run ended early: "budget", "throttled", "error: ..."
    queries: list[str] = field(default_factory=list)
    by_status: Counter = field(default_factory=Counter)  # statuses of matched rows read

    def summary(self) -> str:
        text = (
            f"{self.requests} Graph request(s), {self.rows} trace row(s): {self.matched} matched, "
            f"{self.unmatched} unmatched (ignored); {self.changed_requests} request(s) changed"
        )
        if self.unreadable:
            text += " (unreadable: " + ", ".join(f"{v} {k}" for k, v in sorted(self.unreadable.items())) + ")"
        if self.by_status:
            text += "; " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        return text + (f"; stopped: {self.stopped}" if self.stopped else "")
