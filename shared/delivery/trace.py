"""Delivery confirmation: reconcile the ledger with Microsoft Graph message trace, per recipient.

HVE's 250 means "accepted for submission". Message trace says what happened next. Per HVE account,
each run reads `messageTraces` filtered on the sender and a receivedDateTime window (planned and
checked by shared.delivery.policy), joins rows to ledger requests by our deterministic Message-ID
(chunks carry a `.N` suffix) through key look-ups only (see RequestResolver), and records, in
DELIVERY_TABLE, in one partition per request keyed by its Message-ID digest (so a trace row leads
straight to it, and `request_digest(request id, key)` finds it from the ledger side):

- RowKey `summary`: the request id, the count of recipients in each trace status, per chunk too,
  with the request's account, category and send time;
- RowKey `r-<recipient hash>`: each recipient's status, chunk and, for failed/quarantined, the
  reason from getDetailsByRecipient with addresses masked. Never an address;
- per account (PartitionKey `~cursor`): the watermark, where a recheck must start, and a
  Retry-After Graph gave; and (`~budget`) the times of the requests spent in the last 5 minutes.

Whenever a request's counts change, the exact change (new counts minus the counts stored before)
goes to an injectable async callback, after the new counts are committed. Reading the same rows
again changes nothing, so it produces no delta.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableTransactionError

from shared.delivery.events import DeliveryEvents
from shared.delivery.policy import (
    DETAIL_STATUSES,
    OPEN_STATUSES,
    AccountCursor,
    FilterRefused,
    RecipientStatus,
    RequestBudget,
    RunTally,
    TraceConfig,
    TraceRow,
    after_span,
    count_delta,
    counts,
    delivery_rates,
    merge_status,
    narrower,
    normal_status,
    only_sent,
    parse_message_id,
    parse_time,
    plan_spans,
    retry_at,
    row_problem,
    sent_ranges,
    trace_filter,
    visit_order,
    wider,
)
from shared.graph import GraphClient, GraphError, GraphThrottled
from shared.ledger import recipient_hash
from shared.send.mime import message_id
from shared.send.replies import mask_addresses
from shared.send.suppression import SuppressionList
from shared.settings import Settings

log = logging.getLogger("hve_relay.delivery")

_CURSOR_PK = "~cursor"
_BUDGET_PK = "~budget"
_SUMMARY = "summary"
_RCPT = "r-"
_MAX_REASON = 300
_BATCH = 99  # Table transactions take 100 operations; the summary goes last, alone
_PARALLEL = 16


@dataclass(frozen=True)
class DeliveryDelta:
    """How one request's recipient counts changed, e.g. {"pending": -1, "delivered": 1}.

    `seq` counts the request's changes (1, 2, ...): (request_id, seq) is an idempotency key. The
    callback runs after the new counts are committed, so a delta is never reported for counts
    that were not stored; a process that dies between the two loses that one delta (at most
    once), which a consumer sees as a gap in `seq` (the summary row then holds the truth).
    `sent_at` is when the ledger recorded the request's last transaction; `first_received` when the
    relay first saw it (the day `tools.ledger report` files it under)."""

    request_id: str
    account: str
    category: str
    sent_at: datetime
    first_received: datetime
    changes: dict[str, int]
    seq: int


DeltaCallback = Callable[[DeliveryDelta], Awaitable[None]]


async def no_delta(delta: DeliveryDelta) -> None:
    """The default callback: nothing (the lead wires the report aggregates here)."""


def trace_config(settings: Settings) -> TraceConfig:
    return TraceConfig(
        overlap=settings.delivery_overlap,
        max_age=settings.delivery_max_age,
        span=settings.delivery_span,
        end_lag=settings.delivery_end_lag,
        requests_per_5min=settings.delivery_requests_per_5min,
        page_size=settings.delivery_page_size,
        details_per_run=settings.delivery_details_per_run,
        retry_after_max=settings.delivery_retry_after_max,
    )


def _utc(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return None


def _epoch0() -> datetime:
    return datetime.fromtimestamp(0, UTC)


@dataclass
class _Request:
    """What the reconciliation needs of a ledger request."""

    request_id: str
    account: str
    category: str
    sent_at: datetime
    first_received: datetime


def request_digest(request_id: str, key: bytes) -> str:
    """The part of a request's Message-ID that names it (the domain and chunk suffix aside): the
    partition of its delivery rows, so trace rows lead straight to them. Keyed like the Message-ID
    (RECIPIENT_HASH_KEY)."""
    parsed = parse_message_id(message_id(request_id, "relay.invalid", key=key))
    assert parsed is not None  # the relay's own Message-IDs always parse
    return parsed[0]


# --- Table storage ------------------------------------------------------------------------------


class DeliveryStore:
    def __init__(self, table: Any, key: bytes) -> None:
        self.table = table
        self.key = key  # RECIPIENT_HASH_KEY: the Message-ID digests are keyed with it

    async def cursor(self, account: str) -> AccountCursor:
        try:
            row = await self.table.get_entity(_CURSOR_PK, account)
        except ResourceNotFoundError:
            return AccountCursor(account)
        span = row.get("Span")
        return AccountCursor(
            account,
            _utc(row.get("Watermark")),
            _utc(row.get("RecheckFrom")),
            _utc(row.get("NotBefore")),
            _utc(row.get("Finished")),
            timedelta(seconds=float(span)) if isinstance(span, (int, float)) and span > 0 else None,
        )

    async def save_cursor(self, cursor: AccountCursor) -> None:
        # One timer run at a time (the Functions host holds a singleton lock for timers): last writer wins.
        row: dict[str, Any] = {
            "PartitionKey": _CURSOR_PK,
            "RowKey": cursor.account,
            "Updated": datetime.now(UTC),
        }
        for name, value in (
            ("Watermark", cursor.watermark),
            ("RecheckFrom", cursor.recheck_from),
            ("NotBefore", cursor.not_before),
            ("Finished", cursor.finished),
        ):
            if value is not None:
                row[name] = value
        if cursor.span is not None:
            row["Span"] = cursor.span.total_seconds()
        await self.table.upsert_entity(row, mode="replace")

    async def budget_spent(self) -> list[float]:
        try:
            row = await self.table.get_entity(_BUDGET_PK, "tenant")
        except ResourceNotFoundError:
            return []
        return [float(t) for t in json.loads(row.get("Spent") or "[]")]

    async def save_budget(self, spent: Iterable[float], now: float) -> None:
        # Merge with what another process (a manual `tools.delivery --once`) spent meanwhile.
        recent = sorted({round(t, 6) for t in [*spent, *await self.budget_spent()] if t > now - 300})
        await self.table.upsert_entity(
            {"PartitionKey": _BUDGET_PK, "RowKey": "tenant", "Spent": json.dumps(recent)}, mode="replace"
        )

    async def request_rows(self, digest: str) -> tuple[dict[str, Any] | None, dict[str, dict[str, Any]]]:
        """A request's summary and recipient rows (one partition, keyed by its Message-ID digest)."""
        summary = None
        recipients: dict[str, dict[str, Any]] = {}
        async for row in self.table.query_entities("PartitionKey eq @pk", parameters={"pk": digest}):
            if row["RowKey"] == _SUMMARY:
                summary = row
            elif row["RowKey"].startswith(_RCPT):
                recipients[row["RowKey"][len(_RCPT) :]] = row
        return summary, recipients

    async def summary(self, request_id: str) -> dict[str, Any] | None:
        try:
            row = await self.table.get_entity(request_digest(request_id, self.key), _SUMMARY)
        except ResourceNotFoundError:
            return None
        return summary_view(row)

    async def recipients(self, request_id: str) -> list[dict[str, Any]]:
        _, rows = await self.request_rows(request_digest(request_id, self.key))
        return [
            {
                "recipient": h,
                "status": r.get("Status"),
                "chunk": int(r.get("Chunk", 0)),
                "reason": r.get("Reason") or "",
            }
            for h, r in sorted(rows.items())
        ]

    async def summaries_since(self, since: datetime) -> list[dict[str, Any]]:
        """Summary rows of requests sent since `since` (the 24-hour rates, the report)."""
        out = []
        async for row in self.table.query_entities(
            "RowKey eq @rk and SentAt ge @since", parameters={"rk": _SUMMARY, "since": since}
        ):
            out.append(summary_view(row))
        return out

    async def commit(
        self, digest: str, summary: dict[str, Any], etag: str | None, recipients: list[dict[str, Any]]
    ) -> None:
        """Recipient rows and the summary (created, or replaced under its ETag) in one transaction:
        the stored counts move only when this run's view is the one that commits. Raises
        ResourceModifiedError when another run got there first. More rows than one transaction
        takes: recipient rows first (idempotent upserts), the summary last."""
        head = (
            ("create", summary)
            if etag is None
            else (
                "update",
                summary,
                {"mode": "replace", "etag": etag, "match_condition": MatchConditions.IfNotModified},
            )
        )
        rest = recipients
        if len(recipients) > _BATCH:
            for i in range(0, len(recipients), _BATCH):
                await self.table.submit_transaction(
                    [("upsert", r, {"mode": "replace"}) for r in recipients[i : i + _BATCH]]
                )
            rest = []
        try:
            await self.table.submit_transaction([head, *(("upsert", r, {"mode": "replace"}) for r in rest)])
        except TableTransactionError as exc:
            if exc.status_code in (409, 412):
                raise ResourceModifiedError(f"delivery summary of {summary['RequestId']} changed") from exc
            raise

    async def recipient(self, digest: str, hashed: str) -> dict[str, Any] | None:
        try:
            return await self.table.get_entity(digest, _RCPT + hashed)
        except ResourceNotFoundError:
            return None

    async def set_reason(self, digest: str, hashed: str, reason: str) -> None:
        await self.table.upsert_entity(
            {"PartitionKey": digest, "RowKey": _RCPT + hashed, "Reason": mask_addresses(reason)[:_MAX_REASON]},
            mode="merge",
        )


