"""The suppression list end to end: the real send stage against Azurite and the HVE
emulator over TLS, message trace from the Graph stand-in, the CLI and the HTTP routes under the local
host. What suppresses (a 5xx at RCPT, trace `failed` with a 5.x.x reason, an operator), what never
does (4xx, pending, quarantined), the effect on later requests, expiry, and no address at rest."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import jsonschema
import pytest

from shared.ledger import Ledger, recipient_hash
from shared.reporting.aggregates import Aggregates
from shared.reporting.rows import Bucket
from shared.reporting.report import Window, shape
from shared.reporting.request_status import request_view
from shared.retention import purge_expired
from shared.send.stage import Relay
from shared.send.suppression import SuppressionList, rcpt_reason, trace_reason
from shared.settings import Settings, SettingsError
from shared.storage import StorageClients
from tests.fixtures_graph import graph_env, graph_standin  # noqa: F401  (fixture)
from tests.relay_harness import drain, enqueue, relay_settings
from tests.schemas import ERROR_SCHEMA, REQUEST_STATUS_SCHEMA, SCHEMAS
from tests.test_no_addresses import Everything

KEY = b"test-hash-key"
GONE = "gone.mailbox@contoso.com"  # HVE refuses it at RCPT (550 5.1.1)
OTHER = "still.here@contoso.com"
ANSWER_SCHEMA = json.loads((SCHEMAS / "suppression-answer.v1.json").read_text())
REQUEST_SCHEMA = json.loads((SCHEMAS / "suppression-request.v1.json").read_text())
ROOT = Path(__file__).resolve().parents[1]


def run(coro):
    return asyncio.run(coro)


def mail(request_id: str, to: list[str], **extra):
    return {"id": request_id, "to": to, "subject": "Update", "text": "Hello", **extra}


class Clock:
    def __init__(self, at: datetime | None = None) -> None:
        self.now = at or datetime.now(UTC)

    def __call__(self) -> float:
        return self.now.timestamp()


async def send(settings: Settings, *docs, clock=None) -> list:
    relay = await (Relay.create(settings, clock=clock) if clock is not None else Relay.create(settings))
    try:
        for doc in docs:
            await enqueue(relay, doc)
        return await drain(relay)
    finally:
        await relay.close()


async def ledger_entry(settings: Settings, request_id: str):
    storage = StorageClients(settings)
    try:
        ledger = Ledger(await storage.table(settings.ledger_table), await storage.table(settings.recipient_index_table),
                        settings.recipient_hash_key)
        return await ledger.get(request_id)
    finally:
        await storage.close()


async def suppression_rows(settings: Settings) -> list[dict]:
    storage = StorageClients(settings)
    try:
        table = await storage.table(settings.suppression_table)
        return [dict(row) async for row in table.list_entities()]
    finally:
        await storage.close()


async def with_list(settings: Settings, fn, clock=None):
    storage = StorageClients(settings)
    try:
        suppressions = await SuppressionList.of(storage, settings, clock or time.time)
        return await fn(suppressions)
    finally:
        await storage.close()


def refuse_next_rcpt(emulator, address: str, reply: str = "550 5.1.1") -> None:
    # HVE quotes the recipient in its reply, as Exchange does.
    emulator.fail_next(1, f"{reply} <{address}>: Recipient address rejected: User unknown", stage="RCPT")


# --- what suppresses, what does not (pure) --------------------------------------------------------------


def test_only_a_permanent_refusal_of_the_recipient_at_rcpt_suppresses():
    assert rcpt_reason("550 5.1.1 <x@contoso.com>: User unknown") == "rcpt:550 5.1.1"
    assert rcpt_reason("553 mailbox name not allowed") == "rcpt:553"
    assert rcpt_reason("550 5.7.1 Delivery not authorized") == "rcpt:550 5.7.1"
    # Transient, an account problem, the message or the tenant: never the recipient's fault.
    assert rcpt_reason("451 4.7.0 Temporary server error") is None
    assert rcpt_reason("452 4.5.3 Too many recipients") is None
    assert rcpt_reason("550 5.7.60 SMTP; Client does not have permissions to send as this sender") is None
    assert rcpt_reason("535 5.7.139 Authentication unsuccessful") is None
    assert rcpt_reason("550 5.5.105 External sending is not supported") is None
    assert rcpt_reason("552 5.3.4 Message size exceeds fixed maximum message size") is None


def test_only_trace_failed_with_a_5xx_reason_suppresses():
    reason = "Fail: Reason: [{LED=550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient ***@contoso.com not found}]"
    assert trace_reason("failed", reason) == "trace:5.1.10"
    assert trace_reason("failed", "Fail: 4.4.7 Message delayed, expired") is None  # transient, gave up
    assert trace_reason("failed", "Fail: no code") is None
    for status in ("quarantined", "pending", "gettingStatus", "filteredAsSpam", "delivered", "expanded"):
        assert trace_reason(status, reason) is None, status


def test_suppression_days_is_positive_and_no_longer_than_the_retention():
    assert Settings.from_env({}).suppression_days == 30 and Settings.from_env({}).suppression_enabled
    for days in ("0", "91"):
        with pytest.raises(SettingsError, match="SUPPRESSION_DAYS"):
            Settings.from_env({"SUPPRESSION_DAYS": days})
    assert Settings.from_env({"SUPPRESSION_ENABLED": "false"}).suppression_enabled is False


# --- (1) a 550 at RCPT suppresses; the next request skips that recipient, the others go -----------------


def test_a_550_at_rcpt_suppresses_and_the_next_request_skips_only_that_recipient(storage, emulator):
    settings = relay_settings(storage, emulator)
    refuse_next_rcpt(emulator, GONE)
    [first] = run(send(settings, mail("first", [GONE])))
    assert first.state == "refused"

    [row] = run(suppression_rows(settings))
    assert row["Reason"] == "rcpt:550 5.1.1" and row["Source"] == "first"
    assert row["RowKey"] == recipient_hash(KEY, GONE) and row["PartitionKey"] == row["RowKey"][0]
    expires = row["Expires"].replace(tzinfo=UTC) - row["Last"].replace(tzinfo=UTC)
    assert expires == timedelta(days=30)

    before = len(emulator.accepted())
    [second] = run(send(settings, mail("second", [OTHER, GONE], cc=["cc.person@contoso.com"])))
    assert (second.state, second.reason) == ("sent", "1 recipient(s) suppressed")
    [went] = emulator.accepted()[before:]
    assert sorted(went.recipients) == sorted([OTHER, "cc.person@contoso.com"])  # GONE never reached HVE

    entry = run(ledger_entry(settings, "second"))
    assert entry.suppressed_recipients == (1,) and entry.refused_recipients == ()
    assert entry.internal_recipients == 2  # the recipients that went (GONE is not billed)
    view = request_view(entry, None)
    jsonschema.validate(view, REQUEST_STATUS_SCHEMA)
    assert view["suppressed"] == 1 and view["state"] == "sent"


def test_suppressed_recipients_are_counted_in_the_aggregates_and_the_report(storage, emulator):
    settings = relay_settings(storage, emulator)
    refuse_next_rcpt(emulator, GONE)
    run(send(settings, mail("a", [GONE])))
    run(send(settings, mail("b", [OTHER, GONE]), mail("c", [GONE])))  # the Relay's close flushes the counts

    async def buckets():
        storage_clients = StorageClients(settings)
        try:
            aggregates = Aggregates(storage_clients.tables.get_table_client(settings.aggregates_table))
            now = datetime.now(UTC)
            return await aggregates.read(now - timedelta(hours=2), now + timedelta(hours=1))
        finally:
            await storage_clients.close()

    found = run(buckets())
    counts = sum((b.counts for b in found), start=Counter())
    assert counts["recipients.suppressed"] == 2  # b's GONE and c's GONE
    assert counts["requests.refused"] == 2 and counts["requests.sent"] == 1
    now = datetime.now(UTC)
    doc = shape(found, Window(now - timedelta(hours=2), now + timedelta(hours=1), "hour"))
    assert doc["totals"]["recipients"]["suppressed"] == 2


# --- (2) message trace: failed 5.1.10 suppresses; (7) quarantined and pending do not ---------------------


def test_trace_failed_with_5_1_10_suppresses_and_quarantined_or_pending_do_not(storage, emulator, graph_standin):
    from shared.delivery.trace import DeliveryStore, Reconciler
    from shared.graph import GraphClient, StaticToken

    settings = relay_settings(storage, emulator, **graph_env(graph_standin), DELIVERY_TABLE=f"{storage.table_prefix}dlv",
                              DELIVERY_TRACE_END_LAG="PT0S")
    failed, quarantined, pending = "left.company@contoso.com", "held.message@contoso.com", "slow.mailbox@contoso.com"
    graph_standin.set_outcome(failed, "failed")
    graph_standin.set_outcome(quarantined, "quarantined")
    graph_standin.set_outcome(pending, "pending")
    run(send(settings, mail("traced", [failed, quarantined, pending, OTHER])))
    graph_standin.feed_from(emulator)
    clock = Clock(datetime.now(UTC) + timedelta(seconds=5))
    graph_standin.clock = lambda: clock.now

    async def reconcile():
        storage_clients = StorageClients(settings)
        graph = GraphClient(settings.graph_base_url, StaticToken(graph_standin.token), max_attempts=1)
        try:
            reconciler = Reconciler(
                settings, graph, DeliveryStore(await storage_clients.table(settings.delivery_table), KEY),
                await storage_clients.table(settings.ledger_table), await storage_clients.table(settings.recipient_index_table),
                clock=clock, suppressions=await SuppressionList.of(storage_clients, settings, clock))
            return await reconciler.run()
        finally:
            await graph.close()
            await storage_clients.close()

    tally = run(reconcile())
    assert tally.details == 2  # failed and quarantined asked for their reason
    rows = run(suppression_rows(settings))
    assert [(r["RowKey"], r["Reason"], r["Source"]) for r in rows] == [(recipient_hash(KEY, failed), "trace:5.1.10", "traced")]

    before = len(emulator.accepted())
    [again] = run(send(settings, mail("again", [failed, quarantined, pending])))
    assert (again.state, again.reason) == ("sent", "1 recipient(s) suppressed")
    assert sorted(emulator.accepted()[before].recipients) == sorted([quarantined, pending])


# --- (3) all suppressed: refused all-suppressed, nothing reaches HVE ----------------------------------


def test_a_request_whose_recipients_are_all_suppressed_is_refused_and_nothing_reaches_hve(storage, emulator):
    settings = relay_settings(storage, emulator)
    refuse_next_rcpt(emulator, GONE)
    run(send(settings, mail("first", [GONE])))
    run(with_list(settings, lambda s: s.add("Also.Gone@Contoso.com", "admin", "admin")))
    before, connections = len(emulator.accepted()), emulator.connections_opened

    [handled] = run(send(settings, mail("nobody", [GONE, "also.gone@contoso.com"], bcc=[f"Gone <{GONE.upper()}>"])))
    # The envelope keeps differently cased addresses apart (3 recipients); the hash is of the lower case.
    assert handled.state == "refused" and handled.reason.startswith("all-suppressed: all 3 recipient(s)")
    assert len(emulator.accepted()) == before and emulator.connections_opened == connections
    entry = run(ledger_entry(settings, "nobody"))
    assert entry.state == "refused" and entry.suppressed_recipients == (0, 1, 2) and entry.attempts == 0
    assert request_view(entry, None)["suppressed"] == 3


def test_with_suppression_off_nothing_is_looked_up_or_added(storage, emulator):
    settings = relay_settings(storage, emulator, SUPPRESSION_ENABLED="false")
    refuse_next_rcpt(emulator, GONE)
    run(send(settings, mail("first", [GONE])))
    [second] = run(send(settings, mail("second", [GONE, OTHER])))
    assert second.state == "sent" and second.reason == ""
    assert run(suppression_rows(settings)) == []


# --- (4) expiry after SUPPRESSION_DAYS, on an injected clock ---------------------------------------------


def test_a_suppression_ends_after_suppression_days_and_the_retention_job_purges_it(storage, emulator):
    settings = relay_settings(storage, emulator, SUPPRESSION_DAYS="2")
    start = datetime.now(UTC)
    refuse_next_rcpt(emulator, GONE)
    run(send(settings, mail("first", [GONE]), clock=Clock(start)))

    # A day later: still suppressed. Two days and a minute later: mailed again.
    [held] = run(send(settings, mail("day-1", [GONE]), clock=Clock(start + timedelta(days=1))))
    assert held.reason.startswith("all-suppressed")
    [went] = run(send(settings, mail("day-2", [GONE]), clock=Clock(start + timedelta(days=2, minutes=1))))
    assert (went.state, went.reason) == ("sent", "")
    assert run(with_list(settings, lambda s: s.check(GONE), clock=Clock(start + timedelta(days=2, minutes=1)))) is None

    async def purge(now: datetime):
        storage_clients = StorageClients(settings)
        try:
            ledger_table = await storage_clients.table(settings.ledger_table)
            index_table = await storage_clients.table(settings.recipient_index_table)
            return await purge_expired(
                ledger=Ledger(ledger_table, index_table, KEY), ledger_table=ledger_table, index_table=index_table,
                welcome_table=None, now=now, retention=timedelta(days=90), lost_after=timedelta(days=1), max_rows=100,
                suppression_table=await storage_clients.table(settings.suppression_table))
        finally:
            await storage_clients.close()

    assert run(purge(start + timedelta(days=1))).deleted["suppression"] == 0
    assert len(run(suppression_rows(settings))) == 1
    assert run(purge(start + timedelta(days=2, minutes=1))).deleted["suppression"] == 1
    assert run(suppression_rows(settings)) == []


# --- (7) transient replies at RCPT never suppress ------------------------------------------------------------


def test_a_4xx_at_rcpt_defers_the_recipient_and_never_suppresses_it(storage, emulator):
    settings = relay_settings(storage, emulator)
    emulator.fail_next(1, f"451 4.7.0 <{GONE}> try again later", stage="RCPT")
    results = run(send(settings, mail("busy", [GONE])))
    assert [h.state for h in results] == ["deferred", "sent"]
    assert run(suppression_rows(settings)) == []


# --- cost: one batched lookup per request, and a short-lived snapshot --------------------------------------


def test_a_short_list_is_one_query_for_every_partition_and_a_snapshot_serves_later_requests(storage, emulator):
    settings = relay_settings(storage, emulator)
    recipients = [f"user{i}@contoso.com" for i in range(40)]
    clock = Clock()

    async def main():
        storage_clients = StorageClients(settings)
        try:
            suppressions = await SuppressionList.of(storage_clients, settings, clock)
            await suppressions.add(recipients[3], "admin", "admin")
            await suppressions.add(recipients[7], "admin", "admin")
            partitions = {recipient_hash(KEY, a)[0] for a in recipients}
            found = await asyncio.gather(*(suppressions.suppressed(recipients) for _ in range(5)))
            first_reads = suppressions.reads
            again = await suppressions.suppressed(recipients[:10])
            cached_reads = suppressions.reads
            clock.now += timedelta(seconds=61)  # SUPPRESSION_CACHE_SECONDS later: read again
            await suppressions.suppressed(recipients[:1])
            return partitions, found, first_reads, again, cached_reads, suppressions.reads
        finally:
            await storage_clients.close()

    partitions, found, first_reads, again, cached_reads, last_reads = run(main())
    assert len(partitions) > 5  # the 40 recipients fall in many partitions
    assert all(sorted(f) == sorted([recipients[3], recipients[7]]) for f in found)
    assert sorted(again) == sorted([recipients[3], recipients[7]])
    assert first_reads == 1  # five concurrent lookups of 40 recipients: one query of the whole list
    assert cached_reads == 1 and last_reads == 2


def test_a_long_list_is_read_per_partition_the_recipients_fall_in(storage, emulator):
    settings = relay_settings(storage, emulator)
    clock = Clock()
    suppressed = [f"gone{i}@contoso.com" for i in range(6)]
    wanted = "user1@contoso.com"

    async def main():
        storage_clients = StorageClients(settings)
        try:
            table = await storage_clients.table(settings.suppression_table)
            writer = SuppressionList(table, KEY, clock=clock)
            for address in suppressed:
                await writer.add(address, "admin", "admin")
            # A list longer than a whole-list read may be (here 5 rows, in deployment a page):
            reader = SuppressionList(table, KEY, clock=clock, whole_list_rows=5)
            first = await reader.suppressed([suppressed[0], wanted])
            whole_after_first, reads_after_first = reader.whole, reader.reads
            clock.now += timedelta(seconds=61)
            second = await reader.suppressed([suppressed[0], wanted])
            return first, second, whole_after_first, reads_after_first, reader.reads
        finally:
            await storage_clients.close()

    first, second, whole_after_first, reads_after_first, reads = run(main())
    partitions = {recipient_hash(KEY, a)[0] for a in (suppressed[0], wanted)}
    assert list(first) == [suppressed[0]] and list(second) == [suppressed[0]]
    assert (whole_after_first, reads_after_first) == (False, 1)  # the whole read found 6 rows: per partition from now
    assert reads == 1 + len(partitions)


def test_an_added_suppression_bites_at_once_in_the_process_that_added_it(storage, emulator):
    settings = relay_settings(storage, emulator)

    async def main():
        storage_clients = StorageClients(settings)
        try:
            suppressions = await SuppressionList.of(storage_clients, settings)
            assert await suppressions.suppressed([GONE]) == {}
            await suppressions.add(GONE, "admin", "admin")
            now_suppressed = list(await suppressions.suppressed([GONE]))
            await suppressions.remove(GONE)
            return now_suppressed, await suppressions.suppressed([GONE]), suppressions.reads
        finally:
            await storage_clients.close()

    assert run(main()) == ([GONE], {}, 1)


# --- (5) admin: the CLI and the HTTP routes ----------------------------------------------------------------


def test_the_cli_adds_checks_lists_and_removes_without_printing_the_address(storage, emulator, capsys, monkeypatch):
    from tools import suppression as cli

    settings = relay_settings(storage, emulator)
    env = storage.env(RECIPIENT_HASH_KEY="test-hash-key")
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def call(*args: str) -> dict:
        assert cli.main([*args, "--json", "--settings", "/nonexistent.json"]) == 0
        out = capsys.readouterr().out
        assert "gone.mailbox" not in out.lower()
        return json.loads(out)

    assert call("check", GONE) == {"suppressed": False, "reason": None, "until": None}
    added = call("add", f"Gone Mailbox <{GONE}>")
    assert added["added"] and added["reason"] == "admin" and added["source"] == "admin"
    checked = call("check", GONE.upper())
    assert (checked["suppressed"], checked["reason"], checked["until"]) == (True, "admin", added["until"])
    listed = call("list")
    assert listed["count"] == 1 and listed["suppressions"][0]["hash"] == recipient_hash(KEY, GONE)[:16]
    # The send stage sees it.
    [handled] = run(send(settings, mail("after-add", [GONE])))
    assert handled.reason.startswith("all-suppressed")
    assert call("remove", GONE) == {"removed": True, "suppressed": False}
    assert call("remove", GONE) == {"removed": False, "suppressed": False}
    assert call("list") == {"suppressions": [], "count": 0}
    with pytest.raises(SystemExit):  # refused before anything is read, never echoed
        cli.main(["check", "not an address", "--settings", "/nonexistent.json"])


def test_the_http_routes_check_and_remove_with_the_address_only_in_the_body(storage, emulator):
    from tests.test_function_app import FAST_HOST, app_settings, close_app_relays
    from tests.test_http_api import call
    from tools.devhost import DevHost

    settings = app_settings(storage, emulator)
    run(with_list(Settings.from_env(settings), lambda s: s.add(GONE, "rcpt:550 5.1.1", "req-1")))
    bodies = {
        "check": json.dumps({"address": GONE}).encode(),
        "named": json.dumps({"address": f"Gone <{GONE.upper()}>"}).encode(),
        "other": json.dumps({"address": OTHER}).encode(),
        "bad": json.dumps({"address": "not an address"}).encode(),
        "extra": json.dumps({"address": GONE, "more": 1}).encode(),
        "junk": b"{not json",
    }
    for name in ("check", "named", "other"):
        jsonschema.validate(json.loads(bodies[name]), REQUEST_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(bodies["extra"]), REQUEST_SCHEMA)
    answers = {}
    try:
        with DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, http_port=0,
                     functions=["suppression_check", "suppression_remove"]) as host:
            port = host.http_port
            for name, body in bodies.items():
                answers[name] = call(port, "POST", "/api/suppressions/check", body)
            answers["remove"] = call(port, "POST", "/api/suppressions/remove", bodies["check"])
            answers["after"] = call(port, "POST", "/api/suppressions/check", bodies["check"])
            answers["remove-again"] = call(port, "POST", "/api/suppressions/remove", bodies["check"])
            answers["get"] = call(port, "GET", f"/api/suppressions/check?address={GONE}")
    finally:
        close_app_relays()

    code, headers, doc = answers["check"]
    assert code == 200 and headers["Cache-Control"] == "no-store"
    assert doc["suppressed"] is True and doc["reason"] == "rcpt:550 5.1.1" and doc["until"].endswith("Z")
    assert answers["named"][2] == doc
    assert answers["other"][::2] == (200, {"suppressed": False, "reason": None, "until": None})
    assert answers["remove"][::2] == (200, {"removed": True, "suppressed": False, "reason": None, "until": None})
    assert answers["after"][::2] == answers["other"][::2]
    assert answers["remove-again"][2]["removed"] is False
    for name in ("check", "named", "other", "remove", "after", "remove-again"):
        jsonschema.validate(answers[name][2], ANSWER_SCHEMA)
    for name in ("bad", "extra", "junk"):
        code, _, doc = answers[name]
        assert code == 400 and doc["error"] == "bad-request", name
        jsonschema.validate(doc, ERROR_SCHEMA)
    assert answers["get"][0] in (404, 405)  # POST only: an address never rides in a URL
    for name, (_, _, doc) in answers.items():
        assert "gone.mailbox" not in (doc.decode() if isinstance(doc, bytes) else json.dumps(doc)).lower(), name


# --- (6) no address at rest: the table and the logs hold hashes and codes only ---------------------------


def test_no_address_in_the_suppression_table_or_the_logs(storage, emulator):
    settings = relay_settings(storage, emulator)
    handler = Everything()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        refuse_next_rcpt(emulator, GONE)
        run(send(settings, mail("first", [GONE])))
        run(send(settings, mail("second", [GONE, OTHER])))
        run(with_list(settings, lambda s: s.add("admin.added@contoso.com", "admin", "admin")))
        run(with_list(settings, lambda s: s.remove("admin.added@contoso.com")))
        run(with_list(settings, lambda s: s.check(GONE)))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)

    rows = run(suppression_rows(settings))
    assert len(rows) == 1
    needles = ["gone.mailbox", "admin.added", "still.here"]
    stored = json.dumps(rows, default=str).lower()
    assert [n for n in needles if n in stored] == []
    logged = "\n".join(handler.lines).lower()
    assert "suppressed until" in logged  # the suppression was logged, by reason and source
    assert [n for n in needles if n in logged] == []


# --- a request held for its sendAt is looked up when it is due, not when it is held ------------------------


def test_a_scheduled_request_is_looked_up_when_due_so_a_suppression_lifted_meanwhile_does_not_refuse_it(
        storage, emulator):
    settings = relay_settings(storage, emulator)
    due = datetime.now(UTC) + timedelta(seconds=3)

    async def main():
        relay = await Relay.create(settings)
        try:
            suppressions = await relay.preparer.suppression_list()
            assert suppressions is not None
            await suppressions.add(GONE, "admin", "admin")
            await enqueue(relay, mail("later", [GONE], sendAt=due.strftime("%Y-%m-%dT%H:%M:%SZ")))
            held = []
            async for msg in relay.queue.receive_messages(messages_per_page=1, visibility_timeout=60):
                held.append(await relay.handle(msg.content, msg.id, msg.dequeue_count))
                await relay.queue.delete_message(msg)
                break
            await suppressions.remove(GONE)  # lifted before it is due
            return held, await drain(relay)
        finally:
            await relay.close()

    held, rest = run(main())
    assert [(h.state, h.reason) for h in held] == [("deferred", "scheduled")]
    assert [(h.state, h.reason) for h in rest][-1] == ("sent", "")
    assert run(ledger_entry(settings, "later")).suppressed_recipients == ()


# --- the priority lane skips the same recipients, from the process's one list --------------------------------


def test_the_priority_lane_skips_suppressed_recipients_from_the_same_list(storage, emulator, monkeypatch):
    from shared import wiring
    from tests.test_function_app import app_settings
    from tests.test_priority_lane import handle_one, use_settings
    from tests.test_priority_lane import run as run_wired

    use_settings(monkeypatch, app_settings(storage, emulator))

    async def scenario():
        bulk, priority = await wiring.get_lane("bulk"), await wiring.get_lane("priority")
        assert priority.preparer.suppressions is bulk.preparer.suppressions is not None
        refuse_next_rcpt(emulator, GONE)
        await bulk.queue.send_message(json.dumps(mail("bulk-1", [GONE])))
        first = await handle_one("bulk")
        await priority.queue.send_message(json.dumps(mail("urgent-1", [GONE, OTHER])))
        return first, await handle_one("priority")

    first, urgent = run_wired(scenario())
    assert first.state == "refused"
    assert (urgent.state, urgent.reason) == ("sent", "1 recipient(s) suppressed")
    assert emulator.accepted()[-1].recipients == (OTHER,)
