"""The aggregates table against real Azurite: concurrent writers, lost answers, outages, windows."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from azure.data.tables.aio import TableClient

from shared.reporting.aggregates import Aggregates
from shared.reporting.rollups import ReadStats, Rollups
from tools.azurite import connection_string
from tools.fault_proxy import Fault, FaultProxy

T0 = datetime(2026, 11, 30, 22, 0, tzinfo=timezone.utc).timestamp()


def table(conn: str, name: str, **kwargs) -> TableClient:
    return TableClient.from_connection_string(conn, name, **kwargs)


def totals(buckets) -> dict[str, int]:
    out: dict[str, int] = {}
    for b in buckets:
        for k, v in b.counts.items():
            out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


async def read_all(conn: str, name: str, since: float = T0 - 86400, until: float = T0 + 3 * 86400):
    async with table(conn, name) as t:
        return await Aggregates(t).read(datetime.fromtimestamp(since, timezone.utc),
                                        datetime.fromtimestamp(until, timezone.utc))


def test_many_writers_merging_into_the_same_bucket_lose_no_count_and_spread_over_shards(storage):
    name = f"{storage.table_prefix}agg"

    async def writer(seed: int) -> Aggregates:
        async with table(storage.connection_string, name) as t:
            agg = Aggregates(t, flush_seconds=0, shards=4, rng=random.Random(seed))
            for i in range(40):
                agg.outcome(T0 + i, "news@contoso.com", "orders", "sent", internal=2, external=1)
                agg.deferral(T0 + i, "news@contoso.com", "orders")
                if i % 5 == 4:
                    await agg.flush()
                    await asyncio.sleep(0)
            await agg.flush()
            assert not agg._pending and not agg._buffer
            return agg

    async def main():
        writers = await asyncio.gather(*(writer(s) for s in range(6)))
        async with table(storage.connection_string, name) as t:
            rows = [r async for r in t.list_entities()]
        return writers, rows

    writers, rows = asyncio.run(main())
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 240, "deferrals": 240, "recipients.internal": 480, "recipients.external": 240}
    # The writers really raced on one row, and the losers moved to other shards.
    assert sum(w.stats.races for w in writers) > 0
    assert len({r["RowKey"] for r in rows}) > 1


def test_a_merge_whose_answer_was_lost_is_not_added_again(azurite, storage):
    """The table made the change but answered 500 (applied=True): the next flush re-reads the
    row, finds its batch number in `Writes`, and does not add the batch a second time."""
    name = f"{storage.table_prefix}agg"
    faults = {"left": 0}

    def rule(method: str, path: str):
        if method in ("PUT", "MERGE") and name in path and faults["left"] > 0:
            faults["left"] -= 1
            return Fault(500, applied=True)
        return None

    async def main(conn: str) -> Aggregates:
        async with table(conn, name, retry_total=0) as t:
            agg = Aggregates(t, flush_seconds=0)
            agg.outcome(T0, "news@contoso.com", "", "sent", internal=1)
            await agg.flush()                    # creates the row
            agg.outcome(T0, "news@contoso.com", "", "refused")
            faults["left"] = 1
            await agg.flush()                    # applied, but the answer is a 500
            assert agg.stats.failures == 1 and len(agg._pending) == 1
            await agg.flush()                    # re-check: already there
            assert agg.stats.replayed == 1 and not agg._pending
            agg.outcome(T0, "news@contoso.com", "", "dead")
            await agg.flush()
            return agg

    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port)))
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 1, "recipients.internal": 1, "requests.refused": 1, "requests.dead": 1}


def test_a_batch_that_failed_is_not_overtaken_by_a_later_batch_of_the_same_row(azurite, storage):
    """A row's `Writes` holds the highest batch number applied, so a later batch of this process
    must never land before an earlier one that failed: the earlier one would then be taken for
    applied and dropped."""
    name = f"{storage.table_prefix}agg"
    puts = {"n": 0}

    def rule(method: str, path: str):
        if method == "PUT" and name in path:
            puts["n"] += 1
            if puts["n"] <= 2:   # the first two replaces fail (not applied)
                return Fault(503)
        return None

    async def main(conn: str) -> None:
        async with table(conn, name, retry_total=0) as t:
            agg = Aggregates(t, flush_seconds=0)
            agg.outcome(T0, "news@contoso.com", "", "sent", internal=1)
            await agg.flush()                     # created
            agg.outcome(T0, "news@contoso.com", "", "refused")
            await agg.flush()                     # batch 2 fails
            agg.outcome(T0, "news@contoso.com", "", "dead")
            await agg.flush()                     # batch 2 fails again; batch 3 (same row) must wait
            await agg.flush()
            assert not agg._pending

    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port)))
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 1, "recipients.internal": 1, "requests.refused": 1, "requests.dead": 1}


def test_an_outage_keeps_counts_in_memory_until_storage_is_back(azurite, storage):
    name = f"{storage.table_prefix}agg"

    async def main(conn: str, proxy: FaultProxy) -> Aggregates:
        async with table(conn, name, retry_total=0) as t:
            agg = Aggregates(t, flush_seconds=0)
            proxy.down()
            agg.outcome(T0, "alerts@contoso.com", "x", "sent", internal=3)
            await agg.flush()                    # never raises
            assert agg.stats.failures >= 1 and agg._pending
            agg.replies(T0 + 10, "alerts@contoso.com", "x", ["451 4.7.0"])
            await agg.flush()
            proxy.up()
            await agg.flush()
            assert not agg._pending
            return agg

    with FaultProxy(azurite.table_port) as proxy:
        asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port), proxy))
    buckets = asyncio.run(read_all(storage.connection_string, name))
    assert totals(buckets) == {"requests.sent": 1, "recipients.internal": 3, "codes.451 4.7.0": 1}
    assert buckets[0].last_seen == {"451 4.7.0": T0 + 10}


def test_delivery_deltas_may_be_negative_and_unknown_statuses_are_refused(storage):
    name = f"{storage.table_prefix}agg"

    async def main():
        async with table(storage.connection_string, name) as t:
            agg = Aggregates(t, flush_seconds=0)
            await agg.add_delivery(datetime.fromtimestamp(T0, timezone.utc), "news@contoso.com", "c", {"pending": 2})
            await agg.flush()
            await agg.add_delivery(T0, "news@contoso.com", "c", {"pending": -2, "delivered": 1, "failed": 1})
            await agg.flush()
            with pytest.raises(ValueError, match="unknown delivery status"):
                await agg.add_delivery(T0, "news@contoso.com", "c", {"bounced": 1})

    asyncio.run(main())
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {"delivery.delivered": 1,
                                                                             "delivery.failed": 1}


def test_a_window_reads_exactly_its_hours_across_a_day_boundary_and_any_label(storage):
    name = f"{storage.table_prefix}agg"
    odd = "<script>alert(1)</script>/\\#?\x00é"

    async def main():
        async with table(storage.connection_string, name) as t:
            agg = Aggregates(t, flush_seconds=0)
            for h in range(-2, 5):   # 20:00 on the 30th .. 02:00 on the 1st
                agg.outcome(T0 + h * 3600 + 59, "news@contoso.com", odd, "sent", external=h + 3)
            await agg.flush()
            since = datetime.fromtimestamp(T0 + 1800, timezone.utc)        # 22:30 -> 22:00
            until = datetime.fromtimestamp(T0 + 3 * 3600, timezone.utc)    # 01:00, exclusive
            return await agg.read(since, until)

    buckets = asyncio.run(main())
    assert [(datetime.fromtimestamp(b.start, timezone.utc).strftime("%d %H"), b.category,
             b.counts["recipients.external"]) for b in buckets] == [("30 22", odd, 3), ("30 23", odd, 4),
                                                                   ("01 00", odd, 5)]


def test_reading_before_anything_was_counted_is_empty_not_an_error(storage):
    now = datetime.now(timezone.utc)
    assert asyncio.run(read_all(storage.connection_string, f"{storage.table_prefix}none",
                                (now - timedelta(days=7)).timestamp(), now.timestamp())) == []


def test_the_retention_timer_counts_a_lost_in_flight_request_dead_once(storage, monkeypatch):
    from shared.ledger import SENDING, Ledger, LedgerEntry
    from shared.retention import handle_timer
    from shared.settings import Settings
    from shared.storage import StorageClients

    now = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
    env = storage.env(RECIPIENT_HASH_KEY="k", WELCOME_STATE_TABLE=f"{storage.table_prefix}wel")
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    async def seed():
        clients = StorageClients(Settings.from_env(env))
        try:
            ledger = Ledger(await clients.table(env["LEDGER_TABLE"]), await clients.table(env["RECIPIENT_INDEX_TABLE"]), b"k")
            at = now - timedelta(hours=30)
            await ledger.put(LedgerEntry(request_id="lost", state=SENDING, first_received=at, updated=at,
                                         account="news@contoso.com", category="orders"))
        finally:
            await clients.close()

    asyncio.run(seed())
    assert asyncio.run(handle_timer(now=now)).lost_in_flight == 1
    assert asyncio.run(handle_timer(now=now)).lost_in_flight == 0   # final now: nothing to count again
    buckets = asyncio.run(read_all(storage.connection_string, env["AGGREGATES_TABLE"], now.timestamp() - 3600,
                                   now.timestamp() + 3600))
    assert [(b.account, b.category, dict(b.counts)) for b in buckets] == [
        ("news@contoso.com", "orders", {"requests.dead": 1})]


def _window_day():
    since = datetime.fromtimestamp(T0, timezone.utc).replace(hour=0)
    return since, since + timedelta(days=1)


def test_a_closed_day_is_read_from_its_rollup_and_a_late_write_is_never_hidden(storage):
    name = f"{storage.table_prefix}agg"

    async def main():
        async with table(storage.connection_string, name) as t:
            writer = Aggregates(t, flush_seconds=0)
            for h in range(3):
                writer.outcome(T0 - h * 3600, "news@contoso.com", "orders", "sent", internal=1)
                writer.replies(T0 - h * 3600, "alerts@contoso.com", "", ["451 4.7.0"])
            await writer.flush()
            first, second = Aggregates(t), Aggregates(t)
            built = await first.read(*_window_day())
            used = await second.read(*_window_day())
            assert (first.stats.rollups_written, second.stats.rollups_used) == (1, 1)
            # A late count into that day (a flush after an outage, a delivery delta) ...
            writer.outcome(T0, "news@contoso.com", "orders", "dead")
            await writer.flush()
            third = Aggregates(t)
            after = await third.read(*_window_day())
            assert third.stats.rollups_used == 0          # ... makes the rollup stale
            fourth = Aggregates(t)
            again = await fourth.read(*_window_day())
            assert fourth.stats.rollups_used == 1          # rebuilt by the third read
            return built, used, after, again

    built, used, after, again = asyncio.run(main())
    assert totals(built) == totals(used) == {"requests.sent": 3, "recipients.internal": 3, "codes.451 4.7.0": 3}
    assert [(b.start, b.account, dict(b.counts), b.last_seen) for b in built] == \
        [(b.start, b.account, dict(b.counts), b.last_seen) for b in used]
    assert totals(after) == totals(again) == {**totals(built), "requests.dead": 1}


def test_a_late_write_while_a_rollup_is_built_keeps_that_rollup_from_being_used(storage):
    name = f"{storage.table_prefix}agg"

    async def main():
        async with table(storage.connection_string, name) as t:
            writer = Aggregates(t, flush_seconds=0)
            writer.outcome(T0, "news@contoso.com", "orders", "sent", internal=1)
            await writer.flush()
            reader = Rollups(t, ReadStats())     # what Aggregates.read runs, its hour reads wrapped
            hours = reader._hour_rows

            async def hours_then_a_late_write(pks):
                rows = await hours(pks)            # the build read its hours before the late write
                if pks and not writer.stats.merges > 1:
                    writer.outcome(T0, "news@contoso.com", "orders", "refused")
                    await writer.flush()
                return rows

            reader._hour_rows = hours_then_a_late_write
            stale = await reader.read(*_window_day(), now=time.time(), rollup_after=Aggregates(t).rollup_after)
            later = Aggregates(t)
            fresh = await later.read(*_window_day())
            return stale, reader.stats, fresh, later.stats

    stale, reader_stats, fresh, later_stats = asyncio.run(main())
    assert totals(stale) == {"requests.sent": 1, "recipients.internal": 1}   # what it read, honestly
    assert reader_stats.rollups_written == 0                                   # `done` lost to `stale`
    assert later_stats.rollups_used == 0 and totals(fresh) == {"requests.sent": 1, "recipients.internal": 1,
                                                               "requests.refused": 1}


def test_a_window_over_closed_days_without_rows_builds_and_writes_nothing_for_them(storage):
    name = f"{storage.table_prefix}agg"
    day = datetime.fromtimestamp(T0, timezone.utc).replace(hour=0)
    now = (day + timedelta(days=40)).timestamp()

    async def main():
        async with table(storage.connection_string, name) as t:
            writer = Aggregates(t, flush_seconds=0, clock=lambda: T0)
            writer.outcome(T0, "news@contoso.com", "orders", "sent", internal=1)
            await writer.flush()
            reader = Aggregates(t, clock=lambda: now)
            got = await reader.read(day - timedelta(days=15), day + timedelta(days=16))
            again = Aggregates(t, clock=lambda: now)
            await again.read(day - timedelta(days=15), day + timedelta(days=16))
            markers = [e["PartitionKey"] async for e in t.query_entities("RowKey eq '~~rollup'")]
            return got, reader.stats, again.stats, markers

    got, first, second, markers = asyncio.run(main())
    assert totals(got) == {"requests.sent": 1, "recipients.internal": 1}
    assert markers == [day.strftime("%Y%m%d")]             # one rollup: the one day with rows
    assert (first.rollups_written, second.rollups_used) == (1, 1)
    # The rollups query, which of the days without one hold rows (one query for all 30 of them) and
    # the build's read of its day; then the rollups and that one query again.
    assert (first.pages_read, second.pages_read) == (3, 2)


# ------------------------------------------------------------------ what a kill can lose (bounded)


class Ticks:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def held(agg: Aggregates) -> int:
    """Counts only in this process's memory: what a kill now would lose."""
    return sum(sum(c.values()) for c, _, _ in agg._buffer.values()) + sum(sum(b.counts.values()) for b in agg._pending)