def summary_view(row: Any) -> dict[str, Any]:
    return {
        "request_id": row.get("RequestId", ""),
        "account": row.get("Account", ""),
        "category": row.get("Category", ""),
        "sent_at": _utc(row.get("SentAt")),
        "first_received": _utc(row.get("FirstReceived")),
        "delivery": json.loads(row.get("Counts") or "{}"),
        "chunks": json.loads(row.get("Chunks") or "{}"),
        "open": bool(row.get("Open")),
        "seq": int(row.get("Seq", 0)),
        "updated": _utc(row.get("Updated")),
    }


class RequestResolver:
    """Which ledger request a Message-ID digest belongs to, by key look-ups only (no table scan,
    whatever the ledger's size): the request's delivery partition (keyed by the digest) once it has
    a summary; before that, the recipient index (PartitionKey = the recipient's hash, one row per
    request that reached it, with its Message-ID) for a recipient of the message, then the
    request's ledger row. The partition read is kept for the first update of the request."""

    _TRIES = 3  # recipients of one message tried in the index before it counts as not ours

    def __init__(self, store: DeliveryStore, ledger_table: Any, index_table: Any, key: bytes) -> None:
        self.store = store
        self.ledger_table = ledger_table
        self.index_table = index_table
        self.key = key
        self._known: dict[str, _Request | None] = {}
        self._read: dict[str, tuple[Any, dict[str, Any]]] = {}

    async def resolve(self, digest: str, addresses: list[str]) -> _Request | None:
        if digest not in self._known:
            summary, rows = await self.store.request_rows(digest)
            if summary is not None and summary.get("RequestId"):
                found: _Request | None = _Request(
                    summary["RequestId"],
                    summary.get("Account", ""),
                    summary.get("Category", ""),
                    _utc(summary.get("SentAt")) or _epoch0(),
                    _utc(summary.get("FirstReceived")) or _epoch0(),
                )
            else:
                found = await self._from_index(digest, addresses)
            if found is not None:
                self._read[digest] = (summary, rows)
            self._known[digest] = found
        return self._known[digest]

    def first_read(self, digest: str) -> tuple[Any, dict[str, Any]] | None:
        """The partition as resolve() read it, once; later updates read afresh."""
        return self._read.pop(digest, None)

    async def _from_index(self, digest: str, addresses: list[str]) -> _Request | None:
        for address in addresses[: self._TRIES]:
            hashed = recipient_hash(self.key, address)
            async for row in self.index_table.query_entities(
                "PartitionKey eq @pk", parameters={"pk": hashed}, select=["RowKey", "MessageId"]
            ):
                parsed = parse_message_id(row.get("MessageId"))
                if parsed is not None and parsed[0] == digest and request_digest(row["RowKey"], self.key) == digest:
                    return await self._ledger_request(row["RowKey"])
        return None

    async def _ledger_request(self, request_id: str) -> _Request | None:
        try:
            row = await self.ledger_table.get_entity(
                request_id, "request", select=["Account", "Category", "Updated", "FirstReceived"]
            )
        except ResourceNotFoundError:
            return None
        return _Request(
            request_id,
            row.get("Account") or "",
            row.get("Category") or "",
            _utc(row.get("Updated")) or _epoch0(),
            _utc(row.get("FirstReceived")) or _epoch0(),
        )


