"""The priority lane (MAIL_QUEUE_PRIORITY): a second queue with its own trigger, the same send stage,
governor and SMTP sessions. Against Azurite and the HVE emulator over TLS, through the wiring the
triggers call (shared/wiring.py) and, at the end, function_app.py under the local host."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import QueueClient

from shared import wiring
from shared.send.contract import RequestRefused, content_digest, validate_request
from shared.settings import Settings, SettingsError
from tests.relay_harness import ACCOUNTS
from tests.test_function_app import app_settings, close_app_relays
from tools import enqueue as enqueue_tool
from tools import poison as poison_tool
from tools.devhost import DevHost

ROOT = Path(__file__).resolve().parents[1]


def mail(rid: str, to: str = "ann@contoso.com", **extra: Any) -> dict[str, Any]:
    return {"id": rid, "to": [to], "subject": "Password reset", "text": "Your code is 123456", **extra}


def use_settings(monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]) -> None:
    """The wiring reads its settings from the environment, as in the worker."""
    for name, value in settings.items():
        monkeypatch.setenv(name, value)


def queued(storage, name: str) -> int:
    """Messages on a queue, those waiting out a visibility delay included."""
    client = QueueClient.from_connection_string(storage.connection_string, name)
    try:
        return client.get_queue_properties().approximate_message_count
    except Exception:  # not created: nothing on it
        return 0


async def handle_one(lane: str) -> Any:
    """Receive one message from the lane's queue and handle it like the host (delete on success)."""
    queue = (await wiring.get_lane(lane)).queue
    for _ in range(100):
        messages = [m async for m in queue.receive_messages(messages_per_page=1, max_messages=1, visibility_timeout=30)]
        if messages:
            (message,) = messages
            handled = await wiring.handle_queue_message(message.content.encode(), message.id, message.dequeue_count,
                                                        lane=lane)
            await queue.delete_message(message)
            return handled
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing came on the {lane} queue")


def run(coro) -> Any:
    async def main():
        try:
            return await coro
        finally:
            await wiring.close_relays()

    return asyncio.run(main())


# --- the stage on the priority queue ---------------------------------------------------------------


def test_a_deferred_priority_request_goes_back_on_the_priority_queue_and_is_sent_from_it(storage, emulator, monkeypatch):
    use_settings(monkeypatch, app_settings(storage, emulator))
    emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")

    async def scenario():
        lane = await wiring.get_lane("priority")
        await lane.queue.send_message(json.dumps(mail("reset-1")))
        first = await handle_one("priority")
        copies = (queued(storage, storage.priority_queue_name), queued(storage, storage.queue_name))
        second = await handle_one("priority")  # the copy, once its visibility delay is over
        return first, copies, second

    first, (on_priority, on_bulk), second = run(scenario())
    assert first.state == "deferred"
    assert (on_priority, on_bulk) == (1, 0), "the deferred copy belongs on the lane it came from"
    assert second.state == "sent" and second.request_id == "reset-1"
    assert [m.recipients for m in emulator.accepted()] == [("ann@contoso.com",)]


def test_both_lanes_send_on_the_process_s_one_pool_of_sessions(storage, emulator, monkeypatch):
    account = next(iter(ACCOUNTS))
    one_account = {"HVE_ACCOUNTS": account, "HVE_PASSWORDS": json.dumps({account: ACCOUNTS[account]})}
    use_settings(monkeypatch, {**app_settings(storage, emulator), **one_account})

    async def scenario():
        bulk, priority = await wiring.get_lane("bulk"), await wiring.get_lane("priority")
        await bulk.queue.send_message(json.dumps(mail("news-1")))
        await priority.queue.send_message(json.dumps(mail("reset-2")))
        return await handle_one("bulk"), await handle_one("priority")

    handled = run(scenario())
    assert [h.state for h in handled] == ["sent", "sent"]
    # One connection and one AUTH for both: the lane is not a second relay with its own pool.
    assert (emulator.connections_opened, emulator.auth_count) == (1, 1)