def test_a_long_outage_keeps_only_the_last_buffer_seconds_of_counts_and_loses_or_writes_each_once(azurite, storage):
    """Storage unreachable for 3 minutes while one count a second comes in, a flush every 5 s:
    memory never holds more than AGGREGATES_MAX_BUFFER_SECONDS (60) of counts, which is all a
    kill could lose; older ones are given up (counted), and once storage is back exactly the held
    ones are written: given up + written = recorded."""
    name = f"{storage.table_prefix}agg"
    ticks = Ticks()

    async def main(conn: str, proxy: FaultProxy) -> tuple[Aggregates, int, int]:
        async with table(conn, name, retry_total=0) as t:
            agg = Aggregates(t, flush_seconds=0, flush_deadline=10, max_buffer_seconds=60, monotonic=ticks)
            agg.outcome(T0, "news@contoso.com", "orders", "sent", internal=0)
            await agg.flush()                            # the table exists: the outage is all that fails
            proxy.down()
            most = 0
            for second in range(1, 181):
                ticks.now += 1
                agg.outcome(T0 + second, "news@contoso.com", "orders", "sent")
                if second % 5 == 0:
                    await agg.flush()                    # never raises
                most = max(most, held(agg))
                oldest = min([s for _, _, s in agg._buffer.values()] + [b.since for b in agg._pending])
                assert ticks.now - oldest <= 60, second
            at_kill = held(agg)
            proxy.up()
            await agg.flush()
            assert not agg._pending and not agg._buffer
            return agg, most, at_kill

    with FaultProxy(azurite.table_port) as proxy:
        agg, most, at_kill = asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port), proxy))
    assert most <= 60 and at_kill >= 45            # the bound, and a failed count is retried a while first
    written = totals(asyncio.run(read_all(storage.connection_string, name)))["requests.sent"] - 1
    assert written == at_kill and agg.stats.dropped + written == 180


