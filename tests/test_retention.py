"""Retention (LEDGER_RETENTION_DAYS) and lost-in-flight requests, against Azurite: rows written
through the app's own APIs with dates in the past, then the `purge_expired` sweep."""

from __future__ import annotations

import asyncio
import importlib.util
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.ledger import DEAD, SENDING, SENT, Ledger, LedgerEntry
from shared.retention import handle_timer, purge_expired
from shared.settings import Settings, SettingsError
from shared.storage import StorageClients
from shared.welcome_state import UserRow, WelcomeState

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
OLD = NOW - timedelta(days=91)      # past the default 90 days
RECENT = NOW - timedelta(days=89)


def entry(request_id: str, when: datetime, state: str = SENT, chunks: int = 1) -> LedgerEntry:
    return LedgerEntry(request_id=request_id, state=state, first_received=when, updated=when, account="news@contoso.com",
                       message_id=f"<{request_id}@contoso.com>", chunks_total=chunks, chunks_sent=chunks)


class Tables:
    def __init__(self, storage, **env: str) -> None:
        self.settings = Settings.from_env(storage.env(RECIPIENT_HASH_KEY="k", WELCOME_STATE_TABLE=f"{storage.table_prefix}wel",
                                                      **env))
        self.clients = StorageClients(self.settings)

    async def open(self) -> "Tables":
        s = self.settings
        self.ledger_table = await self.clients.table(s.ledger_table)
        self.index_table = await self.clients.table(s.recipient_index_table)
        self.welcome_table = await self.clients.table(s.welcome_state_table)
        self.ledger = Ledger(self.ledger_table, self.index_table, s.recipient_hash_key)
        self.welcome = WelcomeState(self.welcome_table)
        return self

    async def seed(self, request_id: str, when: datetime, state: str = SENT) -> None:
        """A request as the send stage leaves it: its row, two chunk rows, two recipient-index rows."""
        e = await self.ledger.put(entry(request_id, when, state, chunks=2))
        for index in range(2):
            await self.ledger.record_chunk(e, index, account=e.account, recipients=1, code=250, message_id=e.message_id)
        await self.ledger.index_recipients(e, [f"{request_id}-a@contoso.com", f"{request_id}-b@contoso.com"])

    async def purge(self, max_rows: int = 1000):
        return await purge_expired(ledger=self.ledger, ledger_table=self.ledger_table, index_table=self.index_table,
                                   welcome_table=self.welcome_table, now=NOW, retention=timedelta(days=90),
                                   lost_after=timedelta(hours=24), max_rows=max_rows)

    async def keys(self, table) -> list[tuple[str, str]]:
        return sorted([(r["PartitionKey"], r["RowKey"]) async for r in table.list_entities()])


def test_rows_older_than_the_retention_are_deleted_and_younger_ones_stay(storage):
    async def main():
        t = await Tables(storage).open()
        try:
            await t.seed("old-1", OLD)
            await t.seed("old-refused", OLD - timedelta(days=400), state="refused")
            await t.seed("recent-1", RECENT)
            await t.welcome.save(UserRow("user-old", "enqueued", first_seen=OLD, updated=OLD, request_id="w-1"))
            await t.welcome.save(UserRow("user-recent", "skipped", first_seen=RECENT, updated=RECENT))
            await t.welcome.advance_watermark(OLD)
            report = await t.purge()
            return report, await t.keys(t.ledger_table), await t.keys(t.index_table), await t.keys(t.welcome_table), \
                await t.ledger.requests_for_address("old-1-a@contoso.com"), await t.ledger.requests_for_address("recent-1-a@contoso.com")
        finally:
            await t.clients.close()

    report, ledger, index, welcome, old_lookup, recent_lookup = asyncio.run(main())
    assert report.deleted == {"ledger": 2, "chunks": 4, "recipient-index": 4, "welcome": 1} and report.more == []
    assert ledger == [("recent-1", "chunk-0001"), ("recent-1", "chunk-0002"), ("recent-1", "request")]
    assert len(index) == 2 and all(rk == "recent-1" for _, rk in index)
    assert welcome == [("scan", "watermark"), ("user", "user-recent")]
    assert old_lookup == [] and [r["request_id"] for r in recent_lookup] == ["recent-1"]


def test_each_run_is_bounded_and_the_next_run_resumes(storage):
    async def main():
        t = await Tables(storage).open()
        try:
            for n in range(5):
                await t.ledger.put(entry(f"old-{n}", OLD))
            first = await t.purge(max_rows=3)
            left = await t.keys(t.ledger_table)
            second = await t.purge(max_rows=3)
            return first, left, second, await t.keys(t.ledger_table)
        finally:
            await t.clients.close()

    first, left, second, end = asyncio.run(main())
    assert first.deleted["ledger"] == 3 and first.more == ["ledger"] and len(left) == 2
    assert second.deleted["ledger"] == 2 and second.more == [] and end == []


def test_a_row_left_sending_is_recorded_dead_lost_in_flight_and_kept(storage):
    async def main():
        t = await Tables(storage).open()
        try:
            await t.ledger.put(entry("lost-1", NOW - timedelta(hours=30), state=SENDING))
            await t.ledger.put(entry("lost-ancient", OLD, state=SENDING))  # older than the retention, too
            await t.ledger.put(entry("in-flight", NOW - timedelta(minutes=5), state=SENDING))
            report = await t.purge()
            return report, {k: await t.ledger.get(k) for k in ("lost-1", "lost-ancient", "in-flight")}
        finally:
            await t.clients.close()

    report, rows = asyncio.run(main())
    assert report.lost_in_flight == 2
    for key in ("lost-1", "lost-ancient"):
        assert rows[key].state == DEAD and rows[key].reason.startswith("lost-in-flight")
        assert rows[key].message_id == f"<{key}@contoso.com>" and rows[key].updated == NOW
    assert rows["in-flight"].state == SENDING


def test_the_timer_reads_its_settings_and_purges(storage, monkeypatch):
    async def seed():
        t = await Tables(storage).open()
        try:
            await t.seed("old-timer", OLD)
            await t.seed("recent-timer", RECENT)
        finally:
            await t.clients.close()

    asyncio.run(seed())
    for name, value in storage.env(RECIPIENT_HASH_KEY="k", WELCOME_STATE_TABLE=f"{storage.table_prefix}wel",
                                   LEDGER_RETENTION_DAYS="90").items():
        monkeypatch.setenv(name, value)
    report = asyncio.run(handle_timer(now=NOW))
    assert report.deleted["ledger"] == 1 and report.deleted["recipient-index"] == 2


def test_retention_shorter_than_a_request_may_live_is_refused():
    with pytest.raises(SettingsError, match="LEDGER_RETENTION_DAYS"):
        Settings.from_env({"LEDGER_RETENTION_DAYS": "3", "SEND_MAX_AGE_HOURS": "72"})
    assert Settings.from_env({}).ledger_retention == timedelta(days=90)


def test_function_app_declares_purge_expired_at_the_retention_schedule():
    spec = importlib.util.spec_from_file_location("_retention_function_app", Path(__file__).parents[1] / "function_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [fn] = [f for f in module.app.get_functions() if f.get_function_name() == "purge_expired"]
    [trigger] = [b for b in fn.get_bindings() if b.type == "timerTrigger"]
    assert trigger.schedule == "%RETENTION_SCHEDULE%"
