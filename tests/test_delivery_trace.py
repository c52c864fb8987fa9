"""Delivery confirmation end to end: mail sent through the real send stage to the HVE emulator, the
Graph stand-in's message trace fed from what the emulator accepted (over real HTTP), and the
reconciliation's state in Azurite. Time is a fake clock shared by the reconciliation and the
stand-in, so "later" costs nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest

from shared.delivery.trace import DeliveryDelta, DeliveryStore, Reconciler, reconcile, request_digest
from shared.graph import GraphClient, StaticToken
from shared.ledger import recipient_hash
from shared.send.mime import message_id
from shared.send.stage import Relay
from shared.storage import StorageClients
from tests.fixtures_graph import graph_env, graph_standin  # noqa: F401  (fixture)
from tests.relay_harness import drain, enqueue, relay_settings
from tools import delivery as delivery_cli
from tools import ledger as ledger_cli

KEY = b"test-hash-key"


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc)

    def __call__(self) -> float:
        return self.now.timestamp()

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def run(coro):
    return asyncio.run(coro)


def settings_for(storage, emulator, standin, **more):
    return relay_settings(storage, emulator, **{**graph_env(standin), "DELIVERY_TABLE": f"{storage.table_prefix}dlv",
                                                "DELIVERY_TRACE_END_LAG": "PT0S", **more})


async def send(settings, *requests):
    relay = await Relay.create(settings)
    try:
        for doc in requests:
            await enqueue(relay, doc)
        return await drain(relay)
    finally:
        await relay.close()


class Harness:
    """One reconciliation per call, against the stand-in and Azurite, on the shared clock."""

    def __init__(self, settings, standin, clock: Clock) -> None:
        self.settings, self.standin, self.clock = settings, standin, clock
        clock.now = max(clock.now, datetime.now(timezone.utc) + timedelta(seconds=2))   # after the mail was sent
        standin.clock = lambda: clock.now
        self.deltas: list[DeliveryDelta] = []

    async def _record(self, delta: DeliveryDelta) -> None:
        self.deltas.append(delta)

    instruments = None

    def once(self, **kwargs):
        async def main():
            storage = StorageClients(self.settings)
            graph = GraphClient(self.settings.graph_base_url, StaticToken(self.standin.token), max_attempts=1)
            try:
                reconciler = Reconciler(self.settings, graph, DeliveryStore(await storage.table(self.settings.delivery_table), self.settings.recipient_hash_key),
                                        await storage.table(self.settings.ledger_table),
                                        await storage.table(self.settings.recipient_index_table), on_delta=self._record,
                                        clock=self.clock, instruments=self.instruments)
                return await reconciler.run(**kwargs)
            finally:
                await graph.close()
                await storage.close()
        return run(main())

    def summary(self, request_id):
        return run(self._store(lambda s: s.summary(request_id)))

    def recipients(self, request_id):
        return run(self._store(lambda s: s.recipients(request_id)))

    def all_rows(self):
        async def rows(store):
            return [dict(r) async for r in store.table.list_entities()]
        return run(self._store(rows))

    async def _store(self, fn):
        storage = StorageClients(self.settings)
        try:
            return await fn(DeliveryStore(await storage.table(self.settings.delivery_table), self.settings.recipient_hash_key))
        finally:
            await storage.close()


def mail(request_id, to, **extra):
    return {"id": request_id, "to": to, "subject": "Update", "text": "Hello", **extra}


@pytest.fixture
def clock():
    return Clock()


def test_statuses_are_matched_per_request_and_per_chunk(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin, HVE_LIMITS='{"recipients_per_message": 2}')
    run(send(settings, mail("chunked", ["a1@contoso.com", "a2@contoso.com", "a3@contoso.com", "a4@contoso.com",
                                        "a5@contoso.com"]),
             mail("single", ["b1@contoso.com", "b2@contoso.com"])))
    graph_standin.set_outcome("a2@contoso.com", "failed")
    graph_standin.set_outcome("a5@contoso.com", "quarantined")
    graph_standin.set_outcome("b2@contoso.com", "filteredAsSpam")
    assert graph_standin.feed_from(emulator) == 4   # three chunks and one single message
    h = Harness(settings, graph_standin, clock)
    tally = h.once()
    assert tally.matched == 7 and tally.unmatched == 0 and not tally.stopped
    chunked = h.summary("chunked")
    assert chunked["delivery"] == {"delivered": 3, "failed": 1, "quarantined": 1}
    # Chunk 0 holds a1, a2; chunk 1 a3, a4; chunk 2 a5: the `.N` Message-ID suffix told them apart.
    assert chunked["chunks"] == {"0": {"delivered": 1, "failed": 1}, "1": {"delivered": 2}, "2": {"quarantined": 1}}
    assert h.summary("single")["delivery"] == {"delivered": 1, "filteredAsSpam": 1}
    by_hash = {r["recipient"]: r for r in h.recipients("chunked")}
    failed = by_hash[recipient_hash(KEY, "a2@contoso.com")]
    assert failed["status"] == "failed" and failed["chunk"] == 0
    # The reason came from getDetailsByRecipient, the address in it masked.
    assert "RecipientNotFound" in failed["reason"] and "***@contoso.com" in failed["reason"]
    assert "a2@" not in failed["reason"]
    assert by_hash[recipient_hash(KEY, "a5@contoso.com")]["chunk"] == 2
    # Chunks may go out through different accounts (read in different queries): deltas add up.
    summed: dict[str, Counter] = {}
    for d in h.deltas:
        summed.setdefault(d.request_id, Counter()).update(d.changes)
    assert summed == {"chunked": {"delivered": 3, "failed": 1, "quarantined": 1}, "single": {"delivered": 1, "filteredAsSpam": 1}}
    assert all(d.account in settings.accounts and d.category == "" for d in h.deltas)


def test_a_pending_recipient_becomes_delivered_on_a_later_run_with_an_exact_delta(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("slow", ["slow@contoso.com", "fast@contoso.com"], category="news")))
    graph_standin.set_outcome("slow@contoso.com", [["pending", 0], ["delivered", 600]])
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    h.once()
    assert h.summary("slow")["delivery"] == {"delivered": 1, "pending": 1}
    assert h.summary("slow")["open"] is True
    clock.advance(minutes=5)
    h.once()   # same rows again: nothing changes, no delta
    assert len(h.deltas) == 1
    clock.advance(minutes=6)
    h.once()
    assert h.summary("slow")["delivery"] == {"delivered": 2}
    assert h.summary("slow")["open"] is False
    assert [d.changes for d in h.deltas] == [{"delivered": 1, "pending": 1}, {"delivered": 1, "pending": -1}]
    assert [d.seq for d in h.deltas] == [1, 2] and h.deltas[1].category == "news"
    h.once()
    assert len(h.deltas) == 2


def test_a_pending_recipient_older_than_the_overlap_is_still_rechecked(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin, DELIVERY_TRACE_OVERLAP="PT10M")
    run(send(settings, mail("stuck", ["stuck@contoso.com"])))
    graph_standin.set_outcome("stuck@contoso.com", [["pending", 0], ["delivered", 10000]])
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    h.once()
    for _ in range(3):   # well past the overlap: only the recheck window still covers the row
        clock.advance(minutes=45)
        h.once()
    assert h.summary("stuck")["delivery"] == {"pending": 1}
    clock.advance(minutes=45)
    h.once()
    assert h.summary("stuck")["delivery"] == {"delivered": 1}
    clock.advance(minutes=45)
    h.once()
    # Nothing open any more: each account reads from its previous run's end minus the overlap only,
    # no longer from the message's send time hours ago.
    for request in graph_standin.trace_requests[-3:]:
        start = datetime.fromisoformat(request.query["$filter"].split("ge ")[1].split(" ")[0].replace("Z", "+00:00"))
        assert clock.now - start <= timedelta(minutes=45 + 10, seconds=1)


def test_a_row_that_shows_up_late_is_matched_through_the_overlap(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin, DELIVERY_TRACE_OVERLAP="PT15M")
    run(send(settings, mail("late", ["late@contoso.com"])))
    h = Harness(settings, graph_standin, clock)
    h.once()                                   # trace has no row yet
    assert h.summary("late") is None
    clock.advance(minutes=8)
    h.once()                                   # the watermark moves past the message's time
    graph_standin.feed_from(emulator)          # ...and only now does its row appear, 8 minutes late
    clock.advance(minutes=2)
    h.once()
    assert h.summary("late")["delivery"] == {"delivered": 1}


def test_a_run_stopped_by_429_resumes_on_the_next_run_without_gaps(storage, emulator, graph_standin, clock):
    # One account, one span holding every message, one row per page: Graph's limit hits mid-span.
    # No overlap: only the cursor can bring the unfinished span back.
    settings = settings_for(storage, emulator, graph_standin, HVE_ACCOUNTS="news@contoso.com", DELIVERY_TRACE_PAGE_SIZE="1",
                            DELIVERY_TRACE_SPAN="P1D", DELIVERY_TRACE_MAX_AGE="PT12H", DELIVERY_TRACE_OVERLAP="PT0S")
    run(send(settings, *[mail(f"r{i}", [f"u{i}@contoso.com"]) for i in range(7)]))
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    graph_standin.trace_budget = 4            # Graph's tenant limit, mostly spent by "another tool"
    graph_standin.trace_window = 3600
    first = h.once()
    assert first.stopped.startswith("throttled") and first.requests == 5
    again = h.once()                          # Retry-After (3600 s) not over: no request at all
    assert again.requests == 0 and again.stopped.startswith("throttled")
    graph_standin.trace_budget = 100
    clock.advance(hours=1, minutes=1)         # past Retry-After (fake clock)
    second = h.once()
    assert not second.stopped and second.matched == 7
    assert all(h.summary(f"r{i}")["delivery"] == {"delivered": 1} for i in range(7))
    assert sum(sum(d.changes.values()) for d in h.deltas) == 7      # each recipient counted once
    assert [r.status for r in graph_standin.trace_requests].count(429) == 1


def test_the_budget_stops_a_run_cleanly_and_the_next_continues(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin, DELIVERY_TRACE_PAGE_SIZE="2",
                            DELIVERY_TRACE_REQUESTS_PER_5MIN="4", DELIVERY_TRACE_SPAN="P1D")
    run(send(settings, *[mail(f"q{i}", [f"v{i}@contoso.com"]) for i in range(5)]))
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    runs = 0
    while True:
        tally = h.once()
        runs += 1
        assert tally.requests <= 4
        clock.advance(minutes=5, seconds=1)
        if not tally.stopped or runs > 40:
            break
    assert not tally.stopped
    assert all(h.summary(f"q{i}")["delivery"] == {"delivered": 1} for i in range(5))
    assert graph_standin.trace_requests and all(r.status == 200 for r in graph_standin.trace_requests)


def test_the_budget_cannot_keep_the_last_configured_account_from_ever_finishing(storage, emulator, graph_standin, clock):
    # The settings of the test above, with all five messages sent by the last configured account:
    # 3 pages of its window, and each other account's window costs 1 of the 4 requests a run. Read
    # in configuration order, that account was cut short every run, from the same window start
    # (so the messages never left its window): 41 runs all stopped by the budget, then a 429 when
    # the stand-in counted real time. Cut short, an account goes first next run, and finishes.
    settings = settings_for(storage, emulator, graph_standin, DELIVERY_TRACE_PAGE_SIZE="2",
                            DELIVERY_TRACE_REQUESTS_PER_5MIN="4", DELIVERY_TRACE_SPAN="P1D")
    last = settings.accounts[-1]
    run(send(settings_for(storage, emulator, graph_standin, HVE_ACCOUNTS=last),
             *[mail(f"w{i}", [f"w{i}@contoso.com"]) for i in range(5)]))
    graph_standin.feed_from(emulator)
    assert {r["senderAddress"] for r in graph_standin.trace_rows()} == {last}
    h = Harness(settings, graph_standin, clock)
    runs = []
    while not runs or runs[-1].stopped and len(runs) <= 40:
        runs.append(h.once())
        assert runs[-1].requests <= 4
        clock.advance(minutes=5, seconds=1)
    assert not runs[-1].stopped and len(runs) <= 10, [t.stopped for t in runs]
    assert all(h.summary(f"w{i}")["delivery"] == {"delivered": 1} for i in range(5))


def test_unmatched_rows_are_counted_and_ignored(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("ours", ["ours@contoso.com"])))
    graph_standin.feed_from(emulator)
    sender = settings.accounts[0]
    graph_standin.add_trace(sender, ["x@contoso.com", "y@contoso.com"], "<not-ours-123@contoso.com>")
    # Our Message-ID shape, but no request of ours has that id.
    graph_standin.add_trace(sender, ["z@contoso.com"], message_id("never-sent", "contoso.com", key=b"test-hash-key"))
    h = Harness(settings, graph_standin, clock)
    tally = h.once()
    assert (tally.matched, tally.unmatched) == (1, 3)
    assert len(h.deltas) == 1
    rows = h.all_rows()
    assert {r["RequestId"] for r in rows if r["RowKey"] == "summary"} == {"ours"}
    assert {r["PartitionKey"] for r in rows if not r["PartitionKey"].startswith("~")} == {request_digest("ours", b"test-hash-key")}


def test_a_filter_graph_would_refuse_is_never_sent(storage, emulator, graph_standin, clock):
    # A maximum age near Graph's 90 days and a first run: the planner still asks only what Graph takes.
    settings = settings_for(storage, emulator, graph_standin, DELIVERY_TRACE_MAX_AGE="P89DT23H", DELIVERY_TRACE_SPAN="P10D",
                            DELIVERY_TRACE_END_LAG="PT1M")
    h = Harness(settings, graph_standin, clock)
    tally = h.once()
    assert not tally.stopped and tally.requests == 9 * len(settings.accounts)
    assert graph_standin.trace_requests and all(r.status == 200 for r in graph_standin.trace_requests)
    # The stand-in does refuse what Graph refuses (so the line above means something).
    raw = GraphClient(graph_standin.base_url, StaticToken(graph_standin.token), max_attempts=1)
    now = clock.now
    bad = [f"senderAddress eq 'news@contoso.com' and receivedDateTime ge {(now - timedelta(days=1)):%Y-%m-%dT%H:%M:%SZ}",
           f"receivedDateTime ge {(now - timedelta(days=11)):%Y-%m-%dT%H:%M:%SZ} and receivedDateTime le {now:%Y-%m-%dT%H:%M:%SZ}",
           f"receivedDateTime ge {(now - timedelta(days=91)):%Y-%m-%dT%H:%M:%SZ} and receivedDateTime le {(now - timedelta(days=85)):%Y-%m-%dT%H:%M:%SZ}",
           f"receivedDateTime ge {now:%Y-%m-%dT%H:%M:%SZ} and receivedDateTime le {(now + timedelta(hours=1)):%Y-%m-%dT%H:%M:%SZ}"]

    async def refused():
        from shared.graph import GraphError
        codes = []
        for f in bad:
            try:
                await raw.message_trace_page(raw.message_traces_url(f, 10))
                codes.append(200)
            except GraphError as exc:
                codes.append(exc.status)
        await raw.close()
        return codes
    assert run(refused()) == [400, 400, 400, 400]


def test_no_address_in_any_stored_row_or_log(storage, emulator, graph_standin, clock, caplog):
    settings = settings_for(storage, emulator, graph_standin)
    to = ["carol.secretname@contoso.com", "dave.hiddenname@contoso.com", "erin.quietname@contoso.com"]
    run(send(settings, mail("private", to)))
    graph_standin.set_outcome(to[0], "failed")
    graph_standin.set_outcome(to[1], "quarantined")
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    caplog.set_level(logging.DEBUG)
    graph_standin.fail_next(503, count=1, path="/v1.0/admin/exchange/tracing/messageTraces/")   # a detail call fails
    h.once()
    h.once()
    tally = h.once()
    assert not tally.stopped
    stored = json.dumps(h.all_rows(), default=str).lower()
    # The emulator stands in for HVE: its logs are HVE's, not ours.
    logs = "\n".join(r.getMessage() for r in caplog.records
                     if not r.name.startswith(("hve_emulator", "mail.log"))).lower()
    for address in to:
        local = address.split("@")[0]
        assert local not in stored and local not in logs
    assert h.summary("private")["delivery"] == {"delivered": 1, "failed": 1, "quarantined": 1}
    assert sum(1 for r in h.recipients("private") if "***@contoso.com" in r["reason"]) == 2


def test_tools_delivery_once_dry_run_and_ledger_show_json(storage, emulator, graph_standin, clock, capsys, tmp_path, monkeypatch):
    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("shown", ["s1@contoso.com", "s2@contoso.com"])))
    graph_standin.set_outcome("s2@contoso.com", "failed")
    graph_standin.feed_from(emulator)
    env = {**storage.env(), **graph_env(graph_standin), "DELIVERY_TABLE": settings.delivery_table,
           "HVE_ACCOUNTS": ",".join(settings.accounts), "RECIPIENT_HASH_KEY": "test-hash-key",
           "DELIVERY_TRACE_END_LAG": "PT0S"}
    time.sleep(1.1)   # the query ends at the last whole second: let the message's second pass
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    missing = str(tmp_path / "none.json")
    assert ledger_cli.main(["show", "shown", "--json", "--settings", missing]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["delivery"] == {} and before["state"] == "sent"
    assert delivery_cli.main(["--dry-run", "--settings", missing]) == 0
    out = capsys.readouterr().out
    assert "messageTraces" in out and "senderAddress" in out and not graph_standin.trace_requests
    assert delivery_cli.main(["--once", "--settings", missing]) == 0
    out = capsys.readouterr().out
    assert "2 matched" in out and "  shown (" in out and "+1 delivered, +1 failed" in out
    assert ledger_cli.main(["show", "shown", "--json", "--settings", missing]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {k: shown[k] for k in ("id", "state", "attempts", "last_code")} == {"id": "shown", "state": "sent", "attempts": 1, "last_code": 250}
    assert shown["account"] in settings.accounts
    assert shown["delivery"] == {"delivered": 1, "failed": 1}
    assert ledger_cli.main(["show", "shown", "--settings", missing]) == 0
    text = capsys.readouterr().out
    assert "failed" in text and "s2@" not in text and "***@contoso.com" in text


def test_reconcile_entry_point_uses_the_app_settings(storage, emulator, graph_standin):
    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("entry", ["e1@contoso.com"])))
    graph_standin.feed_from(emulator)
    time.sleep(1.1)
    tally = run(reconcile(settings))
    # Only the account that sent, only around the hour it sent in (not P3D in PT6H spans per account).
    assert tally.matched == 1 and tally.requests == 1


def test_status_shows_delivery_rates_of_the_last_24_hours(storage, emulator, graph_standin, clock):
    from shared.reporting.status import render_text
    from tools import status as status_cli

    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("rated", ["r1@contoso.com", "r2@contoso.com", "r3@contoso.com", "r4@contoso.com"])))
    graph_standin.set_outcome("r4@contoso.com", "quarantined")
    graph_standin.feed_from(emulator)
    before = run(status_cli.report(settings))
    assert before["delivery_24h"]["rates"]["traced"] == 0
    time.sleep(1.1)   # the query ends at the last whole second
    run(reconcile(settings))   # the app's run: its deltas reach the aggregates the status reads
    report = run(status_cli.report(settings))
    assert report["delivery_24h"]["counts"] == {"delivered": 3, "quarantined": 1}
    assert report["delivery_24h"]["rates"]["delivered"] == 0.75
    assert "delivered 75.0%" in render_text(report) and "quarantined 25.0%" in render_text(report)


def test_retention_deletes_old_delivery_rows_and_keeps_recent_ones(storage):
    from shared.ledger import Ledger
    from shared.retention import purge_expired
    from shared.settings import Settings

    settings = Settings.from_env(storage.env(DELIVERY_TABLE=f"{storage.table_prefix}dlv"))
    now = datetime.now(timezone.utc)

    async def main():
        clients = StorageClients(settings)
        try:
            table = await clients.table(settings.delivery_table)
            for pk, rk, age in [("old", "summary", 100), ("old", "r-abc", 100), ("new", "summary", 1), ("new", "r-def", 1)]:
                # (partitions are Message-ID digests in real rows; retention only looks at Updated)
                await table.upsert_entity({"PartitionKey": pk, "RowKey": rk, "Updated": now - timedelta(days=age)})
            ledger_table = await clients.table(settings.ledger_table)
            index = await clients.table(settings.recipient_index_table)
            report = await purge_expired(ledger=Ledger(ledger_table, index, b"k"), ledger_table=ledger_table,
                                         index_table=index, welcome_table=None, now=now, retention=timedelta(days=90),
                                         lost_after=timedelta(hours=24), max_rows=100, delivery_table=table)
            left = sorted([(r["PartitionKey"], r["RowKey"]) async for r in table.list_entities()])
            return report, left
        finally:
            await clients.close()

    report, left = run(main())
    assert report.deleted["delivery"] == 2 and left == [("new", "r-def"), ("new", "summary")]


def test_two_runs_at_once_never_count_a_recipient_twice(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin, DELIVERY_TRACE_REQUESTS_PER_5MIN="1000")
    run(send(settings, *[mail(f"c{i}", [f"c{i}a@contoso.com", f"c{i}b@contoso.com"]) for i in range(12)]))
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)

    async def both():
        # Two reconciliations (say the timer and a manual --once), each with its own clients.
        return await asyncio.gather(asyncio.to_thread(h.once), asyncio.to_thread(h.once))

    run(both())
    summed: dict[str, Counter] = {}
    for d in h.deltas:
        summed.setdefault(d.request_id, Counter()).update(d.changes)
    assert summed == {f"c{i}": {"delivered": 2} for i in range(12)}
    assert all(h.summary(f"c{i}")["delivery"] == {"delivered": 2} for i in range(12))


def test_status_changes_reach_the_aggregates_once_and_the_ledger_report_shows_them(storage, emulator, graph_standin, clock, capsys, monkeypatch, tmp_path):
    """The timer's entry point feeds every status change to the hourly aggregates (what
    GET /api/report, the dashboard and `tools.ledger report` read); a second run that re-reads
    the same trace rows adds nothing, and pending -> delivered moves one count."""
    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("rep-1", ["p1@contoso.com", "p2@contoso.com", "p4@contoso.com"], category="orders"),
             mail("rep-2", ["p3@contoso.com"], category="alerts")))
    graph_standin.set_outcome("p2@contoso.com", "filteredAsSpam")
    graph_standin.set_outcome("p3@contoso.com", "failed")
    graph_standin.set_outcome("p4@contoso.com", [["pending", 0], ["delivered", 600]])
    graph_standin.feed_from(emulator)
    Harness(settings, graph_standin, clock)   # the stand-in on the shared clock

    def reconcile_now():
        async def main():
            graph = GraphClient(settings.graph_base_url, StaticToken(graph_standin.token), max_attempts=1)
            try:
                return await reconcile(settings, graph=graph, clock=clock)
            finally:
                await graph.close()
        return run(main())

    for name, value in {**storage.env(), "DELIVERY_TABLE": settings.delivery_table, "RECIPIENT_HASH_KEY": "test-hash-key",
                        "HVE_ACCOUNTS": ",".join(settings.accounts)}.items():
        monkeypatch.setenv(name, value)

    def report_by_category():
        assert ledger_cli.main(["report", "--json", "--settings", str(tmp_path / "none.json")]) == 0
        doc = json.loads(capsys.readouterr().out)
        by_category: dict[str, Counter] = {}
        for row in doc["series"]:
            by_category.setdefault(row["category"], Counter()).update(row["delivery"])
        return {c: {k: v for k, v in counts.items() if v} for c, counts in by_category.items()}

    assert reconcile_now().matched == 4
    first = report_by_category()
    assert first == {"orders": {"delivered": 1, "filteredAsSpam": 1, "pending": 1}, "alerts": {"failed": 1}}
    assert reconcile_now().matched == 4      # the same rows again: no change, nothing added
    assert report_by_category() == first
    clock.now += timedelta(minutes=11)       # p4's trace row turns delivered
    reconcile_now()
    assert report_by_category() == {"orders": {"delivered": 2, "filteredAsSpam": 1}, "alerts": {"failed": 1}}
    assert ledger_cli.main(["report", "--settings", str(tmp_path / "none.json")]) == 0
    assert "deliv" in capsys.readouterr().out


def test_the_timer_does_nothing_unless_enabled_and_reads_trace_when_enabled(storage, emulator, graph_standin, monkeypatch):
    from shared.delivery.trace import handle_timer

    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("timed", ["t1@contoso.com"])))
    graph_standin.feed_from(emulator)
    env = {**storage.env(), **graph_env(graph_standin), "DELIVERY_TABLE": settings.delivery_table,
           "HVE_ACCOUNTS": ",".join(settings.accounts), "RECIPIENT_HASH_KEY": "test-hash-key", "DELIVERY_TRACE_END_LAG": "PT0S"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert run(handle_timer()) is None and not graph_standin.trace_requests
    monkeypatch.setenv("DELIVERY_TRACE_ENABLED", "true")
    time.sleep(1.1)
    tally = run(handle_timer())
    assert tally is not None and tally.matched == 1 and graph_standin.trace_requests


def test_function_app_declares_the_confirm_delivery_timer():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_delivery_function_app", Path(__file__).parents[1] / "function_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    [fn] = [f for f in module.app.get_functions() if f.get_function_name() == "confirm_delivery"]
    [trigger] = [b for b in fn.get_bindings() if b.type == "timerTrigger"]
    assert trigger.schedule == "%DELIVERY_TRACE_SCHEDULE%"
    assert "DELIVERY_TRACE_ENABLED" in (fn.get_user_function().__doc__ or "")


def test_the_delivery_bench_runs_end_to_end():
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "bench.delivery", "--messages", "20"],
                          cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "run 2 changed 0" in done.stdout and "x fewer" in done.stdout


def test_the_status_endpoint_adds_delivery_rates_when_trace_is_on(storage, emulator, graph_standin, clock, monkeypatch):
    from shared.wiring import close_relays, status_json

    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("api", ["api1@contoso.com", "api2@contoso.com"])))
    graph_standin.set_outcome("api2@contoso.com", "failed")
    graph_standin.feed_from(emulator)
    time.sleep(1.1)   # the query ends at the last whole second
    run(reconcile(settings))   # the app's run: its deltas reach the aggregates the status reads
    env = {**storage.env(), "HVE_SMTP_HOST": "127.0.0.1", "HVE_SMTP_PORT": str(emulator.port),
           "HVE_SMTP_CA_FILE": str(emulator.ca_file), "HVE_ACCOUNTS": ",".join(settings.accounts),
           "HVE_PASSWORDS": json.dumps(dict(settings.local_passwords)), "RECIPIENT_HASH_KEY": "test-hash-key",
           "DELIVERY_TABLE": settings.delivery_table}

    async def status(enabled: str):
        monkeypatch.setenv("DELIVERY_TRACE_ENABLED", enabled)
        try:
            return json.loads(await status_json())
        finally:
            await close_relays()

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert "delivery_24h" not in run(status("false"))
    shown = run(status("true"))["delivery_24h"]
    assert shown["counts"] == {"delivered": 1, "failed": 1} and shown["rates"]["failed"] == 0.5


def test_a_retry_after_given_for_one_account_holds_for_every_account(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin)
    graph_standin.fail_next(429, count=1, retry_after=120, path="/v1.0/admin/exchange/tracing/messageTraces")
    h = Harness(settings, graph_standin, clock)
    first = h.once()
    assert first.stopped.startswith("throttled") and first.requests == 1
    clock.advance(seconds=60)
    assert h.once().requests == 0          # Graph's limit is the tenant's, not one account's
    clock.advance(seconds=61)
    assert not h.once().stopped


def test_recalled_is_read_because_the_client_asks_for_unknown_enum_members(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin)
    run(send(settings, mail("recall", ["gone@contoso.com"])))
    graph_standin.set_outcome("gone@contoso.com", "recalled")
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    h.once()
    assert h.summary("recall")["delivery"] == {"recalled": 1}

    async def without_prefer():
        client = GraphClient(graph_standin.base_url, StaticToken(graph_standin.token), max_attempts=1)
        try:
            return await client.get_json(graph_standin.base_url + "/v1.0/admin/exchange/tracing/messageTraces")
        finally:
            await client.close()
    assert [r["status"] for r in run(without_prefer())["value"]] == ["unknownFutureValue"]


def test_the_delivery_counter_counts_recipients_reaching_each_status_by_account(storage, emulator, graph_standin, clock):
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from shared.telemetry import Instruments

    reader = InMemoryMetricReader()
    settings = settings_for(storage, emulator, graph_standin, HVE_ACCOUNTS="news@contoso.com")
    run(send(settings, mail("m1", ["k1@contoso.com", "k2@contoso.com"])))
    graph_standin.set_outcome("k2@contoso.com", [["pending", 0], ["delivered", 300]])
    graph_standin.feed_from(emulator)
    h = Harness(settings, graph_standin, clock)
    h.instruments = Instruments(meter_provider=MeterProvider(metric_readers=[reader]))
    h.once()
    clock.advance(minutes=6)
    h.once()
    h.once()
    points = {}
    runs = {}
    for metric in reader.get_metrics_data().resource_metrics[0].scope_metrics[0].metrics:
        for point in metric.data.data_points:
            if metric.name == "hve_relay.delivery_trace.runs":  # the alert's signal: runs that finished
                runs[point.attributes["result"]] = point.value
                continue
            points[(metric.name, point.attributes["status"], point.attributes["account"])] = point.value
    assert points == {("hve_relay.delivery", "delivered", "news@contoso.com"): 2,
                      ("hve_relay.delivery", "pending", "news@contoso.com"): 1}
    assert sum(runs.values()) == 3


_KILLED_AFTER_FIRST_WINDOW = r"""
import asyncio, json, os, sys
from shared.delivery import trace as delivery
from shared.graph import GraphClient, StaticToken
from shared.settings import Settings