def test_a_flush_against_unreachable_storage_ends_at_its_deadline_and_keeps_its_counts(azurite, storage):
    """Storage that takes requests and never answers (the SDK waits out its timeouts and retries:
    minutes): a flush still ends at its deadline, so the buffer keeps being flushed, and nothing it
    held is lost or added twice once storage answers again."""
    name = f"{storage.table_prefix}agg"

    async def main(conn: str, proxy: FaultProxy) -> tuple[Aggregates, float]:
        async with table(conn, name) as t:               # default retry policy
            agg = Aggregates(t, flush_seconds=0, flush_deadline=30)
            agg.outcome(T0, "news@contoso.com", "orders", "sent", internal=1)
            await agg.flush()                            # creates the table and the row
            assert not agg._pending and agg.stats.timeouts == 0
            agg.flush_deadline = 1.0
            proxy.stall()                                # requests read, never answered
            agg.outcome(T0, "news@contoso.com", "orders", "refused")
            agg.outcome(T0, "news@contoso.com", "other-cat", "dead")
            started = time.monotonic()
            await asyncio.wait_for(agg.flush(), 20)
            took = time.monotonic() - started
            assert agg.stats.timeouts == 1 and len(agg._pending) == 2
            proxy.up()
            agg.flush_deadline = 30
            await agg.flush()
            assert not agg._pending
            return agg, took

    with FaultProxy(azurite.table_port) as proxy:
        _, took = asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port), proxy))
    assert took < 5
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 1, "recipients.internal": 1, "requests.refused": 1, "requests.dead": 1}


