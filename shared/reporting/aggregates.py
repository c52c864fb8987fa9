"""Hourly counters per account and category, written as the ledger changes, read by the report
(their keys and shapes: shared/reporting/rows.py; reading them: shared/reporting/rollups.py).

Counter names (as in the report contract): `requests.<outcome>`, `deferrals`, `recipients.internal`,
`recipients.external`, `codes.<SMTP code>`, `delivery.<message-trace status>`, and `latency.<bound>`
(the send-latency histogram of the sent requests, shared/reporting/latency.py: one counter per bucket,
in the same row as the outcome, so it is merged, rolled up and flushed like every other count).

How they are written (docs/operations.md, "Report API and aggregates"):
- The send path only adds to an in-memory buffer (no I/O, never raises): a send is never failed
  or slowed by the aggregates.
- A background task per process flushes the buffer every AGGREGATES_FLUSH_SECONDS as ETag merges
  (read, add, replace-if-unchanged) into rows keyed by UTC day (PartitionKey), hour, shard and
  (account, category). A process writes shard 0 until it loses an ETag race, then moves to a
  random shard below AGGREGATES_SHARDS: no hot row, and few rows while traffic is light.
- A row is read once (or created) by a process; after that it holds the row's state and ETag, and
  a flush replaces all the rows of a UTC day it holds in one entity-group transaction: one request
  per flush, however many accounts and categories. A transaction refused (a row another writer
  changed) is merged row by row.
- Every merge records this writer's batch number in the row (`Writes`). A write whose answer was
  lost (an SDK retry after a 500 or a cut connection) is looked up before it is tried again, so a
  batch is added once, never twice.
- What is only in memory is lost if the process is killed: counts err on the low side, never
  twice (the ledger stays the truth). How much is bounded: a flush gives up after its deadline
  (what it did not write stays pending), and counts not written within AGGREGATES_MAX_BUFFER_SECONDS
  of being recorded are given up (`stats.dropped`, `hve_relay.aggregates.dropped`), so memory never
  holds more than that span of counts, whatever the outage.
- Categories come from producers: each process keeps at most AGGREGATES_MAX_CATEGORIES distinct
  categories per UTC hour (the first ones it sees); later ones are counted under `other`
  (OTHER_CATEGORY). The report folds the categories past its top N into `other` too
  (`fold_categories`), so what several processes kept apart still makes a bounded answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from opentelemetry import metrics

from shared.reporting import latency as latency_histogram
from shared.reporting.rollups import ReadStats, Rollups
from shared.reporting.rows import (
    DELIVERY_STATUSES,
    HOUR,
    OTHER_CATEGORY,
    ROLLUP_MARK,
    Bucket,
    day_key,
    hour_of,
    row_fields,
    row_key,
)

log = logging.getLogger("hve_relay.aggregates")

# Hours whose admitted categories a process remembers (the send path writes the current hour; the
# trace files deltas under the hour each request was sent, up to its max age back).
_HOURS_REMEMBERED = 96
# Writers remembered per row (their last batch number): far more than can write one row between a
# lost answer and its re-check.
_WRITERS_KEPT = 64
# ETag races one merge takes before its batch waits for the next flush.
_MERGE_TRIES = 8
# Rows merged at once by one flush.
_CONCURRENCY = 8
# One entity-group transaction: at most 100 entities (the service's limit) and, here, about 2 MB
# of properties (the limit is 4 MiB per request).
_TRANSACTION_ROWS = 100
_TRANSACTION_CHARS = 2_000_000


@dataclass
class _Batch:
    pk: str
    rk: str
    hour: int
    account: str
    category: str
    seq: int
    counts: Counter
    last_seen: dict[str, float]
    since: float = 0.0  # monotonic time of its oldest count
    done: bool = False  # merged (its write answered, or found applied on a re-check)
    fresh: bool = True  # not tried before (a retry may have landed: its row is read first)


@dataclass
class _Cached:
    etag: str | None
    counts: dict[str, int]
    last_seen: dict[str, float]
    writes: dict[str, int]
    size: int = 0  # characters the row's properties take, about (what a transaction may carry)


def _size(counts: Mapping[str, int], last: Mapping[str, float], writes: Mapping[str, int]) -> int:
    return 300 + sum(len(k) + 12 for k in counts) + sum(len(k) + 20 for k in last) + 30 * len(writes)


def _parts(batches: list[_Batch], size: Callable[[_Batch], int]) -> Iterable[list[_Batch]]:
    """`batches` cut into entity-group transactions: at most 100 entities and about 2 MB each
    (a transaction carries at most 100 and 4 MiB); a row's own growth until it is written stays
    well within the margin."""
    part: list[_Batch] = []
    total = 0
    for batch in batches:
        n = size(batch) + 40 * (len(batch.counts) + len(batch.last_seen))
        if part and (len(part) == _TRANSACTION_ROWS or total + n > _TRANSACTION_CHARS):
            yield part
            part, total = [], 0
        part.append(batch)
        total += n
    if part:
        yield part


@dataclass
class AggregateStats(ReadStats):
    """Per process, for tests, the bench and telemetry."""

    merges: int = 0
    races: int = 0  # ETag races lost (another writer changed the row)
    replayed: int = 0  # batches found already applied on a re-check (their answer had been lost)
    failures: int = 0  # flushes of a row that failed (kept for the next flush)
    dropped: int = 0  # counts given up (not written within the buffer's age bound, or over its size)
    folded: int = 0  # counts recorded under `other` (their category was past the per-hour cap)
    timeouts: int = 0  # flushes cut at their deadline (what they did not write stays pending)
    transactions: int = 0  # entity-group transactions applied (a day's held rows in one request)
    transactions_refused: int = 0  # refused as a whole (a row changed by another writer): row by row


class Aggregates:
    def __init__(
        self,
        table: Any,
        *,
        flush_seconds: float = 10.0,
        shards: int = 8,
        max_pending: int = 10_000,
        rollup_after_seconds: float = 7200.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_buffer_seconds: float = 60.0,
        max_categories: int = 50,
        flush_deadline: float | None = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self.rollup_after = max(60.0, rollup_after_seconds)
        self.flush_seconds = flush_seconds
        self.shards = max(1, shards)
        self.max_pending = max_pending
        # A flush takes at most this long (None: no limit): storage that does not answer (the SDK
        # retrying a dead connection for minutes) cannot hold the buffer back.
        self.flush_deadline = flush_deadline if flush_deadline and flush_deadline > 0 else None
        # The oldest count memory may hold: at least two flush periods, so a failed batch is tried
        # again at least once.
        self.max_buffer_seconds = max(
            float(max_buffer_seconds), 2 * (max(0.0, flush_seconds) + (self.flush_deadline or 0.0))
        )
        self.max_categories = max(0, int(max_categories or 0))  # 0: no cap
        self._admitted: dict[int, set[str]] = {}
        self._monotonic = monotonic
        self._clock = clock
        self._rng = rng or random.Random()
        self.writer = uuid.uuid4().hex[:12]
        self.shard = 0
        self.stats = AggregateStats()
        self._seq = 0
        # (hour, account, category) -> [counts, last seen per code, monotonic time of the first count]
        self._buffer: dict[tuple[int, str, str], list[Any]] = {}
        self._pending: list[_Batch] = []  # batches whose write failed: retried first, same number
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._flusher: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._table_ready = False
        self._failures_counter = metrics.get_meter("hve_relay").create_counter(
            "hve_relay.aggregates.write_failures",
            unit="{row}",
            description="Aggregate rows whose merge failed (kept for the next flush)",
        )
        self._dropped_counter = metrics.get_meter("hve_relay").create_counter(
            "hve_relay.aggregates.dropped",
            unit="{count}",
            description="Counts given up: not written within AGGREGATES_MAX_BUFFER_SECONDS (storage unreachable)",
        )

    # --- recording (the send path: memory only, never raises) -----------------------------------

    def add(
        self,
        at: float,
        account: str,
        category: str,
        counts: Mapping[str, int],
        last_seen: Mapping[str, float] | None = None,
    ) -> None:
        try:
            hour = hour_of(at)
            key = (hour, account or "", self._category(hour, category or "", counts))
            entry = self._buffer.get(key)
            if entry is None:
                entry = self._buffer[key] = [Counter(), {}, self._monotonic()]
            bucket, last = entry[0], entry[1]
            bucket.update({name: int(n) for name, n in counts.items() if n})
            for name, ts in (last_seen or {}).items():
                last[name] = max(last.get(name, 0.0), ts)
            self._ensure_flusher()
        except Exception:  # noqa: BLE001 - counting must never fail a send
            log.exception("aggregates: a count was not recorded")

    def _category(self, hour: int, category: str, counts: Mapping[str, int]) -> str:
        """`category`, or `other` once this process has kept AGGREGATES_MAX_CATEGORIES others in
        that hour: the rows one flush writes stay bounded whatever producers send."""
        if not self.max_categories or category in ("", OTHER_CATEGORY):
            return category
        kept = self._admitted.get(hour)
        if kept is None:
            if len(self._admitted) >= _HOURS_REMEMBERED:
                del self._admitted[min(self._admitted)]
            kept = self._admitted[hour] = set()
        if category in kept:
            return category
        if len(kept) < self.max_categories:
            kept.add(category)
            return category
        self.stats.folded += sum(abs(int(n)) for n in counts.values())
        return OTHER_CATEGORY

    def outcome(
        self, at: float, account: str, category: str, state: str, *, internal: int = 0, external: int = 0
    ) -> None:
        """A request reached its final state (once per request: called when the ledger row became final)."""
        counts = {f"requests.{state}": 1}
        if state == "sent":
            counts.update({"recipients.internal": internal, "recipients.external": external})
        self.add(at, account, category, counts)

    def latency(self, at: float, account: str, category: str, seconds: float) -> None:
        """A sent request took `seconds` from first seen (the ledger's `first_received`) to HVE's
        `250` for its last transaction: 1 more in its histogram bucket (`latency.<bound>`). Called
        once per request, beside `outcome(..., "sent")` and with the same `at`, so it lands in the
        row (hour, account, category) that flush writes anyway: no extra row, no extra request."""
        try:
            name = latency_histogram.counter_name(float(seconds))
        except Exception:  # noqa: BLE001 - counting must never fail a send
            log.exception("aggregates: a latency was not recorded")
            return
        self.add(at, account, category, {name: 1})

    def deferral(self, at: float, account: str, category: str) -> None:
        self.add(at, account, category, {"deferrals": 1})

    def replies(self, at: float, account: str, category: str, labels: Iterable[str]) -> None:
        """SMTP replies other than 250, by code label (`code_label`)."""
        seen = Counter(f"codes.{label}" for label in labels if label)
        if seen:
            self.add(at, account, category, seen, {name[len("codes.") :]: at for name in seen})

    async def add_delivery(self, at: datetime | float, account: str, category: str, deltas: Mapping[str, int]) -> None:
        """Message-trace statuses: add `deltas` (may be negative, e.g. pending -1,
        delivered +1) to `delivery.<status>`; written by the next flush (or `flush()`)."""
        unknown = set(deltas) - DELIVERY_STATUSES
        if unknown:
            raise ValueError(f"unknown delivery status(es) {sorted(unknown)}; known: {sorted(DELIVERY_STATUSES)}")
        ts = at.timestamp() if isinstance(at, datetime) else float(at)
        self.add(ts, account, category, {f"delivery.{status}": n for status, n in deltas.items()})

    def unwritten(self) -> int:
        """Counts this process holds that are not in the table yet (buffered or pending)."""
        return sum(sum(abs(n) for n in entry[0].values()) for entry in self._buffer.values()) + sum(
            sum(abs(n) for n in b.counts.values()) for b in self._pending
        )

    # --- flushing ------------------------------------------------------------------------------

    def _ensure_flusher(self) -> None:
        if self.flush_seconds <= 0 or (self._flusher is not None and not self._flusher.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._flusher = loop.create_task(self._run())

    async def _run(self) -> None:
        while self._buffer or self._pending:
            await asyncio.sleep(self.flush_seconds)
            await self.flush()

    async def close(self) -> None:
        """Flush what is buffered and stop the background task (a host shutting down)."""
        if self._flusher is not None and not self._flusher.done():
            self._flusher.cancel()
            try:
                await self._flusher
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        await self.flush()

    async def flush(self) -> None:
        """Merge the buffer into the table. Never raises: a failed row stays pending (same batch
        number, so a write that did happen is not added again)."""
        async with self._lock:
            # Batches tried before and kept past the bound (flushes called rarely, by hand): given up
            # before anything is tried.
            self._give_up(self._monotonic() - self.max_buffer_seconds)
            batches = self._pending
            self._pending = []
            taken, self._buffer = self._buffer, {}
            for (hour, account, category), (counts, last, since) in taken.items():
                counts = Counter({k: v for k, v in counts.items() if v})  # deltas may be negative
                if not counts and not last:
                    continue
                self._seq += 1
                batches.append(
                    _Batch(
                        day_key(hour),
                        row_key(hour, self.shard, account, category),
                        hour,
                        account,
                        category,
                        self._seq,
                        counts,
                        dict(last),
                        since,
                    )
                )
            if not batches:
                return
            try:
                if self.flush_deadline is None:
                    await self._write(batches)
                else:
                    async with asyncio.timeout(self.flush_deadline):
                        await self._write(batches)
            except TimeoutError:
                self.stats.timeouts += 1
                log.warning(
                    "aggregates: a flush was cut after %g s (storage slow or unreachable); what it did "
                    "not write is kept for the next flush",
                    self.flush_deadline,
                )
            finally:
                # Whatever was not written (failed, not tried, or cut while in flight: it may have
                # landed, so its row is read again and its number in `Writes` tells) stays pending
                # with its number, also when the flush itself is cancelled (a host shutting down).
                self._pending = [b for b in batches if not b.done]
                for b in self._pending:
                    b.fresh = False
                    self._cache.pop((b.pk, b.rk), None)
            self._bound_pending()
            # What would be older than the bound before the next flush ends is given up now: memory
            # never holds more than AGGREGATES_MAX_BUFFER_SECONDS of counts (what a kill can lose).
            self._give_up(
                self._monotonic()
                + max(0.0, self.flush_seconds)
                + (self.flush_deadline or 0.0)
                - self.max_buffer_seconds
            )
            self._prune_cache()

    async def _write(self, batches: list[_Batch]) -> None:
        """Merge `batches`, marking each one written `done`: the rows whose state this process
        holds in one entity-group transaction per UTC day (`_transact`), the others one by one."""
        if not await self._ensure_table():
            self._failed(len(batches))
            return
        # Batches of one row go in order, and stop at the first that fails: a row's `Writes`
        # holds the highest batch applied, which proves the lower ones applied only then.
        rows: dict[tuple[str, str], list[_Batch]] = {}
        for batch in sorted(batches, key=lambda b: b.seq):
            rows.setdefault((batch.pk, batch.rk), []).append(batch)
        days: dict[tuple[str, str], list[_Batch]] = {}
        for key, queue in list(rows.items()):
            if len(queue) == 1 and (op := self._joins(queue[0])):
                days.setdefault((op, key[0]), []).append(rows.pop(key)[0])
        for (op, _), day in days.items():
            for part in _parts(day, self._size_of):
                for batch in await self._transact(op, part):
                    rows[(batch.pk, batch.rk)] = [batch]
        sem = asyncio.Semaphore(_CONCURRENCY)

        async def one_row(queue: list[_Batch]) -> None:
            async with sem:
                for batch in queue:
                    if not await self._merge(batch):
                        return
                    batch.done = True

        await asyncio.gather(*(one_row(q) for q in rows.values()))

    def _joins(self, batch: _Batch) -> str:
        """The transaction `batch` can go in, if any: `update` when its row's state (ETag) is held
        and the batch is not known applied; `create` when the row is new to this process, of the
        hour now begun, and the batch was never tried (the row may exist, made by another process:
        then the transaction is refused and the row read); '' (one by one) otherwise, and when the
        row's day needs a rollup mark."""
        if self._marks(batch):
            return ""
        cached = self._cache.get((batch.pk, batch.rk))
        if cached is None:
            return "create" if batch.fresh and batch.hour >= hour_of(self._clock()) else ""
        return "update" if cached.writes.get(self.writer, 0) < batch.seq else ""

    def _size_of(self, batch: _Batch) -> int:
        cached = self._cache.get((batch.pk, batch.rk))
        return cached.size if cached else _size({}, {}, {})

    async def _transact(self, op: str, part: list[_Batch]) -> list[_Batch]:
        """Merge `part` (rows of one day: all held, or all new) in one entity-group transaction:
        one request. Returns the batches to merge one by one instead: all of them when the table
        refused the transaction (all or nothing: a row another writer changed failed its ETag, or
        a new row existed already; row by row, that row is read), none when it applied or when its
        outcome is unknown (a lost answer or a failed request: each row is read again at the next
        flush, where its `Writes` tells whether this batch landed)."""
        from azure.data.tables import RequestTooLargeError, TableTransactionError

        none = _Cached(None, {}, {}, {})
        held = [(b, self._cache.get((b.pk, b.rk)) or none) for b in part]
        ops: list[Any] = [
            ("create", self._entity(b, {}, {}, {}))
            if op == "create"
            else (
                "update",
                self._entity(b, c.counts, c.last_seen, c.writes),
                {"mode": "replace", "etag": c.etag, "match_condition": MatchConditions.IfNotModified},
            )
            for b, c in held
        ]
        try:
            metas = await self._table.submit_transaction(ops)
        except (TableTransactionError, RequestTooLargeError):
            self.stats.transactions_refused += 1
            return part
        except Exception as exc:  # noqa: BLE001 - storage trouble never reaches the send path
            for b in part:
                self._cache.pop((b.pk, b.rk), None)
            self._failed(len(part))
            log.warning(
                "aggregates: %d row(s) of %s not merged (%s); kept for the next flush",
                len(part),
                part[0].pk,
                type(exc).__name__,
            )
            return []
        for (b, c), meta in zip(held, metas, strict=True):
            self._remember(b, meta, c.counts, c.last_seen, c.writes)
            b.done = True
        self.stats.transactions += 1
        return []

    def _give_up(self, older_than: float) -> None:
        """Drop pending batches whose oldest count was recorded before `older_than` (monotonic)."""
        lost = [b for b in self._pending if b.since < older_than]
        if not lost:
            return
        self._pending = [b for b in self._pending if b.since >= older_than]
        n = sum(sum(abs(v) for v in b.counts.values()) for b in lost)
        self.stats.dropped += n
        self._dropped_counter.add(n)
        log.error(
            "aggregates: %d count(s) in %d batch(es) given up: not written within %g s (storage "
            "unreachable); the ledger keeps the truth",
            n,
            len(lost),
            self.max_buffer_seconds,
        )

    def _bound_pending(self) -> None:
        # Storage down for long: memory stays bounded; the oldest counts are given up (low side).
        if len(self._pending) > self.max_pending:
            lost = self._pending[: -self.max_pending]
            self._pending = self._pending[-self.max_pending :]
            n = sum(sum(abs(v) for v in b.counts.values()) for b in lost)
            self.stats.dropped += n
            self._dropped_counter.add(n)
            log.error("aggregates: %d batch(es) dropped after repeated write failures", len(lost))

    def _failed(self, rows: int) -> None:
        self.stats.failures += rows
        self._failures_counter.add(rows)

    async def _ensure_table(self) -> bool:
        # Created on the first flush, not when the relay starts: a relay must send even when the
        # aggregates table cannot be reached.
        if self._table_ready:
            return True
        try:
            await self._table.create_table()
        except ResourceExistsError:
            pass
        except Exception as exc:  # noqa: BLE001
            log.warning(
                "aggregates: table %s not ready (%s); counts kept for the next flush",
                getattr(self._table, "table_name", "?"),
                type(exc).__name__,
            )
            return False
        self._table_ready = True
        return True

    def _marks(self, batch: _Batch) -> bool:
        """A day that may have been rolled up (ended over half the rollup wait ago, by this
        clock): its rollup no longer holds every count once `batch` is merged."""
        return batch.hour - batch.hour % 86400 + 86400 + self.rollup_after / 2 <= self._clock()

    async def _merge(self, batch: _Batch) -> bool:
        if not await self._merge_row(batch):
            return False
        # Until the day's rollup is marked stale, the batch counts as not written (a retry finds
        # it applied and marks again).
        if self._marks(batch):
            try:
                await self._table.upsert_entity(
                    {"PartitionKey": batch.pk, "RowKey": ROLLUP_MARK, "State": "stale"}, mode="replace"
                )
            except Exception as exc:  # noqa: BLE001
                self._failed(1)
                log.warning("aggregates: rollup of %s not marked stale (%s); retried", batch.pk, type(exc).__name__)
                return False
        return True

    async def _merge_row(self, batch: _Batch) -> bool:
        key = (batch.pk, batch.rk)
        try:
            for _ in range(_MERGE_TRIES):
                cached = self._cache.get(key)
                if cached is None:
                    cached = await self._read(batch.pk, batch.rk)
                    if cached is None:
                        try:
                            meta = await self._table.create_entity(self._entity(batch, {}, {}, {}))
                        except ResourceExistsError:
                            continue
                        self._remember(batch, meta, {}, {}, {})
                        return True
                    self._cache[key] = cached
                if cached.writes.get(self.writer, 0) >= batch.seq:
                    self.stats.replayed += 1  # our earlier try did land; its answer was lost
                    return True
                try:
                    meta = await self._table.update_entity(
                        self._entity(batch, cached.counts, cached.last_seen, cached.writes),
                        mode="replace",
                        etag=cached.etag,
                        match_condition=MatchConditions.IfNotModified,
                    )
                except (ResourceModifiedError, ResourceNotFoundError):
                    self._cache.pop(key, None)
                    self.stats.races += 1
                    # Later batches of this process go to another shard; this one stays on its row,
                    # where the re-check of `Writes` can see whether it already landed.
                    self.shard = self._rng.randrange(self.shards)
                    continue
                self._remember(batch, meta, cached.counts, cached.last_seen, cached.writes)
                return True
            return False
        except Exception as exc:  # noqa: BLE001 - storage trouble never reaches the send path
            self._cache.pop(key, None)
            self._failed(1)
            log.warning(
                "aggregates: merge into %s/%s failed (%s); kept for the next flush",
                batch.pk,
                batch.rk,
                type(exc).__name__,
            )
            return False

    def _merged(
        self, batch: _Batch, counts: Mapping[str, int], last: Mapping[str, float], writes: Mapping[str, int]
    ) -> tuple[dict[str, int], dict[str, float], dict[str, int]]:
        new_counts = Counter(counts)
        new_counts.update(batch.counts)
        new_last = dict(last)
        for code, ts in batch.last_seen.items():
            new_last[code] = max(new_last.get(code, 0.0), ts)
        new_writes = {w: s for w, s in writes.items() if w != self.writer}
        new_writes[self.writer] = batch.seq
        if len(new_writes) > _WRITERS_KEPT:
            new_writes = dict(list(new_writes.items())[-_WRITERS_KEPT:])
        return {k: v for k, v in new_counts.items() if v}, new_last, new_writes

    def _entity(
        self, batch: _Batch, counts: Mapping[str, int], last: Mapping[str, float], writes: Mapping[str, int]
    ) -> dict[str, Any]:
        c, ls, w = self._merged(batch, counts, last, writes)
        return {
            "PartitionKey": batch.pk,
            "RowKey": batch.rk,
            **row_fields(batch.hour, batch.account, batch.category, c, ls),
            "Writes": json.dumps(w, separators=(",", ":")),
        }

    def _remember(
        self,
        batch: _Batch,
        meta: Mapping[str, Any],
        counts: Mapping[str, int],
        last: Mapping[str, float],
        writes: Mapping[str, int],
    ) -> None:
        self.stats.merges += 1
        c, ls, w = self._merged(batch, counts, last, writes)
        self._cache[(batch.pk, batch.rk)] = _Cached(meta.get("etag"), c, ls, w, _size(c, ls, w))

    async def _read(self, pk: str, rk: str) -> _Cached | None:
        try:
            row = await self._table.get_entity(pk, rk)
        except ResourceNotFoundError:
            return None
        data = json.loads(row.get("Data") or "{}")
        writes = json.loads(row.get("Writes") or "{}")
        counts, last = data.get("n", {}), data.get("l", {})
        return _Cached(row.metadata["etag"], counts, last, writes, _size(counts, last, writes))

    def _prune_cache(self) -> None:
        # Only the current and the previous hour are still written to.
        horizon = day_key(hour_of(self._clock()) - 2 * HOUR)
        for key in [k for k in self._cache if k[0] < horizon]:
            del self._cache[key]

    # --- reading (the report) --------------------------------------------------------------------

    async def read(self, since: datetime, until: datetime) -> list[Bucket]:
        """Buckets with an hour start in [since, until), shards summed (shared/reporting/rollups.py):
        a UTC day that ended more than `rollup_after` ago from its rollup, the others hour by hour."""
        return await Rollups(self._table, self.stats).read(
            since, until, now=self._clock(), rollup_after=self.rollup_after
        )