class SentHours:
    """The UTC hours in which each account sent mail, from the hourly aggregates (a request is
    counted under the hour its last transaction finished, with the account that sent it; replies
    other than 250 and deferrals under the hour they came). A run reads trace only around those
    hours, so its cost follows the mail sent, not the number of accounts times the windows.

    The aggregates err on the low side (a process killed before its flush loses its buffer): an
    hour whose every count was lost is not read for that account."""

    def __init__(
        self, table: Any, clock: Callable[[], float] = time.time, rollup_after_seconds: float = 7200.0
    ) -> None:
        from shared.reporting.aggregates import Aggregates

        self.aggregates = Aggregates(table, flush_seconds=0, clock=clock, rollup_after_seconds=rollup_after_seconds)

    async def hours(self, since: datetime, until: datetime) -> dict[str, set[int]]:
        out: dict[str, set[int]] = defaultdict(set)
        for bucket in await self.aggregates.read(since, until):
            if any(n > 0 for name, n in bucket.counts.items() if not name.startswith("delivery.")):
                out[bucket.account].add(bucket.start)
        return out


# --- the reconciliation ---------------------------------------------------------------------------


@dataclass
class _Stop(Exception):
    why: str


@dataclass
class _Pending:
    """Rows of one span grouped by request, and the addresses needed for detail calls (memory only)."""

    rows: dict[str, list[TraceRow]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[str, _Request] = field(default_factory=dict)
    detail_targets: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    oldest_open: datetime | None = None


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        graph: GraphClient,
        store: DeliveryStore,
        ledger_table: Any,
        index_table: Any,
        *,
        on_delta: DeltaCallback = no_delta,
        clock: Callable[[], float] = time.time,
        instruments: Any = None,
        sent_hours: SentHours | None = None,
        on_window: Callable[[], Awaitable[None]] | None = None,
        events: DeliveryEvents | None = None,
        suppressions: SuppressionList | None = None,
    ) -> None:
        self.settings = settings
        # A recipient trace says `failed` for a 5.x.x reason goes on the suppression list.
        self.suppressions = suppressions
        self.cfg = trace_config(settings)
        self.graph = graph
        self.store = store
        self.resolver = RequestResolver(store, ledger_table, index_table, settings.recipient_hash_key)
        self.on_delta = on_delta
        self.clock = clock
        self.instruments = instruments
        self._key = settings.recipient_hash_key
        # Where mail was sent (None: every window of every account is read).
        self.sent_hours = sent_hours
        # Called after a window's rows are committed and before its cursor is saved: whatever the
        # deltas feed (the aggregates) is written before the run moves past the rows they describe.
        self.on_window = on_window
        # Delivery events (EVENTS_QUEUE, EVENTS_TOPIC_ENDPOINT; shared/delivery/events.py): published
        # after the counts are committed, before the cursor moves past their window.
        self.events = events

    async def run(self, *, dry_run: bool = False) -> RunTally:
        tally = RunTally()
        now_ts = self.clock()
        now = datetime.fromtimestamp(now_ts, UTC)
        cursors = {a: await self.store.cursor(a) for a in self.settings.accounts}
        order = visit_order(self.settings.accounts, cursors)
        full = {a: plan_spans(cursors[a], now, self.cfg) for a in order}
        plan_end = {a: spans[-1][1] for a, spans in full.items() if spans}
        plans = await self._where_sent(full, now)
        if dry_run:
            for account, spans in plans.items():
                not_before = cursors[account].not_before
                if not_before is not None and not_before > now:
                    tally.queries.append(f"# {account}: Graph asked to wait until {not_before.isoformat()}")
                for start, end in spans:
                    tally.queries.append(
                        self.graph.message_traces_url(trace_filter(account, start, end, now), self.cfg.page_size)
                    )
            return tally
        # Graph's limit is the tenant's: a Retry-After given for one account holds for all of them.
        waits = [c.not_before for c in cursors.values() if c.not_before is not None and c.not_before > now]
        if waits:
            tally.stopped = f"throttled: Graph asked to wait until {max(waits).isoformat()}"
            return self._finished(tally)
        budget = RequestBudget(self.cfg.requests_per_5min, await self.store.budget_spent())
        details: dict[tuple[str, str], tuple[str, str]] = {}
        try:
            for account, spans in plans.items():
                cursor = cursors[account]
                oldest_open: datetime | None = None
                fullest = 0
                for i, (start, end) in enumerate(spans):
                    whole_budget = budget.available(self.clock()) >= self.cfg.requests_per_5min
                    before = tally.requests
                    try:
                        pending = await self._read_span(account, start, end, now, budget, tally)
                    except _Stop as stop:
                        if whole_budget and stop.why.startswith("budget"):
                            # A whole run's budget did not read this window: narrower ones from now on.
                            await self.store.save_cursor(narrower(cursor, start, end))
                        raise
                    fullest = max(fullest, tally.requests - before)
                    await self._apply(pending, tally)
                    if self.events is not None and self.events.take_failures():
                        raise _Stop(
                            "error: the events target did not take delivery events; the next run reads the window again"
                        )
                    details.update(pending.detail_targets)
                    if pending.oldest_open is not None:
                        oldest_open = min(oldest_open or pending.oldest_open, pending.oldest_open)
                    last = i == len(spans) - 1
                    # The last window read, the plan is read to its end (windows without mail included).
                    cursor = after_span(cursor, plan_end.get(account, end) if last else end, oldest_open, finished=last)
                    # Moved on: behind the accounts not reached since (see visit_order).
                    cursor = replace(cursor, not_before=None, finished=now)
                    if last:
                        cursor = wider(cursor, fullest, self.cfg)
                    if self.on_window is not None:
                        await self.on_window()
                    await self.store.save_cursor(cursor)
                if not spans and account in plan_end:
                    # Nothing sent in the plan: read to its end without a request.
                    cursor = after_span(cursor, plan_end[account], None, finished=True)
                    await self.store.save_cursor(replace(cursor, not_before=None, finished=now))
            await self._details(details, budget, tally)
        except _Stop as stop:
            tally.stopped = stop.why
        finally:
            await self.store.save_budget(budget.spent, self.clock())
        return self._finished(tally)

    def _finished(self, tally: RunTally) -> RunTally:
        """A run that ended without an error (complete, or stopped by Graph's or its own budget):
        logged, and counted in `hve_relay.delivery_trace.runs` (the "no run finished" alert)."""
        log.info("delivery trace: %s", tally.summary())
        if self.instruments is not None:
            self.instruments.delivery_trace_runs.add(1, {"result": "stopped" if tally.stopped else "complete"})
        return tally

    async def _where_sent(
        self, plans: dict[str, list[tuple[datetime, datetime]]], now: datetime
    ) -> dict[str, list[tuple[datetime, datetime]]]:
        """The planned windows cut down to where each account sent mail (all of them without a
        SentHours): a first run then starts at the oldest send, not at now minus the max age."""
        starts = [spans[0][0] for spans in plans.values() if spans]
        if self.sent_hours is None or not starts:
            return plans
        sent = await self.sent_hours.hours(min(starts) - self.cfg.send_margin - timedelta(hours=1), now)
        return {a: only_sent(spans, sent_ranges(sent.get(a, ()), self.cfg.send_margin)) for a, spans in plans.items()}

    async def _read_span(
        self, account: str, start: datetime, end: datetime, now: datetime, budget: RequestBudget, tally: RunTally
    ) -> _Pending:
        try:
            url: str | None = self.graph.message_traces_url(trace_filter(account, start, end, now), self.cfg.page_size)
        except FilterRefused as exc:
            # The planner never builds one; if it ever did, it is not sent.
            raise _Stop(f"error: {exc}") from None
        pending = _Pending()
        while url:
            if not budget.take(self.clock()):
                raise _Stop(f"budget: {self.cfg.requests_per_5min} requests per 5 minutes spent")
            tally.requests += 1
            try:
                page, url = await self.graph.message_trace_page(url)
            except GraphThrottled as exc:
                if exc.status == 429:
                    cursor = await self.store.cursor(account)
                    until = retry_at(
                        datetime.fromtimestamp(self.clock(), UTC),
                        exc.retry_after,
                        cap=self.cfg.retry_after_max,
                    )
                    await self.store.save_cursor(replace(cursor, not_before=until))
                    raise _Stop(f"throttled: Graph answered 429, retry after {until.isoformat()}") from None
                raise _Stop(f"error: {mask_addresses(str(exc))}") from None
            except GraphError as exc:
                raise _Stop(f"error: {mask_addresses(str(exc))}") from None
            await self._take_page(page, pending, tally)
        return pending

    async def _take_page(self, page: list[dict[str, Any]], pending: _Pending, tally: RunTally) -> None:
        """Rows of one page: each message's request found once (in parallel), then every row taken."""
        addresses: dict[str, list[str]] = defaultdict(list)
        readable = []
        for item in page:
            problem = row_problem(item)
            if problem is not None:
                # A row Graph (or something in between) got wrong: counted with its reason, never a
                # reason to stop, so the windows after it are still read.
                tally.rows += 1
                tally.unmatched += 1
                tally.unreadable[problem] += 1
                continue
            readable.append(item)
        page = readable
        for item in page:
            parsed = parse_message_id(item.get("messageId"))
            if parsed is not None and item.get("recipientAddress"):
                addresses[parsed[0]].append(str(item["recipientAddress"]))
        gate = asyncio.Semaphore(_PARALLEL)

        async def resolve(digest: str) -> tuple[str, _Request | None]:
            async with gate:
                return digest, await self.resolver.resolve(digest, addresses[digest])

        found = dict(await asyncio.gather(*(resolve(d) for d in addresses)))
        for item in page:
            parsed = parse_message_id(item.get("messageId"))
            self._take_row(item, found.get(parsed[0]) if parsed else None, pending, tally)

    def _take_row(self, item: dict[str, Any], request: _Request | None, pending: _Pending, tally: RunTally) -> None:
        tally.rows += 1
        parsed = parse_message_id(item.get("messageId"))
        address = str(item.get("recipientAddress") or "")
        if request is None or parsed is None or not address:
            tally.unmatched += 1
            return
        tally.matched += 1
        status = normal_status(item.get("status"))
        received = parse_time(item.get("receivedDateTime")) or _epoch0()
        hashed = recipient_hash(self._key, address)
        row = TraceRow(str(item.get("id") or ""), parsed[0], parsed[1], parsed[2], hashed, status, received)
        pending.rows[request.request_id].append(row)
        pending.requests[request.request_id] = request
        tally.by_status[status] += 1
        if status in OPEN_STATUSES:
            pending.oldest_open = min(pending.oldest_open or received, received)
        elif status in DETAIL_STATUSES and row.trace_id:
            pending.detail_targets[(request.request_id, hashed)] = (row.trace_id, address)

    async def _apply(self, pending: _Pending, tally: RunTally) -> None:
        by_id = pending.requests
        gate = asyncio.Semaphore(_PARALLEL)

        async def one(request_id: str, rows: list[TraceRow]) -> None:
            async with gate:
                if await self._apply_request(by_id[request_id], rows):
                    tally.changed_requests += 1

        await asyncio.gather(*(one(rid, rows) for rid, rows in pending.rows.items()))

    async def _apply_request(self, request: _Request, rows: list[TraceRow], attempts: int = 4) -> bool:
        digest = request_digest(request.request_id, self._key)
        for attempt in range(attempts):
            first = self.resolver.first_read(digest) if attempt == 0 else None
            summary, stored = first if first is not None else await self.store.request_rows(digest)
            current = {
                h: RecipientStatus(
                    r.get("Status", ""),
                    int(r.get("Chunk", 0)),
                    _utc(r.get("Received")) or _epoch0(),
                    r.get("Reason") or "",
                )
                for h, r in stored.items()
            }
            merged = dict(current)
            for row in sorted(rows, key=lambda r: (r.chunk, r.received)):
                merged[row.recipient_hash] = merge_status(merged.get(row.recipient_hash), row)
            changed = [h for h, s in merged.items() if current.get(h) != s]
            old_counts = json.loads(summary.get("Counts") or "{}") if summary else {}
            new_counts = counts(s.status for s in merged.values())
            by_chunk: dict[str, list[str]] = defaultdict(list)
            for s in merged.values():
                by_chunk[str(s.chunk)].append(s.status)
            chunks = {c: counts(v) for c, v in sorted(by_chunk.items(), key=lambda kv: int(kv[0]))}
            delta = count_delta(old_counts, new_counts)
            if not changed and summary is not None and not delta:
                if self.events is not None:  # a version a run committed but did not get published
                    await self.events.publish_pending(summary)
                return False
            seq = int(summary.get("Seq", 0)) + (1 if delta else 0) if summary else 1
            now = datetime.now(UTC)
            open_times = [s.received for s in merged.values() if s.status in OPEN_STATUSES]
            summary_row = {
                "PartitionKey": digest,
                "RowKey": _SUMMARY,
                "RequestId": request.request_id,
                "Account": request.account,
                "Category": request.category,
                "SentAt": request.sent_at,
                "FirstReceived": request.first_received,
                "Counts": json.dumps(new_counts),
                "Chunks": json.dumps(chunks),
                "Open": bool(open_times),
                "Seq": seq,
                "Updated": now,
                **(self.events.carried(summary) if self.events is not None else {}),
            }
            if open_times:
                summary_row["OldestOpen"] = min(open_times)
            recipient_rows = [
                {
                    "PartitionKey": digest,
                    "RowKey": _RCPT + h,
                    "Status": merged[h].status,
                    "Chunk": merged[h].chunk,
                    "Received": merged[h].received,
                    "Reason": mask_addresses(merged[h].reason)[:_MAX_REASON],
                    "Updated": now,
                }
                for h in changed
            ]
            try:
                await self.store.commit(
                    digest,
                    summary_row,
                    getattr(summary, "metadata", {}).get("etag") if summary is not None else None,
                    recipient_rows,
                )
            except (ResourceExistsError, ResourceModifiedError):
                continue  # another run committed first: read again, the delta is against its counts
            if self.events is not None:
                await self.events.publish_pending(summary_row)
            if delta:
                self._count(request.account, delta)
                await self.on_delta(
                    DeliveryDelta(
                        request.request_id,
                        request.account,
                        request.category,
                        request.sent_at,
                        request.first_received,
                        delta,
                        seq,
                    )
                )
            return bool(delta)
        log.warning("delivery trace: request %s kept changing under this run; left for the next", request.request_id)
        return False

    def _count(self, account: str, delta: dict[str, int]) -> None:
        if self.instruments is None:
            return
        for status, n in delta.items():
            if n > 0:  # a counter only grows: recipients that reached this status
                self.instruments.delivery.add(n, {"status": status, "account": account})

    async def _details(
        self, targets: dict[tuple[str, str], tuple[str, str]], budget: RequestBudget, tally: RunTally
    ) -> None:
        """The reason of failed/quarantined recipients that have none yet, within the budget."""
        left = self.cfg.details_per_run
        for (request_id, hashed), (trace_id, address) in targets.items():
            if left <= 0:
                return
            digest = request_digest(request_id, self._key)
            row = await self.store.recipient(digest, hashed)
            if row is None or row.get("Reason") or row.get("Status") not in DETAIL_STATUSES:
                continue
            if not budget.take(self.clock()):
                raise _Stop(f"budget: {self.cfg.requests_per_5min} requests per 5 minutes spent")
            left -= 1
            tally.requests += 1
            tally.details += 1
            try:
                events = await self.graph.trace_details(trace_id, address)
            except GraphError as exc:
                raise _Stop(f"error: {mask_addresses(str(exc))}") from None
            reason = _reason(events, row.get("Status", ""))
            await self.store.set_reason(digest, hashed, reason)
            if self.suppressions is not None:
                await self.suppressions.note_trace(address, row.get("Status", ""), reason, request_id)