# ------------------------------------------------------------------ producers' categories (bounded)


def test_thousands_of_distinct_categories_cost_a_bounded_flush_and_report_with_exact_totals(azurite, storage):
    """Two processes count 2,000 requests each, every one with its own category: each flush writes
    at most AGGREGATES_MAX_CATEGORIES + 1 rows (the rest under `other`), and the report (the real
    builder, as `tools.ledger report` and GET /api/report run it) shows at most that many series
    per hour and account, with every request in its totals."""
    from shared.settings import Settings
    from tools.ledger import report

    name = f"{storage.table_prefix}agg"
    now = time.time()
    at = now - 3600

    async def one_process(conn: str, proxy: FaultProxy, prefix: str) -> tuple[Aggregates, int]:
        async with table(conn, name, retry_total=0) as t:
            agg = Aggregates(t, flush_seconds=0, max_categories=50, flush_deadline=None)   # any machine load
            for i in range(2000):
                agg.outcome(at, "news@contoso.com", f"{prefix}-{i:04d}", "sent", external=1)
            agg.deferral(at, "news@contoso.com", "")
            before = proxy.requests
            await agg.flush()
            assert not agg._pending
            return agg, proxy.requests - before

    with FaultProxy(azurite.table_port) as proxy:
        conn = connection_string(azurite.blob_port, azurite.queue_port, proxy.port)
        first, first_requests = asyncio.run(one_process(conn, proxy, "a"))
        second, second_requests = asyncio.run(one_process(conn, proxy, "b"))
    # 52 rows (50 categories, `other`, none): a read and a write each, and the table's creation.
    assert first_requests <= 2 * 52 + 1 and second_requests <= 2 * 52 + 1, (first_requests, second_requests)
    assert first.stats.folded == second.stats.folded == 1950 * 2      # requests.sent + recipients.external

    settings = Settings.from_env(storage.env(HVE_ACCOUNTS="news@contoso.com", AGGREGATES_TABLE=name,
                                             RECIPIENT_HASH_KEY="k"))
    doc = asyncio.run(report(settings, datetime.fromtimestamp(at - 3600, timezone.utc),
                             datetime.fromtimestamp(now + 3600, timezone.utc), "hour"))
    assert len(doc["series"]) == 52, len(doc["series"])               # 50 busiest, `other`, none
    assert sum(1 for r in doc["series"] if r["category"] == "other") == 1
    assert doc["totals"]["requests"]["sent"] == 4000 and doc["totals"]["recipients"]["external"] == 4000
    assert doc["totals"]["deferrals"] == 2
    # In the table: each process's 50 and its `other` (100 + 1 + none), not 4,000 rows.
    stored = {b.category for b in asyncio.run(read_all(storage.connection_string, name, at - 3600, now + 3600))}
    assert len(stored) == 102 and "other" in stored


