"""A request keeps its identity on every path: host retries, poison, replay, a producer re-sending it.

Real parts only: the local host runs send_mail, Azurite stores, the emulator is HVE; table faults
come from a TCP proxy in front of Azurite's table port (tools/fault_proxy.py).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from azure.data.tables import TableClient
from azure.storage.queue import QueueClient

from shared.ledger import FINAL_STATES
from shared.settings import Settings
from tests.test_function_app import app_settings, run_send_mail
from tools import poison as poison_tool
from tools.azurite import connection_string
from tools.fault_proxy import Fault, FaultProxy


def ledger_rows(storage) -> list[dict]:
    table = TableClient.from_connection_string(storage.connection_string, f"{storage.table_prefix}ledger")
    return [dict(row) for row in table.query_entities("RowKey eq 'request'")]


@pytest.mark.parametrize("encoding", ["raw", "base64"])
def test_a_request_replayed_from_poison_after_its_250_keeps_its_message_id(azurite, storage, emulator, encoding):
    # Written as the producer chose: raw JSON, or base64 of it (Functions output bindings).
    text = json.dumps({"to": ["ann@contoso.com"], "subject": "once", "text": "only once"})
    other_text = base64.b64encode(text.encode()).decode()
    body, other = (text, other_text) if encoding == "raw" else (other_text, text)
    ledger_path = f"/devstoreaccount1/{storage.table_prefix}ledger"

    # HVE answers 250, then every call to the ledger table fails (403: not retried by the SDK,
    # so the host's own retries run out quickly and the message goes to poison).
    def tables_fail_after_the_250(method: str, path: str) -> Fault | None:
        if path.startswith(ledger_path) and emulator.accepted():
            return Fault(403)
        return None

    with FaultProxy(azurite.table_port, rule=tables_fail_after_the_250) as proxy:
        broken = app_settings(storage, emulator, SENDING_LEASE_SECONDS="1", AzureWebJobsStorage=connection_string(
            azurite.blob_port, azurite.queue_port, proxy.port))
        queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
        queue.create_queue()
        # No id: the relay has to find the request's identity itself.
        queue.send_message(body)
        assert [i.outcome for i in run_send_mail(broken)] == ["Failed", "Failed"]
        assert proxy.injected >= 2
    [first] = emulator.accepted()
    poison = QueueClient.from_connection_string(storage.connection_string, storage.poison_queue_name)
    assert len(list(poison.peek_messages())) == 1

    # Storage is back: the operator replays the poison queue.
    fixed = app_settings(storage, emulator, SENDING_LEASE_SECONDS="1")
    asyncio.run(poison_tool.run(Settings.from_env(fixed), "requeue"))
    run_send_mail(fixed)

    # Any further copy carries the first one's Message-ID (Exchange drops it as a duplicate).
    assert {m.message_id for m in emulator.accepted()} == {first.message_id}
    rows = ledger_rows(storage)
    assert len(rows) == 1 and rows[0]["State"] in FINAL_STATES, rows
    assert rows[0]["MessageId"] == first.message_id
    assert list(poison.peek_messages()) == [] and list(queue.peek_messages()) == []
    # The id is the documented one: the SHA-256 of the JSON text, after the transport's base64.
    assert rows[0]["PartitionKey"] == "c-" + hashlib.sha256(text.encode()).hexdigest()[:32]

    # The producer sends the same request again in the other encoding: the same request, not sent again.
    queue.send_message(other)
    run_send_mail(fixed)
    assert {m.message_id for m in emulator.accepted()} == {first.message_id}
    assert len(ledger_rows(storage)) == 1


def test_the_same_bytes_enqueued_twice_are_one_request(storage, emulator):
    settings = app_settings(storage, emulator)
    queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    queue.create_queue()
    body = json.dumps({"to": ["ann@contoso.com"], "subject": "twice", "text": "same bytes"})
    queue.send_message(body)
    queue.send_message(body)
    # The other request differs in one character: it is another request.
    queue.send_message(body.replace("same bytes", "same bytez"))
    run_send_mail(settings)
    accepted = emulator.accepted()
    assert len(accepted) == 2 and len({m.message_id for m in accepted}) == 2
    states = sorted(row["State"] for row in ledger_rows(storage))
    assert states == ["sent", "sent"]


# --- who may use an id --------------------------------------------------------------------------

from shared.send.contract import content_request_id, id_proof  # noqa: E402
from shared.send.producer import enqueue_requests  # noqa: E402
from shared.send.stage import Relay  # noqa: E402
from tests.relay_harness import drain, enqueue, relay_settings  # noqa: E402

KEY = b"test-hash-key"   # RECIPIENT_HASH_KEY of relay_settings
ALERT = json.dumps({"to": ["ops@contoso.com"], "subject": "ALERT", "text": "disk full on db1"})


async def aggregate_counts(relay) -> dict[str, int]:
    await relay.aggregates.flush()
    out: dict[str, int] = {}
    async for row in relay.aggregates._table.list_entities():
        for name, n in json.loads(row.get("Data", "{}")).get("n", {}).items():
            out[name] = out.get(name, 0) + n
    return out


def test_a_producer_cannot_take_an_id_the_relay_gives_itself(storage, emulator):
    """`welcome-<user id>` and `c-<hash of a fixed alert text>` are predictable; a producer sending
    first under them is refused (reserved-id) and set aside under its queue message id, and the
    real requests are sent, not answered `duplicate`."""
    welcome_id, alert_id = "welcome-5f1c2d", content_request_id(ALERT)

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            await enqueue(relay, {"id": welcome_id, "to": ["mallory@contoso.com"], "text": "squat"})
            await enqueue(relay, {"id": alert_id, "to": ["mallory@contoso.com"], "text": "squat"}, encoding="base64")
            squatters = await drain(relay)
            # The welcome scan's request (it carries the relay's proof) and the producer's id-less alert.
            welcome = {"id": welcome_id, "idProof": id_proof(KEY, welcome_id), "to": ["newbie@contoso.com"],
                       "subject": "Welcome", "text": "hello", "category": "welcome"}
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name, [welcome])
            await enqueue(relay, ALERT)
            real = await drain(relay)
            return squatters, real, [await relay.ledger.get(h.request_id) for h in squatters]
        finally:
            await relay.close()

    squatters, real, set_aside = asyncio.run(main())
    assert [(h.state, h.reason.split(":")[0]) for h in squatters] == [("refused", "reserved-id")] * 2
    assert all(e.state == "refused" and e.request_id not in (welcome_id, alert_id) for e in set_aside)
    assert sorted((h.request_id, h.state) for h in real) == sorted([(welcome_id, "sent"), (alert_id, "sent")])
    assert sorted(r for m in emulator.accepted() for r in m.recipients) == ["newbie@contoso.com", "ops@contoso.com"]


def test_another_request_under_a_taken_id_is_an_id_conflict_and_the_same_one_a_duplicate(storage, emulator):
    # The first request is deferred once (451): a conflict while it is in flight must not drop either.
    emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")
    order = {"id": "order-7", "to": ["ann@contoso.com"], "subject": "Shipped", "text": "Your order shipped"}
    big = {"id": "big-7", "to": ["ann@contoso.com"], "subject": "Big", "html": "<p>" + "x" * 70_000 + "</p>"}

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, RETRY_BASE_SECONDS="2", RETRY_MAX_SECONDS="2",
                                                  AGGREGATES_FLUSH_SECONDS="0"))
        try:
            await enqueue(relay, order)
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name, [big])
            handled = []
            async for message in relay.queue.receive_messages(max_messages=2, visibility_timeout=60):
                handled.append(await relay.handle(message.content, message.id))
                await relay.queue.delete_message(message)
            # While order-7 waits: a different request under its id, and again under big-7's (by claim check).
            await enqueue(relay, {**order, "to": ["mallory@contoso.com"]})
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name,
                                   [{**big, "to": ["mallory@contoso.com"]}])
            handled += await drain(relay)
            # The same requests again: the same content in another key order and encoding, the same stub.
            await enqueue(relay, dict(reversed(list(order.items()))), encoding="base64")
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name, [big])
            handled += await drain(relay)
            rows = {i: await relay.ledger.get(i) for i in ("order-7", "big-7")}
            return handled, rows, await aggregate_counts(relay)
        finally:
            await relay.close()

    handled, rows, counts = asyncio.run(main())
    outcomes = sorted((h.state, h.reason.split(":")[0]) for h in handled if h.request_id not in ("order-7", "big-7"))
    assert outcomes == [("refused", "id-conflict")] * 2, handled
    assert rows["order-7"].state == "sent" and rows["big-7"].state == "sent"
    later = [h for h in handled if h.request_id in ("order-7", "big-7") and h.state == "duplicate"]
    assert len(later) == 2, handled
    assert sorted(r for m in emulator.accepted() for r in m.recipients) == ["ann@contoso.com"] * 2
    assert counts.get("requests.id-conflict") == 2 and counts.get("requests.refused") == 2, counts