def _reason(events: list[dict[str, Any]], status: str) -> str:
    """The telling event (a Fail/Quarantine/Drop, else the last), as `event: description`."""
    telling = [
        e
        for e in events
        if str(e.get("action") or e.get("event") or "").lower()
        in ("fail", "failed", "quarantine", "quarantined", "drop", "dropped")
    ] or events
    if not telling:
        return status
    event = telling[-1]
    return f"{event.get('event') or event.get('action') or status}: {event.get('description') or ''}".strip()


# --- entry points -----------------------------------------------------------------------------------


async def reconcile(
    settings: Settings,
    *,
    on_delta: DeltaCallback = no_delta,
    dry_run: bool = False,
    clock: Callable[[], float] = time.time,
    graph: GraphClient | None = None,
    storage: Any = None,
) -> RunTally:
    """One reconciliation with the app's storage and Graph identity (or the `storage` given,
    which the caller closes)."""
    from shared.storage import StorageClients
    from shared.telemetry import Instruments

    settings.require_accounts()
    own_storage = storage is None
    storage = storage if storage is not None else StorageClients(settings)
    # One attempt per request: every HTTP call counts against the tenant's 100 per 5 minutes, and
    # a 429 ends the run (its Retry-After kept for the next).
    own_graph = graph is None
    client = graph or GraphClient.from_settings(settings, max_attempts=1)
    from shared.reporting.aggregates import Aggregates

    # Status changes also go to the hourly aggregates (`delivery.<status>`, filed under the hour
    # the request was sent), which the report, the dashboard and `tools.ledger report` read. A
    # delta comes once, after its counts are committed, so a re-read never adds to them. They are
    # written after each window, before its cursor is saved: a run killed (or timed out) later
    # has already written the deltas of every window it moved past.
    aggregates_table = storage.tables.get_table_client(settings.aggregates_table)
    aggregates = Aggregates(
        aggregates_table,
        flush_seconds=0,
        clock=clock,
        rollup_after_seconds=settings.aggregates_rollup_after_seconds,
        max_buffer_seconds=settings.aggregates_max_buffer_seconds,
        max_categories=settings.aggregates_max_categories,
    )

    async def counted(delta: DeliveryDelta) -> None:
        await aggregates.add_delivery(delta.sent_at, delta.account, delta.category, delta.changes)
        await on_delta(delta)

    async def window_written() -> None:
        # A window's deltas that cannot be written (the aggregates table unreachable) are lost
        # with this run: it stops here, before the cursor moves on, so the windows after it are
        # read by a later run instead of being lost too.
        await aggregates.flush()
        if aggregates.unwritten():
            raise _Stop("error: the aggregates table could not be written; the next run goes on from this window")

    from shared.ledger import Ledger

    events: DeliveryEvents | None = None
    try:
        ledger_table = await storage.table(settings.ledger_table)
        index_table = await storage.table(settings.recipient_index_table)
        delivery_table = await storage.table(settings.delivery_table)
        instruments = Instruments()
        if not dry_run:
            ledger = Ledger(ledger_table, index_table, settings.recipient_hash_key)
            events = DeliveryEvents.of(settings, storage, ledger, delivery_table, instruments)
        reconciler = Reconciler(
            settings,
            client,
            DeliveryStore(delivery_table, settings.recipient_hash_key),
            ledger_table,
            index_table,
            on_delta=on_delta if dry_run else counted,
            clock=clock,
            instruments=instruments,
            sent_hours=SentHours(aggregates_table, clock, settings.aggregates_rollup_after_seconds),
            on_window=None if dry_run else window_written,
            events=events,
            suppressions=None if dry_run else await SuppressionList.of(storage, settings, clock),
        )
        try:
            return await reconciler.run(dry_run=dry_run)
        finally:
            await aggregates.flush()
    finally:
        if events is not None:
            await events.close()
        if own_graph:
            await client.close()
        if own_storage:
            await storage.close()