def test_the_report_folds_all_but_the_busiest_categories_into_other_and_keeps_the_totals():
    from shared.reporting.rows import Bucket, fold_categories

    buckets = [Bucket(3600, "a", f"c{i}", Counter({"requests.sent": i, "codes.451 4.7.0": 1}), {"451 4.7.0": 3600.0 + i})
               for i in range(1, 6)]
    buckets += [Bucket(3600, "a", "", Counter({"requests.dead": 1})),
                Bucket(3600, "a", "other", Counter({"requests.sent": 1})),
                Bucket(7200, "b", "c1", Counter({"deferrals": 2}))]
    folded = fold_categories(buckets, 2)
    assert [(b.start, b.account, b.category) for b in folded] == [
        (3600, "a", ""), (3600, "a", "c4"), (3600, "a", "c5"), (3600, "a", "other"), (7200, "b", "other")]
    other = folded[3]
    assert other.counts == Counter({"requests.sent": 1 + 1 + 2 + 3, "codes.451 4.7.0": 3})
    assert other.last_seen == {"451 4.7.0": 3603.0}
    assert totals(folded) == totals(buckets)
    assert fold_categories(buckets, 0) == buckets


# ------------------------------------------------------------------ a day's rows in one transaction

# The clock at 00:30 on the day after T0's, counts at 23:00 before and 00:15 after midnight, and a
# rollup wait long enough that neither day needs a stale mark: the rows this process holds go in
# their day's entity-group transaction.
LATER = T0 + 2.5 * 3600
HOUR_BEFORE = T0 + 3600
HOUR_AFTER = T0 + 2.25 * 3600


