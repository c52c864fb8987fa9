"""GET /api/report and the counting behind it, on the real path: the local host, the send stage,
Azurite and the HVE emulator. The numbers are checked against the ledger, the response against
shared/schema/report.v1.json."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import pytest
from azure.data.tables import TableClient
from azure.storage.queue import QueueClient

from shared.hve.smtp import SessionLease
from shared.reporting.aggregates import Aggregates
from shared.ledger import Ledger
from shared.reporting.report import ReportRequestError, Window, parse_window, shape
from shared.send.stage import Relay
from shared.settings import Settings
from tests.relay_harness import drain, enqueue, relay_settings
from tests.test_function_app import FAST_HOST, app_settings, close_app_relays, run_send_mail
from tools.devhost import DevHost
from tools.devhost_process import HostProcess

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "shared/schema/report.v1.json").read_text())


def mail(rid: str, to: list[str], category: str = "", **extra) -> str:
    return json.dumps({"id": rid, "to": to, "subject": "s", "text": "t", **({"category": category} if category else {}),
                       **extra})


def ledger_counts(settings: Settings) -> dict[tuple[str, str], dict[str, int]]:
    """Outcomes and recipients per (account, category), straight from the ledger rows."""
    async def go():
        from shared.storage import StorageClients

        storage = StorageClients(settings)
        try:
            ledger = Ledger(await storage.table(settings.ledger_table), await storage.table(settings.recipient_index_table),
                            settings.recipient_hash_key)
            return await ledger.report(datetime.now(timezone.utc) - timedelta(days=1))
        finally:
            await storage.close()
    out: dict[tuple[str, str], dict[str, int]] = {}
    for g in asyncio.run(go()):
        key = (g["account"] if g["account"] != "-" else "", g["category"] if g["category"] != "-" else "")
        row = out.setdefault(key, {})
        for state, n in g["outcomes"].items():
            row[state] = row.get(state, 0) + n
        row["internal"] = row.get("internal", 0) + g["internal_recipients"]
        row["external"] = row.get("external", 0) + g["external_recipients"]
    return out


def report_counts(report: dict) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    for r in report["series"]:
        row = out.setdefault((r["account"], r["category"]), {})
        for state, n in r["requests"].items():
            if n:
                row[state] = row.get(state, 0) + n
        row["internal"] = row.get("internal", 0) + r["recipients"]["internal"]
        row["external"] = row.get("external", 0) + r["recipients"]["external"]
    return {k: v for k, v in out.items() if any(n for s, n in v.items() if s not in ("internal", "external"))}


def get(port: int, query: str = "") -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/report?code=local{query}") as response:
            assert response.headers["Content-Type"].startswith("application/json")
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# ------------------------------------------------------------------ through the local host


def test_report_after_a_known_mix_counts_each_request_once_and_equals_the_ledger(storage, emulator):
    settings = app_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0.2", HVE_DAILY_RECIPIENT_BUDGET="1000")
    queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    queue.create_queue()
    # The first DATA is answered 451: that request is deferred once, then sent.
    emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")
    for body in [mail("m-defer", ["ann@contoso.com"], "orders"),
                 mail("m-1", ["bob@contoso.com", "cy@contoso.com"], "orders"),
                 mail("m-2", ["dee@contoso.com"], "<script>alert(1)</script>"),
                 mail("m-1", ["bob@contoso.com", "cy@contoso.com"], "orders"),      # a duplicate delivery
                 mail("m-bad", ["not an address"], "orders"),                       # refused by the contract
                 "this is not json"]:                                                # refused unread
        queue.send_message(body)
    try:
        with DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, http_port=0,
                     functions=["send_mail", "report"]) as host:
            host.wait_until_idle(60)
            time.sleep(1.0)   # the background flush runs every 0.2 s
            status, report = get(host.http_port)
            by_day = get(host.http_port, "&bucket=day")
            bad = get(host.http_port, "&since=yesterday")
            too_long = get(host.http_port, "&since=2026-01-01T00:00:00Z&until=2026-03-01T00:00:00Z")
    finally:
        close_app_relays()

    assert status == 200
    jsonschema.validate(report, SCHEMA)
    # No recipient address in the table or the answer (the HVE accounts are senders, not recipients).
    rows = json.dumps([dict(r) for r in TableClient.from_connection_string(
        storage.connection_string, settings["AGGREGATES_TABLE"]).list_entities()], default=str)
    for text in (rows, json.dumps(report), json.dumps(by_day[1])):
        assert not any(addr in text for addr in ("ann@", "bob@", "cy@", "dee@", "not an address")), text[:500]
    jsonschema.validate(by_day[1], SCHEMA)
    assert report["totals"]["requests"] == {"sent": 3, "refused": 2, "dead": 0}
    assert report["totals"]["recipients"] == {"internal": 4, "external": 0}
    assert report["totals"]["deferrals"] == 1 and report["totals"]["codes"] == {"451 4.7.0": 1}
    assert report_counts(report) == ledger_counts(Settings.from_env(settings))
    assert {r["category"] for r in report["series"]} == {"orders", "<script>alert(1)</script>", ""}
    (err,) = report["errors"]
    assert (err["code"], err["count"]) == ("451 4.7.0", 1) and err["account"] in settings["HVE_ACCOUNTS"]
    # Live state beside the counts.
    assert [a["account"] for a in report["status"]["accounts"]] == settings["HVE_ACCOUNTS"].split(",")
    assert report["queues"]["mail"]["depth"] == 0 and report["queues"]["poison"]["name"].endswith("-poison")
    assert report["budget"]["dailyRecipientBudget"] == 1000 and report["budget"]["spentToday"] >= 4
    assert report["budget"]["costPeriod"] == pytest.approx(4 * 42 / 1e6)
    # The same numbers by day; bad windows are a clear 400.
    assert by_day[0] == 200 and by_day[1]["totals"] == report["totals"]
    assert bad[0] == 400 and "since" in bad[1]["error"]
    assert too_long[0] == 400 and "31 days" in too_long[1]["error"]


def test_a_host_killed_before_its_flush_loses_those_counts_and_a_replay_never_adds_them_twice(storage, emulator,
                                                                                              tmp_path):
    """The side chosen: counts still in a killed process's buffer are lost (the ledger keeps the
    truth); a replay of a request it finished is a duplicate and is not counted."""
    slow = app_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="3600")
    queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    queue.create_queue()
    for rid in ("k-1", "k-2", "k-3"):
        queue.send_message(mail(rid, ["ann@contoso.com"]))
    host = HostProcess(tmp_path / "a", slow, host_json=FAST_HOST)
    host.start()
    ledger = TableClient.from_connection_string(storage.connection_string, slow["LEDGER_TABLE"])
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                rows = list(ledger.query_entities("State eq 'sent'"))
            except Exception:  # noqa: BLE001 - table not created yet
                rows = []
            # Settled and deleted from the queue (the plain path writes the final row before the
            # host deletes the message: a kill in between would leave it leased, not replayed).
            if len(rows) == 3 and not queue.get_queue_properties().approximate_message_count:
                break
            time.sleep(0.1)
        assert len(rows) == 3, host.log_file.read_text()[-2000:]
    finally:
        host.kill()   # SIGKILL: the three outcomes are in the ledger, their counts only in memory

    queue.send_message(mail("k-1", ["ann@contoso.com"]))   # a replay of a finished request
    queue.send_message(mail("k-4", ["ann@contoso.com"]))
    run_send_mail(app_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0.2"))

    async def read():
        from azure.data.tables.aio import TableClient as AsyncTable

        async with AsyncTable.from_connection_string(storage.connection_string, slow["AGGREGATES_TABLE"]) as t:
            now = datetime.now(timezone.utc)
            return await Aggregates(t).read(now - timedelta(hours=2), now + timedelta(hours=1))

    counted = sum(b.counts.get("requests.sent", 0) for b in asyncio.run(read()))
    assert len(list(ledger.query_entities("State eq 'sent'"))) == 4
    assert counted == 1   # k-4 only: k-1..k-3 lost with the process, the replay of k-1 not counted


@pytest.mark.parametrize("path", ["paced", "plain"])
def test_a_host_killed_while_its_final_ledger_write_hangs_is_counted_once_when_a_redelivery_finishes_it(
        azurite, storage, emulator, tmp_path, path):
    """HVE accepted the message; the write of the final state never gets an answer (storage
    hangs) and the host is SIGKILLed meanwhile, its buffer flushed every 0.1 s. The queue delivers
    the message again, another host finds the row `sending` past its lease and finishes it.
    Counted once: by the write that made the row final, not by the one that hung (counting before
    that write would count it twice).

    Paced: the progress after HVE's 250 is in the ledger (write 1), so the redelivery only records
    the outcome. Plain: the first write after the 250 is the final one, so, as when a paced
    progress write is lost, the redelivery sends again under the same Message-ID (Exchange drops
    the repeat)."""
    from tools.azurite import connection_string
    from tools.fault_proxy import Fault, FaultProxy

    env = {"HVE_LIMITS": '{"messages_per_minute": 100000}'} if path == "paced" else {}
    final_put = 2 if path == "paced" else 1
    settings = app_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0.1", SENDING_LEASE_SECONDS="2", **env)
    row = f"{settings['LEDGER_TABLE']}(PartitionKey='hang-1',RowKey='request')"
    writes = {"row": 0, "stalled": 0}

    def rule(method: str, url_path: str):
        if method == "PUT" and row in url_path.replace("%27", "'"):
            writes["row"] += 1
            if writes["row"] >= final_put:
                writes["stalled"] += 1
                return Fault(stall=True)
        return None

    queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    queue.create_queue()
    queue.send_message(mail("hang-1", ["ann@contoso.com"], "orders"))
    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        host = HostProcess(tmp_path / "a", {**settings, "AzureWebJobsStorage": connection_string(
            azurite.blob_port, azurite.queue_port, proxy.port)}, host_json=FAST_HOST, lease_seconds=3)
        host.start()
        try:
            deadline = time.monotonic() + 60
            while not writes["stalled"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert writes["stalled"], host.log_file.read_text()[-2000:]
            time.sleep(1.0)              # ten flushes of the buffer while the write hangs
        finally:
            host.kill()
    assert len(emulator.accepted()) == 1
    time.sleep(3)                        # the killed host's lease on the queue message runs out
    run_send_mail(app_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0.1", SENDING_LEASE_SECONDS="2", **env))

    ledger = TableClient.from_connection_string(storage.connection_string, settings["LEDGER_TABLE"])
    assert ledger.get_entity("hang-1", "request")["State"] == "sent"
    accepted = emulator.accepted()
    assert len(accepted) == (1 if path == "paced" else 2)   # paced: the redelivery only recorded the outcome
    assert len({a.message_id for a in accepted}) == 1

    async def read():
        from azure.data.tables.aio import TableClient as AsyncTable

        async with AsyncTable.from_connection_string(storage.connection_string, settings["AGGREGATES_TABLE"]) as t:
            now = datetime.now(timezone.utc)
            return await Aggregates(t).read(now - timedelta(hours=2), now + timedelta(hours=1))

    counted = sum(b.counts.get("requests.sent", 0) for b in asyncio.run(read()))
    assert counted == 1


# ------------------------------------------------------------------ the send stage in process


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("path", ["paced", "plain"])
def test_two_deliveries_of_one_request_at_once_are_counted_once(storage, emulator, path):
    # Paced (something counted per day): the ledger row is read first. Plain (ga-2026, no budget):
    # the claim is the row's creation, and both deliveries try to create it.
    env = {"HVE_LIMITS": '{"messages_per_minute": 100000}'} if path == "paced" else {}

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0", **env))
        assert (relay.scheduler is None) == (path == "paced")
        try:
            good = mail("twice", ["ann@contoso.com"], "c")
            bad = mail("twice-bad", ["not an address"], "c")
            # Both deliveries of each request reach the ledger row before either writes it (the
            # race that matters: both read it, or both try to create it); after that the real
            # ledger decides who wins.
            barriers = {"twice": asyncio.Barrier(2), "twice-bad": asyncio.Barrier(2)}
            seen: dict[str, int] = {}

            async def first_touch(request_id: str) -> None:
                seen[request_id] = seen.get(request_id, 0) + 1
                if request_id in barriers and seen[request_id] <= 2:   # the first touch of each delivery
                    await barriers[request_id].wait()

            if path == "paced":
                read_ledger = relay.ledger.get

                async def get(request_id: str):
                    row = await read_ledger(request_id)
                    await first_touch(request_id)
                    return row

                relay.ledger.get = get
            else:
                save_ledger = relay.ledger.save

                async def save(entry):
                    await first_touch(entry.request_id)
                    return await save_ledger(entry)

                relay.ledger.save = save
            results = await asyncio.gather(relay.handle(good, "q1"), relay.handle(good, "q2"),
                                           relay.handle(bad, "q3"), relay.handle(bad, "q4"))
            await drain(relay)   # a `busy` copy comes back and finds the request finished
            await relay.aggregates.flush()
            now = datetime.now(timezone.utc)
            buckets = await relay.aggregates.read(now - timedelta(hours=1), now + timedelta(hours=1))
            return results, buckets
        finally:
            await relay.close()

    results, buckets = run(main())
    counts: dict[str, int] = {}
    for b in buckets:
        for k, v in b.counts.items():
            counts[k] = counts.get(k, 0) + v
    if path == "paced":
        assert [r.state for r in results[2:]] == ["refused", "refused"]   # both reached the final write
    else:   # one created the row; the other found it claimed (busy: it comes back later) or, when
        # the first had finished already, final (a duplicate)
        second = sorted(r.state for r in results[2:])
        assert second in (["busy", "refused"], ["duplicate", "refused"]), second
    assert counts.get("requests.sent") == 1 and counts.get("requests.refused") == 1, (results, counts)


def test_a_final_row_is_counted_when_written_even_if_the_recipient_index_then_fails(storage, emulator):
    """Plain path: the last transaction's write makes the row final; the recipient index write after
    it fails (storage blip), so the invocation fails and the host delivers the message again. The
    request is counted once: by the write that made it final, not by the redelivery (a duplicate).
    And an unreadable message delivered twice keeps one refused row, counted once."""
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0"))
        assert relay.scheduler is not None
        real_index = relay.ledger.index_recipients
        failures = []

        async def failing_once(*args, **kwargs):
            if not failures:
                failures.append(1)
                raise ConnectionError("storage unavailable")
            return await real_index(*args, **kwargs)

        relay.ledger.index_recipients = failing_once
        try:
            body = mail("index-blip", ["ann@contoso.com"], "c")
            with pytest.raises(ConnectionError):
                await relay.handle(body, "q1")
            row = await relay.ledger.get("index-blip")
            again = await relay.handle(body, "q1", 2)
            unread = [await relay.handle("{not json", "q-unread", n) for n in (1, 2)]
            await relay.aggregates.flush()
            now = datetime.now(UTC)
            buckets = await relay.aggregates.read(now - timedelta(hours=1), now + timedelta(hours=1))
            return row, again, unread, buckets, await relay.ledger.get("q-unread")
        finally:
            await relay.close()

    row, again, unread, buckets, unread_row = run(main())
    counts: dict[str, int] = {}
    for b in buckets:
        for k, v in b.counts.items():
            counts[k] = counts.get(k, 0) + v
    assert row.state == "sent" and again.state == "duplicate"
    assert [h.state for h in unread] == ["refused", "refused"] and unread_row.state == "refused"
    assert counts.get("requests.sent") == 1 and counts.get("requests.refused") == 1, counts


def test_an_unreachable_aggregates_table_never_fails_or_holds_a_send(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, AGGREGATES_TABLE="not_a_valid_table_name!",
                                                  AGGREGATES_FLUSH_SECONDS="0.05"))
        try:
            for i in range(3):
                await enqueue(relay, mail(f"u-{i}", ["ann@contoso.com"]))
            handled = await drain(relay)
            await asyncio.sleep(0.2)   # the background flush fails meanwhile
            return handled, relay.aggregates.stats.failures
        finally:
            await relay.close()        # never raises either

    handled, failures = run(main())
    assert sorted(h.state for h in handled) == ["sent"] * 3
    assert failures >= 1
    assert len(emulator.accepted()) == 3


# ------------------------------------------------------------------ the query string and the shape (pure)

NOW = datetime(2026, 12, 2, 3, 17, 5, tzinfo=timezone.utc).timestamp()


def test_the_window_defaults_to_the_last_24_hours_rounded_out_to_whole_buckets():
    w = parse_window({}, NOW)
    assert (w.since.isoformat(), w.until.isoformat(), w.bucket) == (
        "2026-12-01T03:00:00+00:00", "2026-12-02T04:00:00+00:00", "hour")
    d = parse_window({"since": "2026-11-25", "bucket": "DAY"}, NOW)
    assert (d.since.isoformat(), d.until.isoformat()) == ("2026-11-25T00:00:00+00:00", "2026-12-03T00:00:00+00:00")
    z = parse_window({"since": "2026-12-01T10:30:00Z", "until": "2026-12-01T12:00:00+01:00"}, NOW)
    assert (z.since.hour, z.until.hour) == (10, 11)


@pytest.mark.parametrize("params, word", [
    ({"bucket": "week"}, "bucket"), ({"since": "yesterday"}, "since"), ({"until": "1 Dec"}, "until"),
    ({"since": "2026-12-02T05:00:00Z", "until": "2026-12-02T01:00:00Z"}, "before"),
    ({"since": "2026-10-01"}, "longer"),
])
def test_a_bad_window_is_refused_with_a_clear_message(params, word):
    with pytest.raises(ReportRequestError, match=word):
        parse_window(params, NOW, 31)


def test_hours_fold_into_days_and_errors_are_ranked_by_count():
    from shared.reporting.rows import Bucket

    h = datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()
    buckets = [Bucket(int(h), "a@x", "c", {"requests.sent": 2, "codes.451 4.7.0": 1}, {"451 4.7.0": h + 60}),
               Bucket(int(h + 3600), "a@x", "c", {"requests.sent": 1, "deferrals": 2, "codes.451 4.7.0": 2},
                      {"451 4.7.0": h + 3700}),
               Bucket(int(h + 7200), "b@x", "", {"codes.550 5.1.10": 1, "delivery.delivered": 3})]
    window = Window(datetime.fromtimestamp(h, timezone.utc), datetime.fromtimestamp(h + 86400, timezone.utc), "day")
    out = shape(buckets, window)
    assert [(r["start"], r["account"], r["requests"]["sent"], r["deferrals"]) for r in out["series"]] == [
        ("2026-12-01T00:00:00+00:00", "a@x", 3, 2), ("2026-12-01T00:00:00+00:00", "b@x", 0, 0)]
    assert out["totals"]["codes"] == {"451 4.7.0": 3, "550 5.1.10": 1}
    assert out["totals"]["delivery"] == {"delivered": 3}
    assert [(e["code"], e["account"], e["count"], e["lastSeen"]) for e in out["errors"]] == [
        ("451 4.7.0", "a@x", 3, "2026-12-01T01:01:40+00:00"), ("550 5.1.10", "b@x", 1, "2026-12-01T02:00:00+00:00")]


def test_the_ledger_tool_reports_from_the_aggregates_not_the_ledger_rows(storage, emulator):
    from azure.data.tables.aio import TableClient as AsyncTable

    from shared.reporting.report import render_text
    from tools import ledger as ledger_tool

    settings = relay_settings(storage, emulator)
    now = time.time()

    async def count():
        async with AsyncTable.from_connection_string(storage.connection_string, settings.aggregates_table) as t:
            agg = Aggregates(t, flush_seconds=0)
            agg.outcome(now - 2 * 86400, "news@contoso.com", "orders", "sent", internal=7)
            agg.outcome(now, "news@contoso.com", "orders", "refused")
            agg.replies(now, "news@contoso.com", "orders", ["550 5.1.10"])
            await agg.flush()

    run(count())
    doc = run(ledger_tool.report(settings, None, None, "day"))   # no ledger row exists at all
    jsonschema.validate(doc, SCHEMA)
    assert doc["totals"]["requests"] == {"sent": 1, "refused": 1, "dead": 0}
    assert doc["totals"]["recipients"]["internal"] == 7 and len(doc["series"]) == 2
    text = render_text(doc)
    assert "550 5.1.10 x1" in text and text.splitlines()[-1].split()[:5] == ["total", "-", "-", "1", "1"]


def test_reply_codes_count_each_rcpt_refusal_and_the_final_reply_once_and_never_their_text():
    from shared.reporting.rows import reply_labels
    from shared.hve.smtp import SubmitResult
    from shared.send.replies import classify_reply

    ok = classify_reply(250, "2.6.0 Queued mail for delivery")
    later = classify_reply(452, "4.5.3 Too many recipients")
    partly = SubmitResult(ok, refused={"x@fabrikam.com": "550 5.1.10 RESOLVER.ADR.RecipientNotFound; x@fabrikam.com"},
                          deferred={"y@contoso.com": later})
    assert sorted(reply_labels(partly, 3)) == ["452 4.5.3", "550 5.1.10"]
    # Everyone refused at RCPT: the transaction's verdict is one of those replies, not another.
    nobody = SubmitResult(later, refused={"x@fabrikam.com": "550 5.1.10 unknown"}, deferred={"y@contoso.com": later})
    assert sorted(reply_labels(nobody, 2)) == ["452 4.5.3", "550 5.1.10"]
    assert reply_labels(SubmitResult(classify_reply(451, "4.7.0 Temporary server error")), 1) == ["451 4.7.0"]
    assert reply_labels(SubmitResult(classify_reply(554, "no enhanced code here")), 1) == ["554"]
    assert reply_labels(SubmitResult(ok), 1) == []
    lost = SubmitResult(classify_reply(0, "connection lost"))
    assert reply_labels(lost, 1) == []
    assert reply_labels(object(), 1) == []   # never raises into the send path


def get_raw(port: int, route: str, query: str = "") -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a GET on the local host."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/{route}?code=local{query}") as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_out_of_range_and_ancient_windows_are_clear_400s_or_cheap_empty_answers(azurite, storage, emulator):
    from bench.report import TableRequests

    settings = app_settings(storage, emulator)
    aggregates = TableClient.from_connection_string(storage.connection_string, settings["AGGREGATES_TABLE"])
    with DevHost(ROOT / "function_app.py", settings, http_port=0, functions=["report", "status"]) as host, \
            TableRequests(azurite.table_port) as counter:
        port = host.http_port
        get_raw(port, "report")                  # cold start: the relay, its tables
        answers = {q: get_raw(port, "report", q) for q in (
            "&until=9999-12-31T23:30", "&since=0001-01-01T00:30%2B01:00", "&since=%3Cscript%3Ex",
            "&bucket=%3Cscript%3E", "&since=0001-01-01T00:00Z&until=0001-02-01T00:00Z&bucket=day")}
        before = counter.total()
        ancient = get_raw(port, "report", "&since=0001-01-03T00:00Z&until=0001-02-03T00:00Z&bucket=day")
        ancient_requests = counter.total() - before
        status = get_raw(port, "status")
    close_app_relays()

    for query, word in [("&until=9999-12-31T23:30", "until"), ("&since=0001-01-01T00:30%2B01:00", "since"),
                        ("&since=%3Cscript%3Ex", "since"), ("&bucket=%3Cscript%3E", "bucket"),
                        ("&since=0001-01-01T00:00Z&until=0001-02-01T00:00Z&bucket=day", "since")]:
        code, headers, body = answers[query]
        assert code == 400 and word in body["error"], (query, code, body)
        assert "script" not in body["error"] and "9999-12-31" not in body["error"] and "T00:30" not in body["error"]
        assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    # A window wholly before the retention period is empty: nothing read, nothing written.
    code, headers, body = ancient
    assert code == 200 and body["series"] == [] and body["since"] == body["until"], body
    jsonschema.validate(body, SCHEMA)
    # The governor read only (and, on the plain path, where the governor counts nothing, today's use
    # from the aggregates).
    assert ancient_requests == 2, counter.by_table
    assert counter.by_table.get(settings["GOVERNOR_TABLE"], 0) >= 1
    assert list(aggregates.list_entities()) == [] if _exists(aggregates) else True
    assert headers["Cache-Control"] == "no-store" and headers["X-Content-Type-Options"] == "nosniff"
    assert status[0] == 200 and status[1]["Cache-Control"] == "no-store"
    assert status[1]["X-Content-Type-Options"] == "nosniff"


def _exists(table: TableClient) -> bool:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        next(iter(table.list_entities(results_per_page=1)), None)
        return True
    except ResourceNotFoundError:
        return False


def test_a_window_reaching_past_the_retention_period_starts_at_it():
    w = parse_window({"since": "2026-11-01", "until": "2026-11-20", "bucket": "day"}, NOW, 31, timedelta(days=10))
    assert (w.since.isoformat(), w.until.isoformat()) == ("2026-11-22T00:00:00+00:00", "2026-11-22T00:00:00+00:00")
    h = parse_window({"since": "2026-11-25T00:00Z"}, NOW, 31, timedelta(days=3))
    assert h.since.isoformat() == "2026-11-29T03:00:00+00:00"


@pytest.mark.parametrize("params", [
    {"until": "9999-12-31T23:30"}, {"since": "0001-01-01T00:30+01:00", "until": "0001-01-01T12:00Z"},
    {"since": "9999-12-30", "until": "9999-12-31", "bucket": "day"}])
def test_dates_at_the_ends_of_the_calendar_are_a_400_not_an_overflow(params):
    with pytest.raises(ReportRequestError, match="since|until") as caught:
        parse_window(params, NOW, 31)
    assert "0001-01-01" not in str(caught.value) and "9999-12-31" not in str(caught.value)


def test_the_status_delivery_rates_come_from_the_aggregates_whatever_the_delivery_tables_size(
        azurite, storage, emulator, monkeypatch):
    from bench.report import TableRequests
    from shared.wiring import close_relays, status_json

    settings = app_settings(storage, emulator, DELIVERY_TRACE_ENABLED="true", GRAPH_DEV_TOKEN="t",
                            DELIVERY_TABLE=f"{storage.table_prefix}delivery")
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    account = settings["HVE_ACCOUNTS"].split(",")[0]
    now = time.time()

    async def status() -> tuple[dict, dict[str, int]]:
        try:
            await status_json()                     # the relay and its clients are made once
            with TableRequests(azurite.table_port) as counter:
                shown = json.loads(await status_json())
            return shown, dict(counter.by_table)
        finally:
            await close_relays()

    async def fill(rows: int) -> None:
        from azure.data.tables.aio import TableClient as AsyncTable

        sent = datetime.fromtimestamp(now - 600, timezone.utc)
        async with AsyncTable.from_connection_string(storage.connection_string, settings["DELIVERY_TABLE"]) as t:
            try:
                await t.create_table()
            except Exception:  # noqa: BLE001 - made already
                pass
            sem = asyncio.Semaphore(32)

            async def one(i: int) -> None:
                async with sem:
                    await t.create_entity({"PartitionKey": f"d{i:06d}", "RowKey": "summary", "RequestId": f"r{i}",
                                           "Account": account, "SentAt": sent, "Counts": json.dumps({"delivered": 1})})
            await asyncio.gather(*(one(i) for i in range(rows)))

    async def count() -> None:
        from azure.data.tables.aio import TableClient as AsyncTable

        async with AsyncTable.from_connection_string(storage.connection_string, settings["AGGREGATES_TABLE"]) as t:
            agg = Aggregates(t, flush_seconds=0)
            await agg.add_delivery(now - 600, account, "orders", {"delivered": 3, "quarantined": 1})
            await agg.flush()

    asyncio.run(count())
    asyncio.run(fill(0))
    small, small_requests = asyncio.run(status())
    asyncio.run(fill(2_500))
    large, large_requests = asyncio.run(status())
    assert small["delivery_24h"]["counts"] == large["delivery_24h"]["counts"] == {"delivered": 3, "quarantined": 1}
    assert large["delivery_24h"]["rates"]["delivered"] == 0.75
    assert large["delivery_24h"]["accounts"][account]["counts"] == {"delivered": 3, "quarantined": 1}
    # With 0 or 2,500 delivery summaries: no request to the delivery table; one governor read; the
    # aggregates' range queries (hours of the open days; rollups of a closed day, and whether it has
    # rows, when the 24 hours reach into a day that ended over AGGREGATES_ROLLUP_AFTER_MINUTES ago).
    for requests in (small_requests, large_requests):
        assert settings["DELIVERY_TABLE"] not in requests, requests
        assert requests[settings["GOVERNOR_TABLE"]] == 1 and 1 <= requests[settings["AGGREGATES_TABLE"]] <= 3, requests


def test_a_flush_whose_answer_is_lost_on_the_send_path_is_not_added_twice(azurite, storage, emulator):
    """The relay's own flushes, through a storage proxy: the merge of the second request's counts
    (same account and category: the same row, held by the process, so it goes as the day's
    transaction) is applied but answered 500 (the SDK retries it: refused, 412). The counts equal
    the ledger's: the next flush re-reads the row, finds the batch's number and does not add it
    again."""
    from tools.azurite import connection_string
    from tools.fault_proxy import Fault, FaultProxy

    name = storage.env()["AGGREGATES_TABLE"]
    lost = {"left": 0, "lost": 0}

    def rule(method: str, path: str):
        row_write = method in ("PUT", "MERGE", "PATCH") and f"/{name}(" in path
        if (row_write or (method == "POST" and "/$batch" in path)) and lost["left"] > 0:
            lost["left"] -= 1
            lost["lost"] += 1
            return Fault(500, applied=True)
        return None

    async def main(conn: str):
        relay = await Relay.create(relay_settings(storage, emulator, AzureWebJobsStorage=conn, AGGREGATES_FLUSH_SECONDS="0"))
        try:
            await enqueue(relay, mail("lost-1", ["ann@contoso.com", "bob@contoso.com"], "orders", account="news@contoso.com"))
            await drain(relay)
            await relay.aggregates.flush()          # creates the row
            await enqueue(relay, mail("lost-2", ["cy@contoso.com"], "orders", account="news@contoso.com"))
            await drain(relay)
            lost["left"] = 1
            await relay.aggregates.flush()          # applied, answered 500
            await relay.aggregates.flush()
            assert not relay.aggregates._pending
            now = datetime.now(timezone.utc)
            return await relay.aggregates.read(now - timedelta(hours=2), now + timedelta(hours=1))
        finally:
            await relay.close()

    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        buckets = run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port)))
    assert lost["lost"] == 1
    counts: dict[str, int] = {}
    for b in buckets:
        for k, v in b.counts.items():
            counts[k] = counts.get(k, 0) + v
    latencies = sum(n for k, n in counts.items() if k.startswith("latency."))   # one per sent request, once too
    assert {k: n for k, n in counts.items() if not k.startswith("latency.")} == {"requests.sent": 2,
                                                                               "recipients.internal": 3}
    assert latencies == 2


@pytest.mark.parametrize("path,final_put", [("paced", 2), ("plain", 1)])
def test_a_final_ledger_write_whose_answer_is_lost_is_counted_once(azurite, storage, emulator, path, final_put):
    """Storage makes the request final but answers 500; the SDK's retry then meets the row's new
    ETag (412). The row holds this write's mark, so the relay knows its own write made the row
    final and counts it, once (before, such a request was never counted)."""
    from tools.azurite import connection_string
    from tools.fault_proxy import Fault, FaultProxy

    row = f"{storage.env()['LEDGER_TABLE']}(PartitionKey='lost-final',RowKey='request')"
    writes = {"row": 0, "lost": 0}

    def rule(method: str, path: str):
        if method == "PUT" and row in path.replace("%27", "'"):
            writes["row"] += 1
            # Paced: 1 the progress after HVE's 250, 2 the final state. Plain: the claim is the
            # row's creation (a POST) and the progress write after the 250 is the final one.
            if writes["row"] == final_put:
                writes["lost"] += 1
                return Fault(500, applied=True)
        return None

    async def main(conn: str):
        relay = await Relay.create(relay_settings(storage, emulator, AzureWebJobsStorage=conn, AGGREGATES_FLUSH_SECONDS="0",
                                                  **({"HVE_LIMITS": '{"messages_per_minute": 100000}'} if path == "paced" else {})))
        try:
            await enqueue(relay, mail("lost-final", ["ann@contoso.com"], "orders"))
            handled = await drain(relay)
            await relay.aggregates.flush()
            now = datetime.now(timezone.utc)
            return handled, await relay.ledger.get("lost-final"), \
                await relay.aggregates.read(now - timedelta(hours=2), now + timedelta(hours=1))
        finally:
            await relay.close()

    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        handled, entry, buckets = run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port)))
    assert writes["lost"] == 1 and [h.state for h in handled] == ["sent"] and entry.state == "sent"
    assert sum(b.counts.get("requests.sent", 0) for b in buckets) == 1


@pytest.mark.parametrize("path", ["paced", "plain"])
def test_a_delivery_whose_progress_write_comes_back_after_another_finished_the_request_counts_nothing(
        azurite, storage, emulator, path):
    """Instance A's message is accepted by HVE, then A's write of that progress hangs past the
    `sending` lease. Instance B takes the request over (same Message-ID: Exchange drops the repeat),
    finishes it and counts it. When A's write comes back (412: the row changed), A must not put its
    progress over B's final row (that made A's own final write succeed and count the request a
    second time, the ledger row going final -> sending -> final)."""
    import threading

    from tools.azurite import connection_string
    from tools.fault_proxy import FaultProxy

    row = f"{storage.env()['LEDGER_TABLE']}(PartitionKey='slow-a',RowKey='request')"
    held, release = threading.Event(), threading.Event()

    def rule(method: str, path: str):
        if method == "PUT" and row in path.replace("%27", "'") and not held.is_set():
            held.set()                   # A's progress write after HVE's 250: held until B is done
            release.wait(30)
        return None

    body = mail("slow-a", ["ann@contoso.com"], "orders", account="news@contoso.com")

    env = {"HVE_LIMITS": '{"messages_per_minute": 100000}'} if path == "paced" else {}

    async def main(conn: str):
        a = await Relay.create(relay_settings(storage, emulator, AzureWebJobsStorage=conn, AGGREGATES_FLUSH_SECONDS="0",
                                              SENDING_LEASE_SECONDS="1", **env))
        b = await Relay.create(relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0", SENDING_LEASE_SECONDS="1",
                                              **env))
        try:
            first = asyncio.create_task(a.handle(body, "q-a"))
            while not held.is_set():
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.2)     # A's `sending` lease runs out
            second = await b.handle(body, "q-b")
            release.set()
            results = [await first, second]
            final = await b.ledger.get("slow-a")
            await a.aggregates.flush()
            await b.aggregates.flush()
            now = datetime.now(timezone.utc)
            return results, final, await b.aggregates.read(now - timedelta(hours=2), now + timedelta(hours=1))
        finally:
            release.set()
            await a.close()
            await b.close()

    with FaultProxy(azurite.table_port, rule=rule) as proxy:
        results, final, buckets = run(main(connection_string(azurite.blob_port, azurite.queue_port, proxy.port)))
    assert results[1].state == "sent" and final.state == "sent", results
    assert len(emulator.accepted()) == 2          # B's repeat under the same Message-ID
    assert sum(b.counts.get("requests.sent", 0) for b in buckets) == 1, results


# ------------------------------------------------------------------ send latency (injected clock)


class StepClock:
    """The relay's clock: a fixed time that moves with real time, plus the jumps the test makes."""

    def __init__(self, start: datetime) -> None:
        self._offset = start.timestamp() - time.time()

    def __call__(self) -> float:
        return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds


@pytest.mark.parametrize("path", ["plain", "paced"])
def test_send_latencies_set_by_an_injected_clock_come_back_from_the_report_as_p50_p95_and_slowest_account(
        storage, emulator, monkeypatch, path):
    """Each SMTP transaction 'takes' the seconds its subject names (the clock jumps when HVE's answer
    comes back), so every request's latency is known: first seen -> the 250 of its last transaction
    (a request in two chunks takes both). GET /api/report's handler, on that clock, answers p50/p95
    as the upper bounds of the histogram buckets holding them, per hour and for the window, and the
    slowest account by p95. The histogram rides the outcome's row: no row of its own."""
    import re

    from shared import wiring

    limits = {"recipients_per_message": 2, **({"messages_per_minute": 100000} if path == "paced" else {})}
    settings = relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0", HVE_LIMITS=json.dumps(limits))
    clock = StepClock(datetime(2026, 3, 10, 12, 5, tzinfo=timezone.utc))   # no test depends on the hour it runs
    plan = [("news@contoso.com", ["ann@contoso.com"], s) for s in (3, 3, 3, 7, 7)] + [
        ("alerts@contoso.com", ["ann@contoso.com"], 7), ("alerts@contoso.com", ["bob@contoso.com"], 7),
        ("alerts@contoso.com", ["ann@contoso.com", "bob@contoso.com", "cy@contoso.com"], 20),   # 2 chunks: 40 s
        ("alerts@contoso.com", ["dee@contoso.com"], 45), ("alerts@contoso.com", ["eve@contoso.com"], 200)]

    async def main():
        relay = await Relay.create(settings, clock=clock)
        assert (relay.scheduler is not None) == (path == "plain")
        real_send = SessionLease.send
        transactions: list[int] = []

        async def slow_send(lease, addresses, message):
            result = await real_send(lease, addresses, message)
            seconds = int(re.search(rb"^Subject: latency (\d+)", message, re.M)[1])
            transactions.append(seconds)
            clock.advance(seconds)                  # HVE's 250 comes back this much later
            return result

        monkeypatch.setattr(SessionLease, "send", slow_send)

        async def this_relay():
            return relay

        monkeypatch.setattr(wiring, "get_relay", this_relay)
        try:
            for i, (account, to, seconds) in enumerate(plan):
                await enqueue(relay, mail(f"lat-{i}", to, "orders", account=account, subject=f"latency {seconds}"))
                handled = await drain(relay)        # one at a time: each latency is its own jumps
                assert [h.state for h in handled] == ["sent"], handled
            await relay.aggregates.flush()
            by_hour = await wiring.report_response({})
            by_day = await wiring.report_response({"bucket": "day"})
            rows = [dict(r) async for r in relay.aggregates._table.list_entities()]
            return transactions, by_hour, by_day, rows
        finally:
            await relay.close()

    transactions, (status, report), (day_status, by_day), rows = run(main())
    assert len(transactions) == len(plan) + 1          # the 3-recipient request went in two transactions
    assert status == day_status == 200
    report, by_day = json.loads(report), json.loads(by_day)
    jsonschema.validate(report, SCHEMA)
    jsonschema.validate(by_day, SCHEMA)
    assert report["totals"]["requests"]["sent"] == 10
    latency = report["latency"]
    # Latencies 3 3 3 7 7 | 7 7 40 45 200 (+ milliseconds of real time): buckets 5 5 5 10 10 | 10 10 60 60 300.
    assert latency["totals"]["histogram"] == [0, 0, 3, 4, 0, 2, 0, 1, 0, 0, 0, 0]
    assert (latency["totals"]["p50"], latency["totals"]["p95"]) == (10, 300)     # the 5th and the 10th of 10
    (hour,) = latency["series"]
    assert hour["start"] == "2026-03-10T12:00:00+00:00" and (hour["count"], hour["p50"], hour["p95"]) == (10, 10, 300)
    # The slowest account by p95; its p50 (the 3rd of 7 7 40 45 200) is the two-chunk request: 40 s, not 20.
    assert hour["slowest"] == {"account": "alerts@contoso.com", "count": 5, "p50": 60, "p95": 300}
    assert [(a["account"], a["p50"], a["p95"]) for a in latency["accounts"]] == [
        ("alerts@contoso.com", 60, 300), ("news@contoso.com", 5, 10)]
    assert by_day["latency"]["totals"] == latency["totals"] and len(by_day["latency"]["series"]) == 1
    assert by_day["latency"]["series"][0]["start"] == "2026-03-10T00:00:00+00:00"
    # In the table: one row per account (and category), the latency beside the outcome.
    assert len(rows) == 2
    for row in rows:
        counts = json.loads(row["Data"])["n"]
        assert counts["requests.sent"] == 5 == sum(n for k, n in counts.items() if k.startswith("latency."))