env, token, now = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
apply, read = delivery.Reconciler._apply, delivery.Reconciler._read_span

async def _apply(self, pending, tally):
    await apply(self, pending, tally)
    self.moved = getattr(self, "moved", False) or tally.changed_requests > 0

async def _read_span(self, *args, **kwargs):
    if getattr(self, "moved", False):   # the window with the rows is done (its cursor saved): SIGKILL-like
        print("killed", flush=True)
        os._exit(9)
    return await read(self, *args, **kwargs)

delivery.Reconciler._apply, delivery.Reconciler._read_span = _apply, _read_span
settings = Settings.from_env(env)

async def main():
    graph = GraphClient(settings.graph_base_url, StaticToken(token), max_attempts=1)
    try:
        await delivery.reconcile(settings, graph=graph, clock=lambda: now)
    finally:
        await graph.close()

asyncio.run(main())
print("finished", flush=True)
"""


def test_a_trace_run_killed_after_a_window_has_written_that_windows_deltas_to_the_aggregates(
        storage, emulator, graph_standin, clock):
    """The timer's run dies (SIGKILL, a host recycled) right after the window holding the rows:
    its cursor moved past them, so the next run re-reads them as already counted (no delta). Only
    deltas written before the cursor moved survive: the aggregates must hold every delivered
    recipient once."""
    import subprocess
    import sys

    from shared.reporting.aggregates import Aggregates
    from tests.fixtures_graph import graph_env
    from tests.relay_harness import ACCOUNTS

    env = storage.env(HVE_SMTP_HOST="127.0.0.1", HVE_SMTP_PORT=str(emulator.port), HVE_SMTP_CA_FILE=str(emulator.ca_file),
                      HVE_ACCOUNTS="news@contoso.com,alerts@contoso.com", HVE_PASSWORDS=json.dumps(ACCOUNTS),
                      HVE_INTERNAL_DOMAINS="contoso.com", RECIPIENT_HASH_KEY="test-hash-key",
                      DELIVERY_TABLE=f"{storage.table_prefix}dlv", DELIVERY_TRACE_END_LAG="PT0S",
                      DELIVERY_TRACE_SPAN="PT5M", DELIVERY_TRACE_REQUESTS_PER_5MIN="1000", **graph_env(graph_standin))
    settings = relay_settings(storage, emulator, **{k: v for k, v in env.items()
                                                    if k.startswith(("DELIVERY", "GRAPH", "HVE_ACCOUNTS"))})
    # One account's window, then the other's: the run is killed between the two.
    run(send(settings, *[mail(f"kill-{i}", [f"k{i}a@contoso.com", f"k{i}b@contoso.com"], category="orders",
                              account=("news@contoso.com", "alerts@contoso.com")[i % 2]) for i in range(3)]))
    graph_standin.feed_from(emulator)
    Harness(settings, graph_standin, clock)
    clock.advance(minutes=30)          # windows after the one with the rows are still to read

    first = subprocess.run([sys.executable, "-c", _KILLED_AFTER_FIRST_WINDOW, json.dumps(env), graph_standin.token,
                            str(clock())], capture_output=True, text=True, timeout=120)
    assert first.stdout.strip() == "killed", (first.stdout, first.stderr[-3000:])

    async def again_then_read():
        graph = GraphClient(settings.graph_base_url, StaticToken(graph_standin.token), max_attempts=1)
        try:
            tally = await reconcile(settings, graph=graph, clock=clock)
        finally:
            await graph.close()
        storage_clients = StorageClients(settings)
        try:
            agg = Aggregates(storage_clients.tables.get_table_client(settings.aggregates_table))
            now = datetime.fromtimestamp(clock(), timezone.utc)
            return tally, await agg.read(now - timedelta(hours=3), now + timedelta(hours=1))
        finally:
            await storage_clients.close()

    tally, buckets = run(again_then_read())
    assert tally.changed_requests < 3                              # the killed run had committed some
    delivered = sum(b.counts.get("delivery.delivered", 0) for b in buckets)
    assert delivered == 6, [(b.category, dict(b.counts)) for b in buckets]


def test_a_trace_run_that_cannot_write_the_aggregates_stops_before_moving_past_more_windows(
        azurite, storage, emulator, graph_standin, clock):
    """Writes to the aggregates table fail (503) during a run: its first window's deltas cannot be
    written, and it stops there instead of reading (and losing the deltas of) the other windows,
    which the next run counts."""
    from shared.reporting.aggregates import Aggregates
    from tools.azurite import connection_string
    from tools.fault_proxy import Fault, FaultProxy

    settings = settings_for(storage, emulator, graph_standin, HVE_ACCOUNTS="news@contoso.com,alerts@contoso.com",
                            DELIVERY_TRACE_REQUESTS_PER_5MIN="1000")
    run(send(settings, *[mail(f"agg-{i}", [f"g{i}a@contoso.com", f"g{i}b@contoso.com"], category="orders",
                              account=("news@contoso.com", "alerts@contoso.com")[i % 2]) for i in range(4)]))
    graph_standin.feed_from(emulator)
    Harness(settings, graph_standin, clock)
    agg_table = settings.aggregates_table

    def rule(method: str, path: str):
        if method in ("POST", "PUT", "MERGE", "PATCH") and f"/{agg_table}" in path:
            return Fault(503)
        return None

    def reconcile_with(conn: str):
        import dataclasses

        async def main():
            graph = GraphClient(settings.graph_base_url, StaticToken(graph_standin.token), max_attempts=1)
            try:
                return await reconcile(dataclasses.replace(settings, storage_connection_string=conn), graph=graph,
                                       clock=clock)
            finally:
                await graph.close()
        return run(main())

    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        first = reconcile_with(connection_string(azurite.blob_port, azurite.queue_port, proxy.port))
    assert first.stopped.startswith("error: the aggregates table could not be written"), first
    assert first.changed_requests == 2                 # one account's window: its deltas are lost
    second = reconcile_with(storage.connection_string)
    assert second.changed_requests == 2                # the other account's, read by the next run

    async def delivered():
        clients = StorageClients(settings)
        try:
            now = datetime.fromtimestamp(clock(), timezone.utc)
            buckets = await Aggregates(clients.tables.get_table_client(agg_table)).read(
                now - timedelta(hours=3), now + timedelta(hours=1))
            return sum(b.counts.get("delivery.delivered", 0) for b in buckets)
        finally:
            await clients.close()

    assert run(delivered()) == 4                       # 8 delivered, the 4 of the stopped window lost


# --- cost follows the mail sent; every account is reached -------------------------------------------
# Through the app's entry point (reconcile), which reads the hourly aggregates for where mail was
# sent. Mail is written as the send stage leaves it for the trace: a `requests.sent` count in the
# aggregates under the hour it went, and its trace rows at the stand-in. Virtual time only: a fixed
# minute of a day, whatever the hour the suite runs at.

def _start() -> datetime:
    day = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=1)
    return day + timedelta(hours=9, minutes=20)


def _traced(settings, standin, clock, *sends):
    """Aggregates and trace rows for `sends`: (account, when, how many messages)."""
    from shared.reporting.aggregates import Aggregates

    async def main():
        storage = StorageClients(settings)
        try:
            aggregates = Aggregates(storage.tables.get_table_client(settings.aggregates_table), flush_seconds=0,
                                    clock=clock, rollup_after_seconds=settings.aggregates_rollup_after_seconds)
            for account, when, n in sends:
                aggregates.outcome(when.timestamp(), account, "", "sent", internal=n)
                for k in range(n):
                    standin.add_trace(account, [f"to{k}-{account}"], message_id(f"{account}-{when.isoformat()}-{k}",
                                                                                 "contoso.com", key=KEY), received=when)
            await aggregates.flush()
        finally:
            await storage.close()
    run(main())


def _reconcile(settings, standin, clock):
    async def main():
        graph = GraphClient(settings.graph_base_url, StaticToken(standin.token), max_attempts=1)
        try:
            return await reconcile(settings, graph=graph, clock=clock)
        finally:
            await graph.close()
    return run(main())


def _windows(standin, since: int = 0) -> list[tuple[str, datetime, datetime]]:
    """(sender, ge, le) of each first-page trace request from the `since`-th on."""
    out = []
    for request in standin.trace_requests[since:]:
        text = request.query.get("$filter")
        if text is None:
            continue
        sender = text.split("senderAddress eq '")[1].split("'")[0]
        ge = datetime.fromisoformat(text.split("ge ")[1].split(" ")[0].replace("Z", "+00:00"))
        le = datetime.fromisoformat(text.split("le ")[1].split(" ")[0].replace("Z", "+00:00"))
        out.append((sender, ge, le))
    return out


def _on_virtual_clock(standin, clock, start: datetime) -> None:
    clock.now = start
    standin.clock = lambda: clock.now


def test_a_first_run_starts_at_the_oldest_send_not_at_the_max_age(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin)
    start = _start()
    _on_virtual_clock(graph_standin, clock, start)
    news, alerts, billing = settings.accounts
    # news's mail went a minute ago, alerts's a day and a half ago (the max age is P3D), billing's
    # never: the first run reads one window for each account that sent, starting at its send.
    old = start - timedelta(days=1, hours=12)
    _traced(settings, graph_standin, clock, (news, start - timedelta(minutes=1), 3), (alerts, old, 2))
    tally = _reconcile(settings, graph_standin, clock)
    assert tally.requests == 2 and tally.rows == 5 and not tally.stopped
    windows = {w[0]: w[1:] for w in _windows(graph_standin)}
    assert set(windows) == {news, alerts}
    hour = (start - timedelta(minutes=1)).replace(minute=0, second=0, microsecond=0)
    assert windows[news] == (hour - timedelta(minutes=10), start)
    old_hour = old.replace(minute=0, second=0, microsecond=0)
    assert windows[alerts] == (old_hour - timedelta(minutes=10), old_hour + timedelta(hours=1, minutes=10))


def test_accounts_and_hours_without_mail_cost_no_request(storage, emulator, graph_standin, clock):
    settings = settings_for(storage, emulator, graph_standin)
    start = _start()
    _on_virtual_clock(graph_standin, clock, start)
    news, alerts, billing = settings.accounts
    # news sent 5 hours ago and 3 hours ago, alerts half an hour ago, billing nothing at all.
    _traced(settings, graph_standin, clock, (news, start - timedelta(hours=5), 1), (news, start - timedelta(hours=3), 1),
            (alerts, start - timedelta(minutes=30), 1))
    tally = _reconcile(settings, graph_standin, clock)
    windows = _windows(graph_standin)
    assert tally.requests == 3 and tally.rows == 3
    assert sorted(w[0] for w in windows) == [alerts, news, news]
    # The hour between news's two hours with mail is not read, nor anything before them.
    for sender, ge, le in windows:
        if sender == news:
            assert le - ge == timedelta(hours=1, minutes=20)
    # Ten minutes later: only alerts's mail is still inside a window; news's hours are behind it.
    clock.advance(minutes=10)
    seen = len(graph_standin.trace_requests)
    tally = _reconcile(settings, graph_standin, clock)
    assert [w[0] for w in _windows(graph_standin, seen)] == [alerts] and tally.requests == 1
    # Later, nobody having sent anything since: once the previous end's overlap (rows may show up
    # to 30 minutes late) is read again, no request at all.
    clock.advance(hours=2)
    assert _reconcile(settings, graph_standin, clock).requests <= 1
    clock.advance(minutes=10)
    seen = len(graph_standin.trace_requests)
    tally = _reconcile(settings, graph_standin, clock)
    assert tally.requests == 0 and not tally.stopped and len(graph_standin.trace_requests) == seen


@pytest.mark.parametrize("order", ["configured", "reversed"])
def test_every_account_with_mail_is_traced_within_a_bounded_number_of_runs(storage, emulator, graph_standin, clock, order):
    # 100 accounts, each with mail every hour; a budget of 10 requests per 5 minutes and a run every
    # 10 minutes: 10 accounts a run, so each is read within 10 runs, whatever the configuration order.
    accounts = [f"acct{i:03d}@contoso.com" for i in range(100)]
    if order == "reversed":
        accounts.reverse()
    settings = settings_for(storage, emulator, graph_standin, HVE_ACCOUNTS=",".join(accounts),
                            DELIVERY_TRACE_REQUESTS_PER_5MIN="10")
    start = _start()
    _on_virtual_clock(graph_standin, clock, start)
    last_read: dict[str, int] = {}
    gaps: list[int] = []
    for n in range(25):
        if n % 6 == 0:      # every hour, every account sends
            _traced(settings, graph_standin, clock, *[(a, clock.now - timedelta(minutes=1), 1) for a in accounts])
        seen = len(graph_standin.trace_requests)
        tally = _reconcile(settings, graph_standin, clock)
        assert tally.requests <= 10
        for sender in {w[0] for w in _windows(graph_standin, seen)}:
            gaps.append(n - last_read.get(sender, -1))
            last_read[sender] = n
        clock.advance(minutes=10)
    assert set(last_read) == set(accounts)
    assert max(gaps) <= 10, Counter(gaps)
    assert all(r.status == 200 for r in graph_standin.trace_requests)


@pytest.mark.parametrize("load", ["steady", "burst"])
def test_a_heavy_account_does_not_starve_the_others(storage, emulator, graph_standin, clock, load):
    # 20 accounts with mail every hour, a budget of 10 requests per 5 minutes, 5 rows a page. One
    # account also sends 5 messages every 10 minutes (its window takes about 4 pages a run:
    # "steady"), or 80 in the half hour before the first run (16 pages in one window, more than a
    # run may spend: "burst"). Every other account is still read within a bounded number of runs,
    # and the heavy account's rows are all read too.
    accounts = [f"acct{i:02d}@contoso.com" for i in range(20)]
    heavy = accounts[0]
    settings = settings_for(storage, emulator, graph_standin, HVE_ACCOUNTS=",".join(accounts),
                            DELIVERY_TRACE_REQUESTS_PER_5MIN="10", DELIVERY_TRACE_PAGE_SIZE="5")
    start = _start()
    _on_virtual_clock(graph_standin, clock, start)
    if load == "burst":
        _traced(settings, graph_standin, clock, *[(heavy, start - timedelta(seconds=20 * k + 1), 1) for k in range(80)])
    last_read: dict[str, int] = {}
    gaps: list[int] = []
    for n in range(30):
        sends = [(a, clock.now - timedelta(minutes=1), 1) for a in accounts[1:]] if n % 6 == 0 else []
        if load == "steady":
            sends += [(heavy, clock.now - timedelta(minutes=2 * k + 1), 1) for k in range(5)]
        _traced(settings, graph_standin, clock, *sends)
        seen = len(graph_standin.trace_requests)
        tally = _reconcile(settings, graph_standin, clock)
        assert tally.requests <= 10
        for sender in {w[0] for w in _windows(graph_standin, seen)} - {heavy}:
            gaps.append(n - last_read.get(sender, -1))
            last_read[sender] = n
        clock.advance(minutes=10)
    assert set(last_read) == set(accounts[1:])
    assert max(gaps) <= 6, Counter(gaps)

    # The heavy account's cursor moved past all it sent up to the last run (less the overlap).
    async def heavy_cursor():
        clients = StorageClients(settings)
        try:
            return await DeliveryStore(await clients.table(settings.delivery_table), settings.recipient_hash_key).cursor(heavy)
        finally:
            await clients.close()
    cursor = run(heavy_cursor())
    assert cursor.watermark is not None and cursor.watermark >= clock.now - timedelta(minutes=40)
    assert cursor.recheck_from is None or cursor.recheck_from >= clock.now - timedelta(minutes=40)