async def handle_timer(past_due: bool = False) -> RunTally | None:
    """The `confirm_delivery` timer: one reconciliation when DELIVERY_TRACE_ENABLED=true."""
    from shared.telemetry import configure, flush_metrics

    settings = Settings.from_env()
    if not settings.delivery_enabled:
        return None
    configure(settings)
    try:
        return await reconcile(settings)
    finally:
        # The run's count reaches Application Insights now, not at a periodic export the instance
        # may not live to see (the "no run finished" alert reads it).
        await asyncio.to_thread(flush_metrics)


async def rates_last_24h(settings: Settings, storage: Any, now: datetime | None = None) -> dict[str, Any]:
    """Delivery rates of requests sent in the last 24 hours, overall and per account."""
    now = now or datetime.now(UTC)
    store = DeliveryStore(await storage.table(settings.delivery_table), settings.recipient_hash_key)
    totals: dict[str, int] = defaultdict(int)
    per_account: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for summary in await store.summaries_since(now - timedelta(hours=24)):
        for status, n in summary["delivery"].items():
            totals[status] += n
            per_account[summary["account"]][status] += n
    return {
        "since": (now - timedelta(hours=24)).isoformat(timespec="seconds"),
        "counts": dict(sorted(totals.items())),
        "rates": delivery_rates(totals),
        "accounts": {
            a: {"counts": dict(sorted(c.items())), "rates": delivery_rates(c)} for a, c in sorted(per_account.items())
        },
    }
