"""Outcome events: CloudEvents on EVENTS_QUEUE and an Event Grid topic when a request
becomes final and when its delivery counts change; at least once, never lost on a crash between the
ledger write and the publish, the same id on every copy.

Real peers only: the send stage against Azurite and the HVE emulator, the delivery trace against the
Graph stand-in, the Event Grid stand-in over HTTPS with tokens from the managed-identity stand-in.
Faults come from tools.fault_proxy (in front of Azurite's queue service) and the Event Grid stand-in;
a "crash" is the invocation cancelled while its publish hangs, as a process dying there would leave it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from shared.delivery.trace import DeliveryStore, reconcile
from shared.events import EVENT_GRID_API_VERSION, topic_url
from shared.graph import GraphClient, StaticToken
from shared.ledger import LedgerEntry
from shared.reporting.events import PUBLISH_ATTEMPTS, event_id, outcome_event
from shared.send.events import EventsNotPublished
from shared.send.stage import Relay
from shared.storage import StorageClients
from tests.fixtures_graph import graph_env, graph_standin  # noqa: F401  (fixture)
from tests.relay_harness import enqueue, relay_settings
from tests.schemas import event_validator
from tests.test_no_addresses import BAD, EXTERNAL, REFUSED_BY_HVE, SENT_TO, leaks
from tools.azurite import connection_string
from tools.eventgrid_standin import EVENT_GRID_RESOURCE, EventGridStandIn
from tools.fault_proxy import Fault, FaultProxy
from tools.msi_standin import MsiStandIn

ROOT = Path(__file__).resolve().parents[1]
CLIENT_ID = "5b0c3a7e-9d41-4f2a-8c6e-1f7d2e9a4b30"
VALIDATOR = event_validator()


def run(coro):
    return asyncio.run(coro)


def mail(request_id, to, **extra):
    return {"id": request_id, "to": to, "subject": "Quarterly update", "text": "Hello", **extra}


def events_queue(storage) -> str:
    return f"events-{storage.suffix}"


def with_events(storage, emulator, **more):
    return relay_settings(storage, emulator, EVENTS_QUEUE=events_queue(storage), EVENTS_SOURCE="contoso-relay", **more)


async def deliver(relay: Relay, *, visibility: int = 2, timeout: float = 60.0, kill_after: float | None = None):
    """Like the Functions host: receive, handle, delete on success; a failed invocation (or one
    killed after `kill_after` seconds) leaves its message to come back after `visibility` seconds,
    with its dequeue count up by one. [(dequeue count, state or "failed"/"killed"), ...]"""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = False
        async for msg in relay.queue.receive_messages(messages_per_page=16, visibility_timeout=visibility):
            got = True
            try:
                handled = await asyncio.wait_for(relay.handle(msg.content, msg.id, msg.dequeue_count), kill_after)
            except EventsNotPublished:
                seen.append((msg.dequeue_count, "failed"))
                continue
            except TimeoutError:
                seen.append((msg.dequeue_count, "killed"))
                continue
            seen.append((msg.dequeue_count, handled.state))
            await relay.queue.delete_message(msg)
        if not got:
            if (await relay.queue.get_queue_properties()).approximate_message_count == 0:
                return seen
            await asyncio.sleep(0.2)
    raise AssertionError(f"queue not drained in {timeout}s: {seen}")


async def read_events(settings) -> list[dict]:
    """Every event on EVENTS_QUEUE (taken off it), each parsed from its message text."""
    clients = StorageClients(settings)
    try:
        queue = await clients.queue(settings.events_queue)
        found = []
        while True:
            batch = [m async for m in queue.receive_messages(messages_per_page=32, visibility_timeout=30)]
            if not batch:
                return found
            for m in batch:
                found.append(json.loads(m.content))
                await queue.delete_message(m)
    finally:
        await clients.close()


def by_subject(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in events:
        out.setdefault(e["subject"], []).append(e)
    return out


# --- policy ------------------------------------------------------------------------------------------


def _entry(state: str, **more) -> LedgerEntry:
    at = datetime(2026, 3, 1, 9, 30, tzinfo=timezone.utc)
    return LedgerEntry("req-1", state, at - timedelta(seconds=4), at, attempts=1, account="news@contoso.com", **more)


def test_an_outcome_event_is_a_cloudevent_whose_id_is_the_same_for_every_copy_and_differs_per_state():
    sent = outcome_event(_entry("sent", last_code=250), "/hve-relay/x")
    assert sent == outcome_event(_entry("sent", last_code=250), "/hve-relay/x")
    assert sent["id"] == event_id("req-1", "sent") != outcome_event(_entry("dead"), "/hve-relay/x")["id"]
    assert event_id("req-1", "sent") != event_id("req-2", "sent")
    assert (sent["type"], sent["subject"], sent["time"]) == ("hve-relay.request.sent", "req-1", "2026-03-01T09:30:00Z")
    assert sent["data"]["state"] == "sent" and sent["data"]["delivery"] == {}
    VALIDATOR.validate(sent)
    assert outcome_event(_entry("deferred"), "/hve-relay/x") is None and outcome_event(_entry("sending"), "/x") is None


def test_an_outcome_event_says_what_the_ledger_holds_with_hve_replies_masked():
    """The entry the send stage holds after its write still has HVE's reply as it came; the event
    carries it as the row does (an address in it masked), so every copy is the same."""
    reason = "refused by HVE: 550 5.1.1 <carol.private@contoso.com>: User unknown"
    event = outcome_event(_entry("refused", reason=reason), "/hve-relay/x")
    assert event["data"]["reason"] == "refused by HVE: 550 5.1.1 <***@contoso.com>: User unknown"
    assert outcome_event(_entry("refused", reason=event["data"]["reason"]), "/hve-relay/x") == event


def test_publish_attempts_are_the_queue_triggers_max_dequeue_count():
    """The last delivery of a message whose event cannot be published drops the event and returns:
    the host would otherwise move the message (of a request already final) to the poison queue."""
    host = json.loads((ROOT / "host.json").read_text())
    assert PUBLISH_ATTEMPTS == host["extensions"]["queues"]["maxDequeueCount"]


def test_the_topic_url_is_the_cloudevents_publish_path_with_its_api_version():
    want = f"https://t.westeurope-1.eventgrid.azure.net/api/events?api-version={EVENT_GRID_API_VERSION}"
    assert topic_url("https://t.westeurope-1.eventgrid.azure.net/api/events") == want
    assert topic_url("https://t.westeurope-1.eventgrid.azure.net/") == want
    with pytest.raises(ValueError):
        topic_url("http://t.westeurope-1.eventgrid.azure.net/api/events")


# --- the queue target, end to end --------------------------------------------------------------------


def test_sent_refused_and_dead_requests_each_publish_their_event_on_the_events_queue_without_an_address(
        storage, emulator, caplog):
    settings = with_events(storage, emulator, SEND_MAX_ATTEMPTS="1")
    caplog.set_level(logging.DEBUG)

    async def main():
        relay = await Relay.create(settings)
        try:
            await enqueue(relay, mail("ev-sent", SENT_TO, category="news"))
            await enqueue(relay, mail("ev-external", [EXTERNAL]))                  # refused by the contract
            await enqueue(relay, mail("ev-bad", ["ann.privatename@contoso.com", BAD]))
            await enqueue(relay, b'{"to": ["' + BAD.encode() + b'"], "text": ')    # unreadable
            await deliver(relay)
            emulator.fail_next(1, f"550 5.1.1 <{REFUSED_BY_HVE}>: Recipient address rejected: User unknown")
            await enqueue(relay, mail("ev-refused-by-hve", [REFUSED_BY_HVE]))
            await deliver(relay)
            emulator.fail_next(1, "451 4.7.0 Temporary server error")
            await enqueue(relay, mail("ev-dead", ["dana.retry@contoso.com"]))   # one attempt allowed: dead
            await deliver(relay)
            return await read_events(settings)
        finally:
            await relay.close()

    events = run(main())
    for event in events:
        VALIDATOR.validate(event)
    subjects = by_subject(events)
    assert {s: [e["type"].rsplit(".", 1)[1] for e in evs] for s, evs in subjects.items() if s.startswith("ev-")} == {
        "ev-sent": ["sent"], "ev-external": ["refused"], "ev-bad": ["refused"], "ev-refused-by-hve": ["refused"],
        "ev-dead": ["dead"]}
    [unreadable] = [evs for s, evs in subjects.items() if not s.startswith("ev-")]
    assert unreadable[0]["type"] == "hve-relay.request.refused" and unreadable[0]["data"]["reason"].startswith("malformed")
    sent = subjects["ev-sent"][0]
    assert sent["source"] == "/hve-relay/contoso-relay" and sent["datacontenttype"] == "application/json"
    assert sent["id"] == event_id("ev-sent", "sent") and sent["data"]["id"] == "ev-sent"
    assert sent["data"]["final_at"] == sent["time"] and sent["data"]["last_code"] == 250
    assert subjects["ev-refused-by-hve"][0]["data"]["reason"].startswith("refused by HVE: 550")
    assert subjects["ev-dead"][0]["data"]["reason"].startswith("gave up after 1 attempts")
    assert leaks(json.dumps(events)) == []
    assert [r.getMessage() for r in caplog.records if r.name == "hve_relay.events" and leaks(r.getMessage())] == []


def test_a_duplicate_delivery_publishes_the_event_again_with_the_same_id(storage, emulator):
    settings = with_events(storage, emulator)

    async def main():
        relay = await Relay.create(settings)
        try:
            await enqueue(relay, mail("dup-1", ["ann@contoso.com"]))
            first = await deliver(relay)
            await enqueue(relay, mail("dup-1", ["ann@contoso.com"]))   # the producer sends it again
            second = await deliver(relay)
            return first, second, await read_events(settings)
        finally:
            await relay.close()

    first, second, events = run(main())
    assert (first, second) == ([(1, "sent")], [(1, "duplicate")])
    assert len(emulator.messages()) == 1
    assert [e["id"] for e in events] == [event_id("dup-1", "sent")] * 2 and events[0] == events[1]


def test_with_no_events_target_nothing_is_published_and_no_events_queue_is_made(storage, emulator):
    settings = relay_settings(storage, emulator)

    async def main():
        relay = await Relay.create(settings)
        try:
            assert not relay.events.publisher.enabled
            await enqueue(relay, mail("quiet-1", ["ann@contoso.com"]))
            assert await deliver(relay) == [(1, "sent")]
            names = [q.name async for q in relay.storage.queues.list_queues()]
            return names
        finally:
            await relay.close()

    assert events_queue(storage) not in run(main())


# --- at least once: a crash or a failure between the ledger write and the publish -------------------


def _queue_proxy_settings(settings, azurite, proxy):
    conn = connection_string(azurite.blob_port, proxy.port, azurite.table_port)
    return dataclasses.replace(settings, storage_connection_string=conn)


def test_a_process_killed_between_the_ledger_write_and_the_publish_publishes_the_event_on_redelivery(
        azurite, storage, emulator):
    """The events queue stalls: the invocation is killed after the final row is written, while its
    publish hangs. Its queue message comes back; that delivery finds the row final, sends nothing and
    publishes the event, with the id the lost one had."""
    settings = with_events(storage, emulator)
    stalled = {"on": True}

    def rule(method: str, path: str):
        if stalled["on"] and method == "POST" and f"/{events_queue(storage)}/messages" in path:
            return Fault(stall=True)
        return None

    async def main():
        with FaultProxy(azurite.queue_port, rule=rule) as proxy:
            relay = await Relay.create(_queue_proxy_settings(settings, azurite, proxy))
            try:
                await enqueue(relay, mail("crash-1", ["ann@contoso.com"]))
                seen: list = []
                async for msg in relay.queue.receive_messages(max_messages=1, visibility_timeout=2):
                    try:
                        await asyncio.wait_for(relay.handle(msg.content, msg.id, msg.dequeue_count), 3.0)
                    except TimeoutError:
                        seen.append((msg.dequeue_count, "killed"))
                row = await relay.ledger.get("crash-1")
            finally:
                await relay.close()
        stalled["on"] = False
        relay = await Relay.create(settings)   # another instance picks the message up
        try:
            seen += await deliver(relay)
            return seen, row, await read_events(settings)
        finally:
            await relay.close()

    seen, row, events = run(main())
    assert row.state == "sent"                                        # the ledger write had happened
    assert seen == [(1, "killed"), (2, "duplicate")]
    assert len(emulator.messages()) == 1                              # sent once
    assert [e["id"] for e in events] == [event_id("crash-1", "sent")]
    assert events[0]["time"] == events[0]["data"]["final_at"] == row.updated.isoformat().replace("+00:00", "Z")


def test_a_publish_that_fails_leaves_the_message_for_redelivery_which_publishes_once_per_event_id(
        azurite, storage, emulator):
    """The events queue refuses the first two publishes (403: the identity lost its role on it). The
    mail is sent and recorded once; the message comes back until the event is taken."""
    settings = with_events(storage, emulator)
    refusals = {"left": 2}

    def rule(method: str, path: str):
        if method == "POST" and f"/{events_queue(storage)}/messages" in path and refusals["left"] > 0:
            refusals["left"] -= 1
            return Fault(403)
        return None

    async def main():
        with FaultProxy(azurite.queue_port, rule=rule) as proxy:
            relay = await Relay.create(_queue_proxy_settings(settings, azurite, proxy))
            try:
                await enqueue(relay, mail("fail-1", ["ann@contoso.com"]))
                seen = await deliver(relay)
                return seen, await relay.ledger.get("fail-1"), await read_events(settings)
            finally:
                await relay.close()

    seen, row, events = run(main())
    assert seen == [(1, "failed"), (2, "failed"), (3, "duplicate")]
    assert row.state == "sent" and row.attempts == 1 and len(emulator.messages()) == 1
    assert [e["id"] for e in events] == [event_id("fail-1", "sent")]


def test_an_events_target_that_never_takes_the_event_drops_it_on_the_last_delivery_and_mail_goes_on(
        azurite, storage, emulator, caplog):
    settings = with_events(storage, emulator)

    def rule(method: str, path: str):
        return Fault(403) if method == "POST" and f"/{events_queue(storage)}/messages" in path else None

    async def main():
        with FaultProxy(azurite.queue_port, rule=rule) as proxy:
            relay = await Relay.create(_queue_proxy_settings(settings, azurite, proxy))
            try:
                await enqueue(relay, mail("never-1", ["ann@contoso.com"]))
                seen = await deliver(relay, visibility=1)
                poison = await relay.storage.queue(settings.poison_queue)
                return seen, (await poison.get_queue_properties()).approximate_message_count
            finally:
                await relay.close()

    caplog.set_level(logging.WARNING, logger="hve_relay.events")
    seen, poisoned = run(main())
    assert seen == [(1, "failed"), (2, "failed"), (3, "failed"), (4, "failed"), (5, "duplicate")]
    assert poisoned == 0 and len(emulator.messages()) == 1
    dropped = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(dropped) == 1 and "dropped after 5 deliveries" in dropped[0].getMessage()


# --- delivery events, from the Graph stand-in's message trace -----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(timezone.utc) + timedelta(seconds=2)

    def __call__(self) -> float:
        return self.now.timestamp()


def _trace(settings, standin, clock, storage_conn: str | None = None):
    async def main():
        graph = GraphClient(settings.graph_base_url, StaticToken(standin.token), max_attempts=1)
        try:
            s = settings if storage_conn is None else dataclasses.replace(settings, storage_connection_string=storage_conn)
            return await reconcile(s, graph=graph, clock=clock)
        finally:
            await graph.close()
    return run(main())


def _trace_settings(storage, emulator, standin, **more):
    return with_events(storage, emulator, **{**graph_env(standin), "DELIVERY_TABLE": f"{storage.table_prefix}dlv",
                                             "DELIVERY_TRACE_END_LAG": "PT0S", **more})


def _send(settings, *docs):
    async def main():
        relay = await Relay.create(settings)
        try:
            for doc in docs:
                await enqueue(relay, doc)
            return await deliver(relay)
        finally:
            await relay.close()
    return run(main())


def test_a_delivery_change_from_message_trace_publishes_a_delivery_event_per_counts_version(
        storage, emulator, graph_standin):
    settings = _trace_settings(storage, emulator, graph_standin)
    _send(settings, mail("dlv-1", ["slow@contoso.com", "fast@contoso.com"], category="news"))
    graph_standin.set_outcome("slow@contoso.com", [["pending", 0], ["delivered", 600]])
    graph_standin.feed_from(emulator)
    clock = Clock()
    graph_standin.clock = lambda: clock.now
    assert [e["type"] for e in run(read_events(settings))] == ["hve-relay.request.sent"]
    _trace(settings, graph_standin, clock)
    clock.now += timedelta(minutes=5)
    _trace(settings, graph_standin, clock)                             # nothing changed: no event
    clock.now += timedelta(minutes=6)
    _trace(settings, graph_standin, clock)
    events = run(read_events(settings))
    for event in events:
        VALIDATOR.validate(event)
    assert [e["type"] for e in events] == ["hve-relay.request.delivery"] * 2
    assert [e["id"] for e in events] == [event_id("dlv-1", "delivery-1"), event_id("dlv-1", "delivery-2")]
    assert [e["data"]["delivery"] for e in events] == [{"delivered": 1, "pending": 1}, {"delivered": 2}]
    assert events[0]["subject"] == "dlv-1" and events[0]["data"]["state"] == "sent"
    assert leaks(json.dumps(events)) == [] and "slow@" not in json.dumps(events)


def test_a_trace_run_whose_delivery_events_fail_stops_before_its_cursor_and_the_next_run_publishes_them(
        azurite, storage, emulator, graph_standin):
    settings = _trace_settings(storage, emulator, graph_standin)
    _send(settings, mail("dlv-crash", ["ann@contoso.com"]))
    run(read_events(settings))                                          # the sent event
    graph_standin.feed_from(emulator)
    clock = Clock()
    graph_standin.clock = lambda: clock.now

    def rule(method: str, path: str):
        return Fault(403) if method == "POST" and f"/{events_queue(storage)}/messages" in path else None

    with FaultProxy(azurite.queue_port, rule=rule) as proxy:
        first = _trace(settings, graph_standin, clock, connection_string(azurite.blob_port, proxy.port, azurite.table_port))
    assert first.stopped.startswith("error: the events target did not take delivery events"), first
    assert run(read_events(settings)) == []

    async def summary():
        clients = StorageClients(settings)
        try:
            return await DeliveryStore(await clients.table(settings.delivery_table), b"test-hash-key").summary("dlv-crash")
        finally:
            await clients.close()

    assert run(summary())["delivery"] == {"delivered": 1}               # the counts were committed
    second = _trace(settings, graph_standin, clock)
    assert not second.stopped and second.changed_requests == 0          # nothing new: the same version
    third = _trace(settings, graph_standin, clock)
    events = run(read_events(settings))
    assert [e["id"] for e in events] == [event_id("dlv-crash", "delivery-1")] and not third.stopped
    assert events[0]["data"]["delivery"] == {"delivered": 1}


# --- the Event Grid topic, with the managed identity's token ------------------------------------------


@pytest.fixture
def msi(monkeypatch):
    with MsiStandIn(assigned_client_ids=[CLIENT_ID]) as standin:
        for name, value in standin.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("IDENTITY_SERVER_THUMBPRINT", raising=False)
        yield standin


@pytest.fixture
def topic(msi):
    with EventGridStandIn(issuer=msi) as standin:
        yield standin


def _topic_settings(storage, emulator, topic, **more):
    return relay_settings(storage, emulator, AZURE_CLIENT_ID=CLIENT_ID, EVENTS_TOPIC_ENDPOINT=topic.endpoint,
                          EVENTS_CA_FILE=str(topic.ca_file), WEBSITE_SITE_NAME="func-abc123", **more)


def test_events_reach_the_event_grid_topic_as_a_cloudevents_batch_with_the_managed_identitys_token(
        storage, emulator, msi, topic):
    settings = _topic_settings(storage, emulator, topic)

    async def main():
        relay = await Relay.create(settings)
        try:
            await enqueue(relay, mail("eg-1", ["ann@contoso.com"]))
            await enqueue(relay, mail("eg-2", [EXTERNAL]))
            return await deliver(relay)
        finally:
            await relay.close()

    seen = run(main())
    assert sorted(s for _, s in seen) == ["refused", "sent"]
    events = topic.events
    for event in events:
        VALIDATOR.validate(event)
    assert {e["subject"]: e["type"] for e in events} == {"eg-1": "hve-relay.request.sent",
                                                         "eg-2": "hve-relay.request.refused"}
    assert {e["source"] for e in events} == {"/hve-relay/func-abc123"}    # the app's name
    assert [(r.status, r.identity, r.query["api-version"], r.content_type) for r in topic.requests] == [
        (200, CLIENT_ID, "2018-01-01", "application/cloudevents-batch+json; charset=utf-8")] * 2
    assert {(t.resource, t.client_id) for t in msi.issued} == {(EVENT_GRID_RESOURCE, CLIENT_ID)}
    assert leaks(json.dumps(events)) == []


def test_a_topic_answering_503_gets_the_event_on_redelivery_and_a_hung_one_after_the_kill(
        storage, emulator, msi, topic):
    settings = _topic_settings(storage, emulator, topic)

    async def main():
        relay = await Relay.create(settings)
        try:
            topic.fail_next(1, 503)
            await enqueue(relay, mail("eg-503", ["ann@contoso.com"]))
            unavailable = await deliver(relay)
            topic.hang_next(1)
            await enqueue(relay, mail("eg-hang", ["bob@contoso.com"]))
            hung = await deliver(relay, kill_after=3.0)
            return unavailable, hung
        finally:
            await relay.close()

    unavailable, hung = run(main())
    assert unavailable == [(1, "failed"), (2, "duplicate")]
    assert hung == [(1, "killed"), (2, "duplicate")]
    assert [e["id"] for e in topic.events] == [event_id("eg-503", "sent"), event_id("eg-hang", "sent")]
    assert [r.status for r in topic.requests if r.status != 200] == [503]
    assert len(emulator.messages()) == 2


def test_a_token_for_another_resource_is_refused_by_the_topic_stand_in(msi, topic):
    """The stand-in checks what Event Grid checks: the token's audience."""
    import aiohttp

    msi.set_token("https://vault.azure.net", "vault-token")

    async def main():
        from azure.identity.aio import ManagedIdentityCredential

        async with ManagedIdentityCredential(client_id=CLIENT_ID) as credential:
            token = (await credential.get_token("https://vault.azure.net/.default")).token
        import ssl
        ctx = ssl.create_default_context(cafile=str(topic.ca_file))
        async with aiohttp.ClientSession() as session:
            async with session.post(topic_url(topic.endpoint), data=b"[]", ssl=ctx, headers={
                    "Authorization": f"Bearer {token}",
                    "Content-Type": "application/cloudevents-batch+json; charset=utf-8"}) as resp:
                return resp.status

    assert run(main()) == 401
