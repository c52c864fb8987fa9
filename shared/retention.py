"""Retention: how long the relay keeps who was mailed (LEDGER_RETENTION_DAYS), and the sweep that
settles requests lost in flight. Run by the daily `purge_expired` timer.

What is deleted, each counted from its row's last update:
- ledger request rows (`Updated`), except rows still `sending` (settled first, see below);
- ledger chunk rows (`Updated`);
- recipient-index rows (`At`): the keyed hashes that answer "was this address mailed?";
- welcome user rows (`updated`); the scan's watermark row stays.

At most RETENTION_MAX_ROWS_PER_RUN rows per table per run: a backlog is worked off over several
runs, and no run outlives the host's function timeout.

A ledger row still `sending` LOST_IN_FLIGHT_HOURS after its last update belongs to a request
whose queue message is gone (poisoned, deleted) while HVE may or may not have accepted it. It is
recorded as final `dead`, reason `lost-in-flight`; its Message-ID stays in the row, so a copy that
did reach HVE can be traced.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from .aggregates import Aggregates
from .ledger import DEAD, SENDING, Ledger, LedgerConflict

log = logging.getLogger("hve_relay.retention")

# Deletes in flight at once: each is one HTTP call, and ledger rows are one partition each.
_CONCURRENCY = 16
LOST_IN_FLIGHT = "lost-in-flight"


@dataclass
class PurgeReport:
    lost_in_flight: int = 0
    deleted: dict[str, int] = field(default_factory=dict)   # what -> rows deleted
    more: list[str] = field(default_factory=list)            # what hit the per-run bound


@dataclass(frozen=True)
class _Target:
    what: str
    table: Any
    query: str
    parameters: dict[str, Any]


async def purge_expired(*, ledger: Ledger, ledger_table: Any, index_table: Any, welcome_table: Any | None,
                        now: datetime, retention: timedelta, lost_after: timedelta, max_rows: int,
                        aggregates: Any = None) -> PurgeReport:
    report = PurgeReport()
    report.lost_in_flight = await settle_lost_in_flight(ledger, now, lost_after, max_rows, aggregates)
    cutoff = now - retention
    targets = [
        _Target("ledger", ledger_table, "RowKey eq @rk and Updated lt @cutoff and State ne @sending",
                {"rk": "request", "cutoff": cutoff, "sending": SENDING}),
        _Target("chunks", ledger_table, "RowKey ge @lo and RowKey lt @hi and Updated lt @cutoff",
                {"lo": "chunk-", "hi": "chunk.", "cutoff": cutoff}),
        _Target("recipient-index", index_table, "At lt @cutoff", {"cutoff": cutoff}),
    ]
    if welcome_table is not None:
        targets.append(_Target("welcome", welcome_table, "PartitionKey eq @pk and updated lt @cutoff",
                               {"pk": "user", "cutoff": cutoff}))
    for target in targets:
        deleted, more = await _delete_matching(target, max_rows)
        report.deleted[target.what] = deleted
        if more:
            report.more.append(target.what)
    return report


async def settle_lost_in_flight(ledger: Ledger, now: datetime, lost_after: timedelta, limit: int,
                                aggregates: Any = None) -> int:
    settled = 0
    for entry in await ledger.sending_before(now - lost_after, limit):
        hours = (now - entry.updated).total_seconds() / 3600
        try:
            await ledger.save(entry.evolve(
                state=DEAD, updated=now,
                reason=f"{LOST_IN_FLIGHT}: still sending {hours:.0f} h after the last attempt; HVE may have "
                       f"accepted it (Message-ID in the row)"))
            settled += 1
            if aggregates is not None:   # counted once: the ETag write above made the row final
                aggregates.outcome(now.timestamp(), entry.account, entry.category, DEAD)
        except LedgerConflict:
            pass  # an instance picked it up meanwhile: its outcome stands
    return settled


async def _delete_matching(target: _Target, max_rows: int) -> tuple[int, bool]:
    """Delete up to `max_rows` rows matching the query; (deleted, whether more may match)."""
    from azure.core.exceptions import ResourceNotFoundError

    keys: list[tuple[str, str]] = []
    more = False
    # Keys first, deletes after: no deleting under a query's continuation token.
    async for row in target.table.query_entities(target.query, parameters=target.parameters,
                                                 select=["PartitionKey", "RowKey"]):
        if len(keys) >= max_rows:
            more = True
            break
        keys.append((row["PartitionKey"], row["RowKey"]))
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
    """The `purge_expired` timer: one bounded pass over the app's tables."""
    from .settings import Settings
    from .storage import StorageClients

    settings = Settings.from_env()
    storage = StorageClients(settings)
    try:
        ledger_table = await storage.table(settings.ledger_table)
        index_table = await storage.table(settings.recipient_index_table)
        welcome_table = await storage.table(settings.welcome_state_table)
        aggregates = Aggregates(storage.tables.get_table_client(settings.aggregates_table), flush_seconds=0,
                                rollup_after_seconds=settings.aggregates_rollup_after_seconds)
        report = await purge_expired(
            ledger=Ledger(ledger_table, index_table, settings.recipient_hash_key), ledger_table=ledger_table,
            index_table=index_table, welcome_table=welcome_table, now=now or datetime.now(timezone.utc),
            retention=settings.ledger_retention, lost_after=timedelta(seconds=settings.lost_in_flight_seconds),
            max_rows=settings.retention_max_rows, aggregates=aggregates)
        await aggregates.flush()
    finally:
        await storage.close()
    log.info("purge_expired: %d lost in flight recorded dead; deleted %s%s", report.lost_in_flight,
             ", ".join(f"{n} {what}" for what, n in report.deleted.items()),
             f"; more left for the next run: {', '.join(report.more)}" if report.more else "")
    return report
