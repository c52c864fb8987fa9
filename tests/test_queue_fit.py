"""A deferred request's copy always fits on the queue (Azurite enforces the 64 KiB limit)."""

from __future__ import annotations

import asyncio
import json
import time
from email import message_from_bytes, policy

from azure.storage.queue import QueueClient

from shared.send.stage import Relay
from tests.relay_harness import drain, relay_settings

CYRILLIC = "Съешь же ещё этих мягких французских булок, да выпей чаю. "  # 2 bytes a letter in UTF-8


def cyrillic_request(utf8_bytes: int) -> str:
    """A request whose compact UTF-8 JSON is exactly `utf8_bytes` long (as a careful producer writes it)."""
    doc = {"to": ["ann@contoso.com"], "subject": "Письмо", "text": ""}
    skeleton = len(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
    text = (CYRILLIC * (utf8_bytes // len(CYRILLIC.encode()) + 1)).encode()[: utf8_bytes - skeleton]
    doc["text"] = text.decode("utf-8", "ignore")
    while len(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()) < utf8_bytes:
        doc["text"] += "x"
    body = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    assert len(body.encode()) == utf8_bytes
    return body


def defer_once_then_send(storage, emulator, body: str):
    """Enqueue `body`, let HVE answer 451 once (a deferral), return the re-enqueued copy and the outcome."""
    emulator.fail_next(1, "451 4.7.0 Temporary server error", stage="DATA")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            # The producer's client: Azurite garbles a multi-byte character now and then in a request
            # body over 64 KiB that aiohttp sends in two writes (the real service does not); the
            # relay's own copies stay below that.
            QueueClient.from_connection_string(storage.connection_string, storage.queue_name).send_message(body)
            [first] = [m async for m in relay.queue.receive_messages(visibility_timeout=60)]
            deferred = await relay.handle(first.content, first.id, first.dequeue_count)
            await relay.queue.delete_message(first)
            copies: list[str] = []
            deadline = time.monotonic() + 30
            while not copies and time.monotonic() < deadline:  # the copy is hidden for its delay
                await asyncio.sleep(0.2)
                copies = [m.content for m in await relay.queue.peek_messages(max_messages=32)]
            results = await drain(relay)
            return deferred, copies, results, await relay.ledger.get(deferred.request_id)
        finally:
            await relay.close()

    return asyncio.run(main())


def delivered_text(emulator) -> str:
    [accepted] = emulator.accepted()
    return message_from_bytes(accepted.path.read_bytes(), policy=policy.default).get_body(("plain",)).get_content()


def test_a_39_kb_cyrillic_request_is_re_enqueued_compactly_when_deferred(storage, emulator):
    body = cyrillic_request(39_000)
    deferred, copies, results, entry = defer_once_then_send(storage, emulator, body)
    assert deferred.state == "deferred"
    # Still a full request on the queue, about the size the producer wrote (not 3x in \\u escapes).
    [copy] = copies
    assert "claimCheck" not in json.loads(copy) and len(copy.encode()) < 39_000 + 100
    assert [r.state for r in results] == ["sent"] and entry.state == "sent"
    assert delivered_text(emulator).rstrip("\r\n") == json.loads(body)["text"]


def test_a_request_at_the_64_kib_limit_travels_by_claim_check_when_its_copy_does_not_fit(storage, emulator):
    body = cyrillic_request(64 * 1024 - 300)  # fits; the copy adds its id and attempt count
    deferred, copies, results, entry = defer_once_then_send(storage, emulator, body)
    assert deferred.state == "deferred"
    [copy] = copies
    stub = json.loads(copy)
    # The derived id is the relay's: the copy carries the relay's proof of it.
    assert set(stub) == {"id", "claimCheck", "attempt", "idProof"} and stub["id"] == deferred.request_id
    # The relay's own copy is in its own container, which no producer can write.
    blob_endpoint = storage.connection_string.split('BlobEndpoint=')[1].split(';')[0]
    assert stub["claimCheck"]["blobUrl"].startswith(f"{blob_endpoint}/{storage.state_container_name}/deferred/{stub['id']}-")
    assert [r.state for r in results] == ["sent"] and entry.state == "sent" and entry.attempts == 2
    assert delivered_text(emulator).rstrip("\r\n") == json.loads(body)["text"]

