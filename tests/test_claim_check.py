"""Claim-check blobs are private to their request and do not pile up (Azurite + the emulator)."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import pytest
from azure.core.exceptions import ResourceExistsError

from shared.send.contract import RequestRefused, claim_check_of, validate_request
from shared.send.producer import attachment_blob_name, claim_check_blob_name, enqueue_requests
from shared.send.stage import Relay
from tests.relay_harness import drain, enqueue, relay_settings
from tests.test_contract import POLICY, good


def run(coro):
    return asyncio.run(coro)


def big(request_id: str | None = None, **extra):
    doc = {"to": ["ann@contoso.com"], "subject": "Big", "html": "<p>" + "x" * 70_000 + "</p>", **extra}
    return {**doc, "id": request_id} if request_id else doc


async def blob_names(relay: Relay, container_name: str) -> list[str]:
    container = relay.storage.container(container_name)
    return sorted([b.name async for b in container.list_blobs()])


def test_producer_names_are_unguessable_and_never_overwrite(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            # Two producers, same id: two blobs, neither replaces the other; the names carry no id.
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name, [big("same-id")] * 2)
            names = await blob_names(relay, storage.container_name)
            container = relay.storage.container(storage.container_name)
            with pytest.raises(ResourceExistsError):  # what overwrite=False means for a name taken
                await container.upload_blob(names[0], b"{}", overwrite=False)
            return names
        finally:
            await relay.close()

    names = run(main())
    assert len(names) == 2 and names[0] != names[1]
    for name in names:
        # Under the request's own prefix (the relay reads no other blob for it), then 250 random bits.
        assert re.fullmatch(r"requests/hve-relay/same-id/[0-9a-f-]{36}-[A-Za-z0-9_-]{22}\.json", name)
    assert len({claim_check_blob_name("same-id") for _ in range(1000)}) == 1000


def test_claim_check_blob_is_deleted_once_the_request_is_final_and_attachments_stay(storage, emulator):
    emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            attachment = await container.upload_blob("requests/hve-relay/cc-sent/terms.pdf", b"%PDF terms")
            attach = [{"name": "terms.pdf", "contentType": "application/pdf", "blobUrl": attachment.url}]
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name, [
                big("cc-sent", attachments=attach),          # deferred once (451), then sent
                big("cc-refused", to=["not an address"]),     # refused: bad address
            ])
            during = None
            handled = []
            async for msg in relay.queue.receive_messages(messages_per_page=1, visibility_timeout=60):
                handled.append(await relay.handle(msg.content, msg.id, msg.dequeue_count))
                await relay.queue.delete_message(msg)
                during = await blob_names(relay, storage.container_name)  # after the first (deferred) one
                break
            handled += await drain(relay)
            return handled, during, await blob_names(relay, storage.container_name), \
                await relay.ledger.get("cc-sent"), await relay.ledger.get("cc-refused")
        finally:
            await relay.close()

    handled, during, after, sent, refused = run(main())
    assert sorted(h.state for h in handled) == ["deferred", "refused", "sent"]
    assert len([n for n in during if n.endswith(".json")]) == 2, (handled, during)
    assert sent.state == "sent" and refused.state == "refused" and sent.claim_blob and refused.claim_blob
    assert after == ["requests/hve-relay/cc-sent/terms.pdf"]


def test_a_claim_check_naming_another_requests_blob_does_not_delete_it(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            victim = await container.upload_blob(claim_check_blob_name("victim-1"), json.dumps(big("victim-1")))
            await enqueue(relay, {"id": "thief-1", "claimCheck": {"blobUrl": victim.url}})
            [handled] = await drain(relay)
            return handled, await blob_names(relay, storage.container_name)
        finally:
            await relay.close()

    handled, names = run(main())
    assert handled.state == "refused" and handled.reason.startswith("blob-not-owned")
    assert len(names) == 1


def test_a_failed_delete_is_logged_and_the_request_still_succeeds(storage, emulator, caplog):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name, [big("leased-1")])
            [name] = await blob_names(relay, storage.container_name)
            # A lease held by someone else: the delete fails with 412, the outcome must not.
            await relay.storage.container(storage.container_name).get_blob_client(name).acquire_lease(-1)
            return await drain(relay), await blob_names(relay, storage.container_name)
        finally:
            await relay.close()

    with caplog.at_level(logging.WARNING, logger="hve_relay.sender"):
        [handled], names = run(main())
    assert handled.state == "sent" and len(names) == 1
    assert any("claim-check blob not deleted" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:10000/devstoreaccount1/mail-payloads/requests\\x.json",
    "http://127.0.0.1:10000/devstoreaccount1/mail-payloads/requests%5Cx.json",
    "http://127.0.0.1:10000/devstoreaccount1/mail-payloads/..%5c..%5cx.json",
])
def test_backslash_in_a_blob_path_is_refused(url):
    with pytest.raises(RequestRefused) as claim:
        claim_check_of({"id": "b-1", "claimCheck": {"blobUrl": url}})
    assert claim.value.reason == "claim-check"
    with pytest.raises(RequestRefused) as attachment:
        validate_request(good(attachments=[{"name": "a.txt", "blobUrl": url}]), POLICY)
    assert attachment.value.reason == "bad-attachment"


def near_limit_request(size: int = 64_500) -> str:
    """An id-less request whose JSON fits a queue message (64 KiB) while its copy carrying an id
    and attempt count does not fit the relay's budget: a deferral writes a `deferred/` copy."""
    doc = {"to": ["ann@contoso.com"], "subject": "Near the limit", "text": ""}
    doc["text"] = "x" * (size - len(json.dumps(doc, separators=(",", ":"))))
    body = json.dumps(doc, separators=(",", ":"))
    assert len(body) == size
    return body