def day_aggregates(t: TableClient, **kwargs) -> Aggregates:
    return Aggregates(t, flush_seconds=0, flush_deadline=None, rollup_after_seconds=86400, clock=lambda: LATER,
                      **kwargs)


def count_rows(agg: Aggregates, accounts: int, categories: int, at: float = HOUR_BEFORE) -> None:
    for a in range(accounts):
        for c in range(categories):
            agg.outcome(at, f"news{a}@contoso.com", f"cat{c}", "sent", internal=1)


def test_a_flush_of_rows_the_process_holds_is_one_table_request_per_day(azurite, storage):
    """Three accounts x two categories in the hour before midnight, two accounts in the hour now
    begun: the first flush reads (or creates) each row of the earlier hour and creates the new
    hour's rows in one transaction; every flush after it replaces the rows of a day in one
    entity-group transaction, one request however many accounts and categories; counts exact."""
    name = f"{storage.table_prefix}agg"

    async def main(conn: str, proxy: FaultProxy) -> tuple[Aggregates, list[int]]:
        async with table(conn, name, retry_total=0) as t:
            agg = day_aggregates(t)
            requests = []
            for _ in range(3):
                count_rows(agg, 3, 2)
                count_rows(agg, 2, 1, at=HOUR_AFTER)              # the next day
                before = proxy.requests
                await agg.flush()
                requests.append(proxy.requests - before)
                assert not agg._pending
            return agg, requests

    with FaultProxy(azurite.table_port) as proxy:
        agg, requests = asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port), proxy))
    # First flush: the table's creation, a read and a creation per row of the earlier hour (6),
    # one transaction creating the two rows of the hour now begun.
    assert requests == [1 + 2 * 6 + 1, 2, 2], requests
    assert agg.stats.transactions == 5 and agg.stats.transactions_refused == 0
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 3 * 8, "recipients.internal": 3 * 8}


def test_a_day_transaction_refused_for_a_row_another_writer_changed_goes_row_by_row_and_loses_nothing(storage):
    """Another process changed one of the rows this one holds: the table refuses the whole
    transaction (its ETag), nothing of it applies; the rows are then merged one by one, the
    changed row read again, and every count of both writers is in the table once."""
    name = f"{storage.table_prefix}agg"

    async def main() -> tuple[Aggregates, Aggregates]:
        async with table(storage.connection_string, name) as t:
            first, second = day_aggregates(t), day_aggregates(t)
            count_rows(first, 3, 1)
            await first.flush()                            # creates the three rows
            second.outcome(HOUR_BEFORE, "news1@contoso.com", "cat0", "refused")
            await second.flush()                           # changes one of them
            count_rows(first, 3, 1)
            await first.flush()                            # refused as a whole, then row by row
            for _ in range(2):                             # it moved shard (a race lost): the
                count_rows(first, 3, 1)                    # new rows are made, then held again
                await first.flush()
            assert not first._pending and not second._pending
            return first, second

    first, second = asyncio.run(main())
    assert first.stats.transactions_refused == 1 and first.stats.races == 1
    assert first.stats.transactions >= 1
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 12, "recipients.internal": 12, "requests.refused": 1}


