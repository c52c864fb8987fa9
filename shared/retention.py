"""Retention: how long the relay keeps who was mailed (LEDGER_RETENTION_DAYS), and the sweeps that
settle requests lost in flight or in the queue. Run by the daily `purge_expired` timer.

What is deleted, each counted from its row's last update:
- ledger request rows (`Updated`) of final requests (sent, refused, dead) only: a row that is
  not final is settled first (see below), never deleted;
- ledger chunk rows (`Updated`);
- recipient-index rows (`At`): the keyed hashes that answer "was this address mailed?";
- welcome user rows (`updated`); the scan's watermark row stays;
- delivery-status rows (`Updated`): per request counts and per recipient-hash statuses;
- aggregate rows (the report's hourly counters and daily rollups) of UTC days that ended before
  the retention period began;
- suppression-list rows (shared/send/suppression.py) past their `Expires` (SUPPRESSION_DAYS after the
  recipient's last permanent failure, at most LEDGER_RETENTION_DAYS): ignored already, deleted here;
- blobs under the relay's own prefixes (shared/send/relay_blobs.py: claim-check requests, deferred
  copies) last modified before it; never anything else in the container (attachments).

At most RETENTION_MAX_ROWS_PER_RUN rows per table (and blobs) per run: a backlog is worked off
over several runs, and no run outlives the host's function timeout.

A ledger row still `sending` LOST_IN_FLIGHT_HOURS after its last update belongs to a request
whose queue message is gone (poisoned, deleted) while HVE may or may not have accepted it. It is
recorded as final `dead`, reason `lost-in-flight`; its Message-ID stays in the row, so a copy that
did reach HVE can be traced.

A row still `deferred` (or `received`) SEND_MAX_AGE_HOURS plus POISON_TTL after its last update
belongs to a request whose copies are gone: it is past its age limit, so a copy still on the
queue could only be recorded dead, and one the host moved to the poison queue has expired there
(POISON_TTL). It is recorded as `dead`, reason `lost-in-queue`; a copy delivered afterwards is a
duplicate.

Both are written with the row's ETag: a row some instance changed since the sweep read it keeps
that instance's outcome. Each is counted once in the aggregates, and the request's blobs go.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.ledger import DEAD, REFUSED, SENT, Ledger, LedgerConflict, LedgerEntry
from shared.reporting.aggregates import Aggregates
from shared.reporting.rows import day_key
from shared.send.relay_blobs import RelayBlobs

log = logging.getLogger("hve_relay.retention")

# Deletes in flight at once: each is one HTTP call, and ledger rows are one partition each.
_CONCURRENCY = 16
LOST_IN_FLIGHT = "lost-in-flight"
LOST_IN_QUEUE = "lost-in-queue"
# How long a poison message lives: the Functions host puts it on `<queue>-poison` with the queue
# service's default time to live (not configurable in host.json).
POISON_TTL = timedelta(days=7)


@dataclass
class PurgeReport:
    lost_in_flight: int = 0
    lost_in_queue: int = 0
    deleted: dict[str, int] = field(default_factory=dict)  # what -> rows deleted
    more: list[str] = field(default_factory=list)  # what hit the per-run bound


@dataclass(frozen=True)
class _Target:
    what: str
    table: Any
    query: str
    parameters: dict[str, Any]


async def purge_expired(
    *,
    ledger: Ledger,
    ledger_table: Any,
    index_table: Any,
    welcome_table: Any | None,
    now: datetime,
    retention: timedelta,
    lost_after: timedelta,
    max_rows: int,
    aggregates: Any = None,
    delivery_table: Any | None = None,
    lost_in_queue_after: timedelta | None = None,
    aggregates_table: Any | None = None,
    blobs: RelayBlobs | None = None,
    suppression_table: Any | None = None,
) -> PurgeReport:
    report = PurgeReport()
    report.lost_in_flight = await settle_lost_in_flight(ledger, now, lost_after, max_rows, aggregates, blobs)
    if report.lost_in_flight >= max_rows:
        report.more.append(LOST_IN_FLIGHT)
    if lost_in_queue_after is not None:
        report.lost_in_queue = await settle_lost_in_queue(ledger, now, lost_in_queue_after, max_rows, aggregates, blobs)
        if report.lost_in_queue >= max_rows:
            report.more.append(LOST_IN_QUEUE)
    cutoff = now - retention
    targets = [
        # Final rows only: one the sweeps above could not settle in this run waits for the next.
        _Target(
            "ledger",
            ledger_table,
            "RowKey eq @rk and Updated lt @cutoff and ( State eq @sent or State eq @refused or State eq @dead )",
            {"rk": "request", "cutoff": cutoff, "sent": SENT, "refused": REFUSED, "dead": DEAD},
        ),
        _Target(
            "chunks",
            ledger_table,
            "RowKey ge @lo and RowKey lt @hi and Updated lt @cutoff",
            {"lo": "chunk-", "hi": "chunk.", "cutoff": cutoff},
        ),
        _Target("recipient-index", index_table, "At lt @cutoff", {"cutoff": cutoff}),
    ]
    if welcome_table is not None:
        targets.append(
            _Target(
                "welcome", welcome_table, "PartitionKey eq @pk and updated lt @cutoff", {"pk": "user", "cutoff": cutoff}
            )
        )
    if delivery_table is not None:
        # Delivery status per request and per recipient hash (shared/delivery/trace.py), and stale cursors.
        targets.append(_Target("delivery", delivery_table, "Updated lt @cutoff", {"cutoff": cutoff}))
    if aggregates_table is not None:
        # PartitionKey is the UTC day: the days that ended before the cutoff's day began (a row's
        # hours, its rollup rows and marker sort in that order, so a partial run leaves the rollup).
        targets.append(
            _Target("aggregates", aggregates_table, "PartitionKey lt @day", {"day": day_key(cutoff.timestamp())})
        )
    if suppression_table is not None:
        # Suppressions past their expiry (shared/send/suppression.py): ignored already, deleted here.
        targets.append(_Target("suppression", suppression_table, "Expires lt @now", {"now": now}))
    for target in targets:
        deleted, more = await _delete_matching(target, max_rows)
        report.deleted[target.what] = deleted
        if more:
            report.more.append(target.what)
    if blobs is not None:
        deleted, more = await blobs.sweep(cutoff, max_rows)
        report.deleted["blobs"] = deleted
        if more:
            report.more.append("blobs")
    return report


async def settle_lost_in_flight(
    ledger: Ledger,
    now: datetime,
    lost_after: timedelta,
    limit: int,
    aggregates: Any = None,
    blobs: RelayBlobs | None = None,
) -> int:
    settled = 0
    for entry in await ledger.sending_before(now - lost_after, limit):
        hours = (now - entry.updated).total_seconds() / 3600
        settled += await _settle(
            ledger,
            entry,
            now,
            aggregates,
            blobs,
            f"{LOST_IN_FLIGHT}: still sending {hours:.0f} h after the last attempt; HVE may have "
            f"accepted it (Message-ID in the row)",
        )
    return settled


async def settle_lost_in_queue(
    ledger: Ledger,
    now: datetime,
    lost_after: timedelta,
    limit: int,
    aggregates: Any = None,
    blobs: RelayBlobs | None = None,
) -> int:
    settled = 0
    for entry in await ledger.unsettled_before(now - lost_after, limit):
        days = (now - entry.updated).total_seconds() / 86400
        settled += await _settle(
            ledger,
            entry,
            now,
            aggregates,
            blobs,
            f"{LOST_IN_QUEUE}: still {entry.state} {days:.0f} days after its last update; no "
            f"copy of it is left on the queue or the poison queue",
        )
    return settled


async def _settle(
    ledger: Ledger, entry: LedgerEntry, now: datetime, aggregates: Any, blobs: RelayBlobs | None, reason: str
) -> int:
    try:
        await ledger.save(entry.evolve(state=DEAD, updated=now, reason=reason))
    except LedgerConflict:
        return 0  # an instance picked it up meanwhile: its outcome stands
    if aggregates is not None:  # counted once: the ETag write above made the row final
        aggregates.outcome(now.timestamp(), entry.account, entry.category, DEAD)
    if blobs is not None:
        await blobs.delete_for_request(entry.request_id, entry.claim_blob, find_copies=True, logger=log)
    return 1


async def _delete_matching(target: _Target, max_rows: int) -> tuple[int, bool]:
    """Delete up to `max_rows` rows matching the query; (deleted, whether more may match)."""
    from azure.core.exceptions import ResourceNotFoundError

    keys: list[tuple[str, str]] = []
    more = False
    # Keys first, deletes after: no deleting under a query's continuation token.
    try:
        async for row in target.table.query_entities(
            target.query, parameters=target.parameters, select=["PartitionKey", "RowKey"]
        ):
            if len(keys) >= max_rows:
                more = True
                break
            keys.append((row["PartitionKey"], row["RowKey"]))
    except ResourceNotFoundError:  # a table not created yet (Azurite starts empty)
        return 0, False
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def delete(pk: str, rk: str) -> None:
        async with gate:
            try:
                await target.table.delete_entity(pk, rk)
            except ResourceNotFoundError:
                pass

    await asyncio.gather(*(delete(pk, rk) for pk, rk in keys))
    return len(keys), more


async def handle_timer(now: datetime | None = None) -> PurgeReport:
    """The `purge_expired` timer: one bounded pass over the app's tables and the relay's blobs."""
    from shared.settings import Settings
    from shared.storage import StorageClients
    from shared.telemetry import Instruments, configure, flush_metrics

    settings = Settings.from_env()
    configure(settings)
    storage = StorageClients(settings)
    try:
        ledger_table = await storage.table(settings.ledger_table)
        index_table = await storage.table(settings.recipient_index_table)
        welcome_table = await storage.table(settings.welcome_state_table)
        aggregates_table = await storage.table(settings.aggregates_table)
        aggregates = Aggregates(
            aggregates_table, flush_seconds=0, rollup_after_seconds=settings.aggregates_rollup_after_seconds
        )
        delivery_table = await storage.table(settings.delivery_table)
        report = await purge_expired(
            ledger=Ledger(ledger_table, index_table, settings.recipient_hash_key),
            ledger_table=ledger_table,
            index_table=index_table,
            welcome_table=welcome_table,
            now=now or datetime.now(UTC),
            retention=settings.ledger_retention,
            lost_after=timedelta(seconds=settings.lost_in_flight_seconds),
            lost_in_queue_after=timedelta(seconds=settings.max_age_seconds) + POISON_TTL,
            max_rows=settings.retention_max_rows,
            aggregates=aggregates,
            delivery_table=delivery_table,
            aggregates_table=aggregates_table,
            blobs=RelayBlobs.of(storage, settings),
            suppression_table=await storage.table(settings.suppression_table),
        )
        await aggregates.flush()
    finally:
        await storage.close()
    log.info(
        "purge_expired: %d lost in flight and %d lost in queue recorded dead; deleted %s%s",
        report.lost_in_flight,
        report.lost_in_queue,
        ", ".join(f"{n} {what}" for what, n in report.deleted.items()),
        f"; more left for the next run: {', '.join(report.more)}" if report.more else "",
    )
    dead = report.lost_in_flight + report.lost_in_queue
    if dead:
        # Counted like the send stage's dead requests (hve_relay.messages, outcome dead), so the
        # "dead request" alert sees these too; the account is in the ledger rows, not here.
        Instruments().messages.add(dead, {"outcome": "dead", "account": "-"})
        await asyncio.to_thread(flush_metrics)
    return report