def test_a_priority_field_on_the_mail_queue_is_checked_but_does_not_move_the_request(storage, emulator, monkeypatch):
    use_settings(monkeypatch, app_settings(storage, emulator))

    async def scenario():
        bulk = await wiring.get_lane("bulk")
        await bulk.queue.send_message(json.dumps(mail("q-high", priority="high")))
        await bulk.queue.send_message(json.dumps(mail("q-urgent", priority="urgent")))
        return await handle_one("bulk"), await handle_one("bulk")

    handled = {h.request_id: h for h in run(scenario())}
    assert handled["q-high"].state == "sent"
    assert handled["q-urgent"].state == "refused" and "priority" in handled["q-urgent"].reason
    assert queued(storage, storage.priority_queue_name) == 0


# --- POST /api/send --------------------------------------------------------------------------------


def test_post_with_high_priority_goes_on_the_priority_queue_and_normal_on_the_mail_queue(storage, emulator, monkeypatch):
    use_settings(monkeypatch, app_settings(storage, emulator))

    async def scenario():
        answers = [await wiring.send_response(json.dumps(doc).encode(), None) for doc in (
            mail("http-high", priority="high"), mail("http-normal", priority="normal"), mail("http-none"),
            mail("http-bad", priority="urgent"))]
        return [(status, json.loads(body)) for status, body, _ in answers]

    (high, normal, none, bad) = run(scenario())
    assert [high[0], normal[0], none[0]] == [202, 202, 202]
    assert (queued(storage, storage.priority_queue_name), queued(storage, storage.queue_name)) == (1, 2)
    assert bad[0] == 400 and bad[1]["reasons"][0]["reason"] == "schema"
    assert "priority" in bad[1]["reasons"][0]["detail"]


def test_the_same_request_posted_again_in_the_other_lane_is_one_request_queued_once(storage, emulator, monkeypatch):
    use_settings(monkeypatch, app_settings(storage, emulator))

    async def scenario():
        first = await wiring.send_response(json.dumps(mail("both", priority="high")).encode(), None)
        again = await wiring.send_response(json.dumps(mail("both")).encode(), None)
        return first[0], again[0]

    assert run(scenario()) == (202, 202)
    assert (queued(storage, storage.priority_queue_name), queued(storage, storage.queue_name)) == (1, 0)


# --- settings, contract, producer tool -------------------------------------------------------------


def test_the_priority_queue_must_not_be_the_mail_queue():
    with pytest.raises(SettingsError, match="MAIL_QUEUE_PRIORITY"):
        Settings.from_env({"MAIL_QUEUE": "mail", "MAIL_QUEUE_PRIORITY": "mail"})
    assert Settings.from_env({}).priority_queue == "outbound-mail-priority"
    assert Settings.from_env({}).priority_poison_queue == "outbound-mail-priority-poison"


def test_priority_is_high_or_normal_and_not_part_of_the_content():
    from tests.test_contract import POLICY

    assert validate_request(mail("p", priority="high"), POLICY).priority == "high"
    assert validate_request(mail("p"), POLICY).priority == "normal"
    for bad in ("urgent", "HIGH", 1, None, ["high"]):
        with pytest.raises(RequestRefused) as info:
            validate_request(mail("p", priority=bad), POLICY)
        assert info.value.reason == "schema"
    assert content_digest(b"k", mail("p", priority="high")) == content_digest(b"k", mail("p"))


def test_enqueue_tool_puts_priority_requests_on_the_priority_queue(storage, monkeypatch, tmp_path):
    use_settings(monkeypatch, storage.env())
    assert enqueue_tool.main(["--to", "ann@contoso.com", "--subject", "Reset", "--text", "code", "--priority",
                              "--settings", str(tmp_path / "none.json")]) == 0
    assert enqueue_tool.main(["--to", "bob@contoso.com", "--subject", "News", "--text", "hi",
                              "--settings", str(tmp_path / "none.json")]) == 0
    assert (queued(storage, storage.priority_queue_name), queued(storage, storage.queue_name)) == (1, 1)