async def producer_sends(storage, body: str) -> None:
    # The producer's own client (see tests/test_queue_fit.py): a message just under 64 KiB.
    from azure.storage.queue import QueueClient
    QueueClient.from_connection_string(storage.connection_string, storage.queue_name).send_message(body)


async def handle_one(relay: Relay):
    async for msg in relay.queue.receive_messages(messages_per_page=1, visibility_timeout=60):
        handled = await relay.handle(msg.content, msg.id, msg.dequeue_count)
        await relay.queue.delete_message(msg)
        return handled
    raise AssertionError("no message visible")


def test_a_deferred_copy_the_relay_wrote_is_deleted_once_the_request_is_sent(storage, emulator):
    # The review's case: an id-less request of ~64 KB, one 451, then sent.
    emulator.fail_next(1, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            await relay.storage.container(storage.container_name).create_container()
            await producer_sends(storage, near_limit_request())
            first = await handle_one(relay)
            during = await blob_names(relay, storage.state_container_name)
            # Another delivery's copy (the host's retry of the same message) whose queue message
            # was lost: found by its name when the request is final.
            await relay.payloads.store(first.request_id, b'{"id": "lost copy"}')
            rest = await drain(relay)
            return first, during, rest, await blob_names(relay, storage.state_container_name) + \
                await blob_names(relay, storage.container_name), await relay.ledger.get(first.request_id)
        finally:
            await relay.close()

    first, during, rest, after, entry = run(main())
    assert first.state == "deferred" and [h.state for h in rest] == ["sent"] and entry.state == "sent"
    assert len(during) == 1, (first, during)
    assert re.fullmatch(rf"deferred/{first.request_id}-[0-9a-f]{{32}}\.json", during[0])
    assert after == []


def test_a_claim_checked_request_that_ends_dead_leaves_no_blobs(storage, emulator):
    # Two attempts allowed, both answered 451: a producer's claim check (`requests/`) and a request
    # whose deferred copy went by the relay's own claim check (`deferred/`) both end dead.
    emulator.fail_next(4, "451 4.7.0 Temporary server error. Please try again later", stage="DATA")

    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, SEND_MAX_ATTEMPTS="2"))
        try:
            container = relay.storage.container(storage.container_name)
            await container.create_container()
            # The producer's attachment copy for this request (the lifecycle rule's to delete).
            attachment = await container.upload_blob(attachment_blob_name("cc-dead", "terms.pdf"), b"%PDF terms")
            attach = [{"name": "terms.pdf", "contentType": "application/pdf", "blobUrl": attachment.url}]
            await enqueue_requests(relay.storage, storage.queue_name, storage.container_name,
                                   [big("cc-dead", attachments=attach)])
            await producer_sends(storage, near_limit_request())
            handled = await drain(relay)
            rows = [await relay.ledger.get(h.request_id) for h in handled if h.state == "dead"]
            return handled, rows, await blob_names(relay, storage.container_name) + \
                await blob_names(relay, storage.state_container_name), attachment.blob_name
        finally:
            await relay.close()

    handled, rows, after, attachment = run(main())
    assert sorted(h.state for h in handled) == ["dead", "dead", "deferred", "deferred"], handled
    assert [r.state for r in rows] == ["dead", "dead"] and all(r.claim_blob for r in rows)
    assert after == [attachment]


def test_a_deferred_copy_delivered_after_its_request_is_final_is_deleted_and_no_other(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            await relay.storage.container(storage.container_name).create_container()
            for request_id in ("done-1", "done-2"):
                await enqueue(relay, {"id": request_id, "to": ["ann@contoso.com"], "subject": "Hi", "text": "Hello"})
            await drain(relay)
            # Copies the relay wrote for done-1 after the clean-up (a busy duplicate's requeue), one
            # on the queue; and done-2's stub naming done-1's other copy (not done-2's to delete).
            copy = await relay.payloads.store("done-1", b'{"id":"done-1","to":["ann@contoso.com"],"subject":"Hi","text":"Hello"}')
            other = await relay.payloads.store("done-1", b'{"id":"done-1","to":["ann@contoso.com"],"subject":"Hi","text":"Hello"}')
            await enqueue(relay, {"id": "done-1", "claimCheck": {"blobUrl": copy}, "attempt": 1})
            await enqueue(relay, {"id": "done-2", "claimCheck": {"blobUrl": other}, "attempt": 1})
            handled = await drain(relay)
            return handled, await blob_names(relay, storage.state_container_name), other
        finally:
            await relay.close()

    handled, after, other = run(main())
    # done-2 may not name done-1's copy at all (the relay's copies are only their own request's).
    assert [(h.state, h.reason.split(":")[0]) for h in handled] == [("duplicate", "already sent"),
                                                                     ("refused", "blob-not-owned")]
    assert len(after) == 1 and other.endswith(after[0])