@pytest.mark.parametrize("applied", [True, False], ids=["applied-answer-lost", "not-applied"])
@pytest.mark.parametrize("op", ["update", "create"])
def test_a_day_transaction_whose_outcome_is_unknown_is_checked_at_the_next_flush_and_counted_once(
        azurite, storage, applied, op):
    """The transaction's answer is a 500 (the table applied it, or not): the flush cannot tell, so
    its rows are read again at the next flush, whose `Writes` say whether the batch landed. Counted
    once either way, never twice, never lost. `update`: rows the process holds (the earlier hour);
    `create`: rows of the hour now begun, new to it."""
    name = f"{storage.table_prefix}agg"
    faults = {"left": 0}
    at = HOUR_BEFORE if op == "update" else HOUR_AFTER

    def rule(method: str, path: str):
        if method == "POST" and path.endswith("$batch") and faults["left"] > 0:
            faults["left"] -= 1
            return Fault(500, applied=applied)
        return None

    async def main(conn: str) -> Aggregates:
        async with table(conn, name, retry_total=0) as t:
            agg = day_aggregates(t)
            if op == "update":
                count_rows(agg, 2, 2, at)
                await agg.flush()                          # creates the four rows, one by one
            count_rows(agg, 2, 2, at)
            faults["left"] = 1
            await agg.flush()                              # the transaction's answer is lost
            assert agg.stats.failures == 4 and len(agg._pending) == 4
            await agg.flush()                              # re-read: landed or not, it tells
            assert not agg._pending
            count_rows(agg, 2, 2, at)
            await agg.flush()
            return agg

    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        agg = asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port)))
        assert proxy.injected == 1
    assert agg.stats.replayed == (4 if applied else 0)
    n = 12 if op == "update" else 8
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": n, "recipients.internal": n}


def test_rows_of_the_new_hour_another_process_made_first_are_read_and_merged_once(storage):
    """Two processes count the same rows of the hour now begun: the first creates them in one
    transaction; the second's creating transaction is refused as a whole (they exist), so it reads
    and merges them one by one; then both hold them, and every count is in once."""
    name = f"{storage.table_prefix}agg"

    async def main() -> tuple[Aggregates, Aggregates]:
        async with table(storage.connection_string, name) as t:
            first, second = day_aggregates(t), day_aggregates(t)
            for agg in (first, second):
                count_rows(agg, 2, 2, HOUR_AFTER)
            await first.flush()
            await second.flush()
            return first, second

    first, second = asyncio.run(main())
    assert (first.stats.transactions, first.stats.transactions_refused) == (1, 0)
    assert (second.stats.transactions, second.stats.transactions_refused) == (0, 1)
    assert second.stats.merges == 4 and second.stats.races == 0
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 8, "recipients.internal": 8}


def test_more_rows_of_a_day_than_one_transaction_holds_go_in_parts_of_at_most_a_hundred(azurite, storage):
    name = f"{storage.table_prefix}agg"

    async def main(conn: str, proxy: FaultProxy) -> tuple[Aggregates, int]:
        async with table(conn, name, retry_total=0) as t:
            agg = day_aggregates(t, max_categories=0)
            count_rows(agg, 1, 150)
            await agg.flush()
            count_rows(agg, 1, 150)
            before = proxy.requests
            await agg.flush()
            return agg, proxy.requests - before

    with FaultProxy(azurite.table_port) as proxy:
        agg, requests = asyncio.run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port), proxy))
    assert requests == 2 and agg.stats.transactions == 2
    assert totals(asyncio.run(read_all(storage.connection_string, name))) == {
        "requests.sent": 300, "recipients.internal": 300}