# --- function_app.py under the local host ----------------------------------------------------------


def test_a_priority_request_that_keeps_failing_lands_in_the_lanes_poison_queue_and_is_replayed_onto_the_lane(
        storage, emulator):
    from tests.test_function_app import FAST_HOST

    broken = app_settings(storage, emulator, LEDGER_TABLE="not_a_valid_table_name!")  # as if storage were down
    body = json.dumps(mail("reset-poison"))
    lane = QueueClient.from_connection_string(storage.connection_string, storage.priority_queue_name)
    lane.create_queue()
    lane.send_message(body)
    try:
        host = DevHost(ROOT / "function_app.py", broken, host_json=FAST_HOST, functions=["send_mail_priority"])
        assert [i.outcome for i in host.run_until_idle(timeout=60)] == ["Failed", "Failed"]
        poison = QueueClient.from_connection_string(storage.connection_string, f"{storage.priority_queue_name}-poison")
        assert [m.content for m in poison.peek_messages()] == [body]
        assert queued(storage, storage.poison_queue_name) == 0

        fixed = app_settings(storage, emulator)
        asyncio.run(poison_tool.run(Settings.from_env(fixed), "requeue", priority=True))
        assert list(poison.peek_messages()) == [] and queued(storage, storage.priority_queue_name) == 1
        host = DevHost(ROOT / "function_app.py", fixed, host_json=FAST_HOST, functions=["send_mail_priority"])
        assert [i.outcome for i in host.run_until_idle(timeout=60)] == ["Succeeded"]
    finally:
        close_app_relays()
    assert [m.recipients for m in emulator.accepted()] == [("ann@contoso.com",)]

# The repo's own host.json queue settings (maxPollingInterval 2 s: the idle priority queue is polled
# at most that far apart), with a short visibility timeout for failures.
HOST_JSON = json.loads((ROOT / "host.json").read_text())


def test_a_priority_request_is_sent_before_the_bulk_backlog_drains(storage, emulator):
    """A backlog on the mail queue, then one POST with "priority": "high": the emulator accepts it
    while most of the backlog is still waiting."""
    backlog = 600
    settings = app_settings(storage, emulator)
    bulk = QueueClient.from_connection_string(storage.connection_string, storage.queue_name)
    bulk.create_queue()
    for i in range(backlog):
        bulk.send_message(json.dumps(mail(f"bulk-{i}", f"user{i % 50}@contoso.com")))
    probe = "urgent@contoso.com"
    try:
        with DevHost(ROOT / "function_app.py", settings, host_json=HOST_JSON, http_port=0,
                     functions=["send_mail", "send_mail_priority", "send"]) as host:
            deadline = time.monotonic() + 60
            while not emulator.accepted() and time.monotonic() < deadline:
                time.sleep(0.05)  # the host is draining the backlog
            from tests.test_http_api import post

            status, _, answer = post(host.http_port, mail("reset-e2e", probe, priority="high"))
            assert status == 202, answer
            while time.monotonic() < deadline:
                accepted = emulator.accepted()
                if any(probe in m.recipients for m in accepted):
                    break
                time.sleep(0.02)
            else:
                raise AssertionError("the priority request was not sent")
            bulk_sent_before = sum(1 for m in accepted if probe not in m.recipients)
            still_queued = queued(storage, storage.queue_name)
            host.wait_until_idle(120)
    finally:
        close_app_relays()
    print(f"bulk sent before the priority request: {bulk_sent_before} of {backlog}, {still_queued} still queued")
    assert bulk_sent_before < backlog / 2 and still_queued > 0, (bulk_sent_before, still_queued)
    assert len(emulator.accepted()) == backlog + 1
