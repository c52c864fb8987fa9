"""Retention (LEDGER_RETENTION_DAYS) and lost-in-flight requests, against Azurite: rows written
through the app's own APIs with dates in the past, then the `purge_expired` sweep."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.reporting.aggregates import Aggregates
from shared.send.blobs import BlobReader
from shared.ledger import DEAD, DEFERRED, RECEIVED, SENDING, SENT, Ledger, LedgerEntry
from shared.send.producer import claim_check_blob_name
from shared.retention import handle_timer, purge_expired
from shared.send.stage import Relay
from shared.settings import Settings, SettingsError
from shared.storage import StorageClients
from shared.welcome.state import UserRow, WelcomeState
from tests.relay_harness import drain, enqueue, relay_settings

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
                                   lost_after=timedelta(hours=24), lost_in_queue_after=LOST_IN_QUEUE_AFTER,
                                   max_rows=max_rows)

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


# The defaults: SEND_MAX_AGE_HOURS (72) plus the time to live of a poison message (the Functions
# host puts it on `<queue>-poison` with the queue's default, 7 days); LOST_IN_FLIGHT_HOURS (24).
LOST_IN_QUEUE_AFTER = timedelta(hours=72) + timedelta(days=7)
LOST_IN_FLIGHT_AFTER = timedelta(hours=24)


def timer(storage, monkeypatch, now: datetime, **env: str):
    """The `purge_expired` timer as Azure runs it: its settings from the environment."""
    for name, value in storage.env(RECIPIENT_HASH_KEY="k", WELCOME_STATE_TABLE=f"{storage.table_prefix}wel",
                                   DELIVERY_TABLE=f"{storage.table_prefix}del", **env).items():
        monkeypatch.setenv(name, value)
    return asyncio.run(handle_timer(now=now))


def read_ledger(storage, *request_ids: str) -> dict[str, LedgerEntry | None]:
    async def main():
        t = await Tables(storage).open()
        try:
            return {k: await t.ledger.get(k) for k in request_ids}
        finally:
            await t.clients.close()

    return asyncio.run(main())


def dead_counted(storage, since: datetime, until: datetime) -> int:
    """`requests.dead` in the aggregates table over [since, until)."""
    async def main():
        clients = StorageClients(Settings.from_env(storage.env()))
        try:
            agg = Aggregates(clients.tables.get_table_client(f"{storage.table_prefix}agg"), clock=until.timestamp)
            return sum(b.counts.get("requests.dead", 0) for b in await agg.read(since, until))
        finally:
            await clients.close()

    return asyncio.run(main())


def test_the_purge_never_deletes_a_request_that_is_not_final_however_many_old_rows_there_are(storage):
    # More old rows than one run may touch: what the sweeps could not settle in this run must
    # still be there for the next, whatever its state.
    unsettled = [f"{state}-{n}" for state in (SENDING, DEFERRED, RECEIVED) for n in range(4)]

    async def main():
        t = await Tables(storage).open()
        try:
            for request_id in unsettled:
                await t.ledger.put(entry(request_id, OLD, state=request_id.split("-")[0]))
            for n in range(4):
                await t.ledger.put(entry(f"sent-{n}", OLD))
            report = await t.purge(max_rows=2)
            rows = {r["PartitionKey"]: r async for r in t.ledger_table.list_entities()}
            return report, rows
        finally:
            await t.clients.close()

    report, rows = asyncio.run(main())
    assert set(unsettled) <= set(rows), "a request that was not final was deleted"
    assert sorted(set(rows) - set(unsettled)) == ["sent-2", "sent-3"]
    assert report.deleted["ledger"] == 2 and "ledger" in report.more
    # Settled two by two (lost in flight, lost in queue); the others wait for the next run.
    assert Counter(r["State"] for r in rows.values())[DEAD] == 4


def test_lost_in_flight_and_lost_in_queue_are_settled_exactly_past_their_thresholds(storage, monkeypatch):
    minute = timedelta(minutes=1)
    rows = {
        "flight-young": (SENDING, NOW - LOST_IN_FLIGHT_AFTER + minute),
        "flight-old": (SENDING, NOW - LOST_IN_FLIGHT_AFTER - minute),
        "queue-young": (DEFERRED, NOW - LOST_IN_QUEUE_AFTER + minute),
        "queue-old": (DEFERRED, NOW - LOST_IN_QUEUE_AFTER - minute),
        "received-young": (RECEIVED, NOW - LOST_IN_QUEUE_AFTER + minute),
        "received-old": (RECEIVED, NOW - LOST_IN_QUEUE_AFTER - minute),
        "deferred-a-day": (DEFERRED, NOW - LOST_IN_FLIGHT_AFTER - minute),  # not sending: not in flight
    }

    async def seed():
        t = await Tables(storage).open()
        try:
            for request_id, (state, when) in rows.items():
                await t.ledger.put(entry(request_id, when, state=state))
        finally:
            await t.clients.close()

    asyncio.run(seed())
    report = timer(storage, monkeypatch, NOW)
    after = read_ledger(storage, *rows)
    assert {k: e.state for k, e in after.items()} == {
        "flight-young": SENDING, "flight-old": DEAD, "queue-young": DEFERRED, "queue-old": DEAD,
        "received-young": RECEIVED, "received-old": DEAD, "deferred-a-day": DEFERRED}
    assert after["flight-old"].reason.startswith("lost-in-flight")
    assert after["queue-old"].reason.startswith("lost-in-queue") and after["received-old"].reason.startswith("lost-in-queue")
    assert report.lost_in_flight == 1 and report.lost_in_queue == 2


def test_a_deferred_request_whose_queue_copy_is_gone_is_recorded_dead_once_and_kept(storage, monkeypatch):
    # The review's case: a `deferred` row whose queue message expired, looked at by the daily
    # purge 8, 30, 89 and 91 days later.
    start = NOW - timedelta(days=91)

    async def seed():
        t = await Tables(storage).open()
        try:
            await t.ledger.put(entry("gone-1", start, state=DEFERRED))
        finally:
            await t.clients.close()

    asyncio.run(seed())
    states = {}
    for days in (8, 30, 30, 89, 91):
        timer(storage, monkeypatch, start + timedelta(days=days))
        row = read_ledger(storage, "gone-1")["gone-1"]
        states[days] = (row.state, row.reason.split(":")[0], row.updated) if row else None
    assert states[8] == (DEFERRED, "", start)
    assert states[30] == states[89] == states[91] == (DEAD, "lost-in-queue", start + timedelta(days=30))
    assert dead_counted(storage, start, start + timedelta(days=92)) == 1


class RaceLedger(Ledger):
    """The sweep's ledger, with `meanwhile` run between its read of the rows and its write: another
    instance finishing the request in that moment, for real (queue, governor, SMTP, ledger)."""

    meanwhile = None

    async def sending_before(self, cutoff, limit):
        found = await super().sending_before(cutoff, limit)
        if found and self.meanwhile:
            await self.meanwhile()
        return found

    async def unsettled_before(self, cutoff, limit):
        found = await super().unsettled_before(cutoff, limit)
        if found and self.meanwhile:
            await self.meanwhile()
        return found


class Clock:
    """A fixed noon that moves with real time (no test depends on the hour it runs at)."""

    def __init__(self, start: datetime) -> None:
        self._offset = start.timestamp() - time.time()

    def __call__(self) -> float:
        return time.time() + self._offset


@pytest.mark.parametrize("state,age,outcome,reason", [
    # Lost in flight: another instance takes the row over (its lease long gone) and sends it.
    (SENDING, timedelta(hours=30), SENT, ""),
    # Lost in queue: a copy was still on its way after all; the relay records it dead itself.
    (DEFERRED, timedelta(days=11), DEAD, "gave up after"),
])
def test_a_request_finished_between_the_sweeps_read_and_write_keeps_its_outcome(storage, emulator, state, age,
                                                                                 outcome, reason):
    clock = Clock(datetime(2026, 3, 10, 12, 0, tzinfo=timezone.utc))

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator), clock=clock)
        try:
            now = datetime.fromtimestamp(clock(), timezone.utc)
            ledger = RaceLedger(relay.ledger._table, relay.ledger._index, relay.settings.recipient_hash_key)
            await ledger.put(entry("race-1", now - age, state=state).evolve(attempts=1))
            await enqueue(relay, {"id": "race-1", "to": ["ann@contoso.com"], "subject": "Hi", "text": "Hello"})
            handled = []

            async def finish():
                handled.extend(await drain(relay))

            ledger.meanwhile = finish
            sweep_counts = Aggregates(relay.storage.tables.get_table_client(relay.settings.aggregates_table),
                                      flush_seconds=0)
            report = await purge_expired(ledger=ledger, ledger_table=relay.ledger._table,
                                         index_table=relay.ledger._index, welcome_table=None, now=now,
                                         retention=timedelta(days=90), lost_after=LOST_IN_FLIGHT_AFTER,
                                         lost_in_queue_after=LOST_IN_QUEUE_AFTER, max_rows=100,
                                         aggregates=sweep_counts)
            await sweep_counts.flush()
            return handled, report, await relay.ledger.get("race-1"), now
        finally:
            await relay.close()

    handled, report, row, now = asyncio.run(main())
    assert [h.state for h in handled] == [outcome]
    assert row.state == outcome and row.reason.startswith(reason), row
    assert report.lost_in_flight == 0 and report.lost_in_queue == 0
    assert dead_counted(storage, now - timedelta(days=1), now + timedelta(days=1)) == (outcome == DEAD)


def test_a_request_the_sweep_records_dead_leaves_no_blobs(storage, monkeypatch):
    async def seed():
        t = await Tables(storage).open()
        try:
            container = t.clients.container(storage.container_name)
            state = t.clients.container(storage.state_container_name)
            await container.create_container()
            payloads = BlobReader(container, None, state_container=state)
            claim = await container.upload_blob(claim_check_blob_name("lost-cc"), b'{"id":"lost-cc"}')
            await payloads.store("lost-cc", b'{"id":"lost-cc"}')
            await payloads.store("lost-cc-2", b'{"id":"lost-cc-2"}')   # another request's copy
            await container.upload_blob("att/terms.pdf", b"%PDF terms")
            await t.ledger.put(entry("lost-cc", NOW - timedelta(hours=30), state=SENDING).evolve(claim_blob=claim.url))
            await t.ledger.put(entry("lost-cc-2", NOW - timedelta(hours=1), state=DEFERRED))
        finally:
            await t.clients.close()

    asyncio.run(seed())
    report = timer(storage, monkeypatch, NOW)
    left = asyncio.run(blob_names(storage))
    assert report.lost_in_flight == 1 and read_ledger(storage, "lost-cc")["lost-cc"].state == DEAD
    assert left[storage.container_name] == ["att/terms.pdf"]
    [copy] = left[storage.state_container_name]
    assert copy.startswith("deferred/lost-cc-2-")


async def blob_names(storage) -> dict[str, list[str]]:
    """The blobs of the producers' container and of the relay's own, by container."""
    clients = StorageClients(Settings.from_env(storage.env()))
    try:
        out = {}
        for name in (storage.container_name, storage.state_container_name):
            container = clients.container(name)
            out[name] = sorted([b.name async for b in container.list_blobs()]) if await container.exists() else []
        return out
    finally:
        await clients.close()


def test_relay_blobs_left_past_the_retention_are_swept_in_bounded_runs_and_attachments_stay(storage, monkeypatch):
    async def seed():
        clients = StorageClients(Settings.from_env(storage.env()))
        try:
            container = clients.container(storage.container_name)
            await container.create_container()
            reader = BlobReader(container, None, state_container=clients.container(storage.state_container_name))
            await container.upload_blob(claim_check_blob_name("x-0"), b"{}")     # a request never delivered
            await reader.store("x-1", b"{}")                                    # copies whose clean-up failed
            await reader.store("x-2", b"{}")
            for producer_blob in ("att/terms.pdf", "archive/requests/old.json", "requests.json", "deferred.txt"):
                await container.upload_blob(producer_blob, b"producer's")
        finally:
            await clients.close()

    def names() -> list[str]:
        return sorted(n for names in asyncio.run(blob_names(storage)).values() for n in names)

    asyncio.run(seed())
    written = datetime.now(timezone.utc)   # Azurite's clock dates the blobs (faked with the tests')
    producers = ["archive/requests/old.json", "att/terms.pdf", "deferred.txt", "requests.json"]
    within = timer(storage, monkeypatch, written + timedelta(days=89), RETENTION_MAX_ROWS_PER_RUN="2")
    assert len(names()) == 7
    first = timer(storage, monkeypatch, written + timedelta(days=91), RETENTION_MAX_ROWS_PER_RUN="2")
    assert len(names()) == 5
    second = timer(storage, monkeypatch, written + timedelta(days=91), RETENTION_MAX_ROWS_PER_RUN="2")
    assert names() == producers
    assert within.deleted["blobs"] == 0
    assert first.deleted["blobs"] == 2 and "blobs" in first.more
    assert second.deleted["blobs"] == 1 and "blobs" not in second.more


def test_aggregate_rows_older_than_the_retention_are_purged_in_bounded_runs(storage, monkeypatch):
    async def seed():
        clients = StorageClients(Settings.from_env(storage.env()))
        try:
            table = await clients.table(f"{storage.table_prefix}agg")
            agg = Aggregates(table, flush_seconds=0, clock=NOW.timestamp)
            for when in (OLD, OLD + timedelta(hours=3), RECENT):
                agg.outcome(when.timestamp(), "news@contoso.com", "orders", "sent", internal=1)
                agg.deferral(when.timestamp(), "alerts@contoso.com", "alerts")
            await agg.flush()
            # A report over the old day builds its rollup (rollup rows and their marker).
            await agg.read(OLD - timedelta(days=1), OLD + timedelta(days=1))
            return Counter([r["PartitionKey"] async for r in table.list_entities()])
        finally:
            await clients.close()

    async def rows():
        clients = StorageClients(Settings.from_env(storage.env()))
        try:
            table = clients.tables.get_table_client(f"{storage.table_prefix}agg")
            return [(r["PartitionKey"], r["RowKey"]) async for r in table.list_entities()]
        finally:
            await clients.close()

    days = asyncio.run(seed())
    old_day, recent_day = OLD.strftime("%Y%m%d"), RECENT.strftime("%Y%m%d")
    assert sorted(days) == [old_day, recent_day] and days[old_day] > 5   # hours, rollup rows, marker
    before = sum(days.values())
    reports = []
    for _ in range(before):
        reports.append(timer(storage, monkeypatch, NOW, RETENTION_MAX_ROWS_PER_RUN="2"))
        if "aggregates" not in reports[-1].more:
            break
    left = asyncio.run(rows())
    assert Counter(pk for pk, _ in left) == {recent_day: days[recent_day]}
    assert all(r.deleted["aggregates"] <= 2 for r in reports) and len(reports) >= 2
    assert sum(r.deleted["aggregates"] for r in reports) == days[old_day]
