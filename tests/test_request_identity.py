"""A request keeps its identity on every path: host retries, poison, replay, a producer re-sending it.

Real parts only: the local host runs send_mail, Azurite stores, the emulator is HVE; table faults
come from a TCP proxy in front of Azurite's table port (tools/fault_proxy.py).
"""

from __future__ import annotations

import asyncio
import json

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


def test_a_request_replayed_from_poison_after_its_250_keeps_its_message_id(azurite, storage, emulator):
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
        queue.send_message(json.dumps({"to": ["ann@contoso.com"], "subject": "once", "text": "only once"}))
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
