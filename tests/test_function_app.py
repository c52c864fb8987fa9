"""function_app.py under the local host: the triggers as the Functions host would run them."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from pathlib import Path

from azure.storage.queue import QueueClient

from shared.send.mime import message_id
from shared.wiring import close_relays
from tests.relay_harness import ACCOUNTS
from shared.settings import Settings
from tools import poison as poison_tool
from tools.devhost import DevHost, _background_loop

ROOT = Path(__file__).resolve().parents[1]
FAST_HOST = {"version": "2.0", "extensions": {"queues": {
    "batchSize": 8, "newBatchThreshold": 4, "maxPollingInterval": "00:00:00.200",
    "visibilityTimeout": "00:00:00", "maxDequeueCount": 2, "messageEncoding": "none"}}}


def app_settings(storage, emulator, **overrides: str) -> dict[str, str]:
    return storage.env(
        HVE_SMTP_HOST="127.0.0.1", HVE_SMTP_PORT=str(emulator.port), HVE_SMTP_CA_FILE=str(emulator.ca_file),
        HVE_ACCOUNTS=",".join(ACCOUNTS), HVE_PASSWORDS=json.dumps(ACCOUNTS), HVE_INTERNAL_DOMAINS="contoso.com",
        RECIPIENT_HASH_KEY="k", RETRY_BASE_SECONDS="1", RETRY_MAX_SECONDS="1", **overrides)


def close_app_relays() -> None:
    asyncio.run_coroutine_threadsafe(close_relays(), _background_loop()).result(timeout=10)


def run_send_mail(settings: dict[str, str]) -> list:
    """send_mail under the local host until the queue is empty; the invocations it made."""
    host = DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, functions=["send_mail"])
    try:
        return host.run_until_idle(timeout=60)
    finally:
        close_app_relays()


def test_queue_trigger_sends_raw_and_base64_requests(storage, emulator):
    settings = app_settings(storage, emulator)
    queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    queue.create_queue()
    queue.send_message(json.dumps({"id": "fa-raw", "to": ["ann@contoso.com"], "subject": "raw", "text": "x"}))
    queue.send_message(base64.b64encode(json.dumps(
        {"id": "fa-b64", "to": ["bob@contoso.com"], "subject": "b64", "text": "y"}).encode()).decode())
    invocations = run_send_mail(settings)
    assert [i.outcome for i in invocations] == ["Succeeded", "Succeeded"]
    assert {a.message_id for a in emulator.accepted()} == {message_id("fa-raw", "contoso.com", key=b"k"),
                                                           message_id("fa-b64", "contoso.com", key=b"k")}


def test_an_invocation_that_keeps_failing_lands_in_the_poison_queue_intact(storage, emulator):
    # An invalid table name makes every invocation fail (as if storage were down).
    settings = app_settings(storage, emulator, LEDGER_TABLE="not_a_valid_table_name!")
    body = json.dumps({"id": "fa-poison", "to": ["ann@contoso.com"], "subject": "p", "text": "z"})
    queue = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    queue.create_queue()
    queue.send_message(body)
    invocations = run_send_mail(settings)
    assert [i.outcome for i in invocations] == ["Failed", "Failed"]
    poison = QueueClient.from_connection_string(storage.connection_string, storage.poison_queue_name)
    assert [m.content for m in poison.peek_messages()] == [body]
    assert emulator.messages() == []

    # Storage is back: the operator replays the poison queue and the request goes out.
    fixed = app_settings(storage, emulator)
    asyncio.run(poison_tool.run(Settings.from_env(fixed), "requeue"))
    assert list(poison.peek_messages()) == []
    assert [i.outcome for i in run_send_mail(fixed)] == ["Succeeded"]
    assert {a.message_id for a in emulator.accepted()} == {message_id("fa-poison", "contoso.com", key=b"k")}


def test_status_endpoint_reports_every_account(storage, emulator):
    settings = app_settings(storage, emulator)
    try:
        with DevHost(ROOT / "function_app.py", settings, host_json=FAST_HOST, http_port=0,
                     functions=["status"]) as host:
            with urllib.request.urlopen(f"http://127.0.0.1:{host.http_port}/api/status?code=local") as response:
                report = json.loads(response.read())
                content_type = response.headers["Content-Type"]
    finally:
        close_app_relays()
    assert content_type.startswith("application/json")
    assert [a["account"] for a in report["accounts"]] == list(ACCOUNTS)
    assert all(a["health"] == "healthy" for a in report["accounts"]) and report["limits_profile"] == "ga-2026"
