"""A producer can make the relay read only the blobs it wrote for the request that names them.

The relay reads blobs with its own identity, which can read every producer's blobs: without a
check, producer B (queue rights only) could name producer A's invoice in a request to itself and
have HVE deliver it (a confused deputy). Real parts: Azurite and the HVE emulator.
"""

from __future__ import annotations

import asyncio
import json

from email import message_from_bytes, policy

from shared.send.blobs import BlobReader
from shared.send.producer import attachment_blob_name, claim_check_blob_name
from shared.send.stage import Relay
from tests.relay_harness import drain, enqueue, relay_settings

PDF = b"%PDF-1.7 invoice 1042 of producer A"


def run(coro):
    return asyncio.run(coro)


def mail(request_id: str, to: str, **extra) -> dict:
    return {"id": request_id, "to": [to], "subject": "Invoice", "text": "attached", **extra}


def pdf(url: str) -> list[dict]:
    return [{"name": "1042.pdf", "contentType": "application/pdf", "blobUrl": url}]


async def upload(relay: Relay, name: str, data: bytes) -> str:
    container = relay.storage.container(relay.settings.claim_check_container)
    if not await container.exists():
        await container.create_container()
    return (await container.upload_blob(name, data, overwrite=False)).url


def attachments_of(stored) -> dict[str, bytes]:
    msg = message_from_bytes(stored.path.read_bytes(), policy=policy.default)
    return {part.get_filename(): part.get_content() for part in msg.iter_attachments()}


def test_a_producer_cannot_attach_a_blob_another_producer_wrote(storage, emulator):
    """The reviewer's case: A's blob (anywhere in the container, or under A's own request) named by
    B in a mail to itself is refused with a clear reason, recorded, not retried; HVE gets nothing."""
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            loose = await upload(relay, "invoices/2026/1042.pdf", PDF)  # where A used to put it
            own = await upload(relay, attachment_blob_name("a-1042", "1042.pdf", "producer-a"), PDF)
            await enqueue(relay, mail("a-1042", "ann@contoso.com", attachments=pdf(own)))
            # B has queue rights only: it names A's blobs in requests to itself.
            await enqueue(relay, mail("b-1", "bee@contoso.com", attachments=pdf(loose)))
            await enqueue(relay, mail("b-2", "bee@contoso.com", attachments=pdf(own)), encoding="base64")
            handled = await drain(relay)
            rows = {i: await relay.ledger.get(i) for i in ("a-1042", "b-1", "b-2")}
            left = (await relay.queue.get_queue_properties()).approximate_message_count
            return handled, rows, left
        finally:
            await relay.close()

    handled, rows, left = run(main())
    assert sorted((h.request_id, h.state) for h in handled) == [("a-1042", "sent"), ("b-1", "refused"),
                                                                 ("b-2", "refused")]
    for request_id in ("b-1", "b-2"):
        entry = rows[request_id]
        assert entry.state == "refused" and entry.attempts == 0, entry
        assert entry.reason.startswith("blob-not-owned: attachments[0].blobUrl: the blob is not under "
                                       "requests/<producer>/<request id>/ of this request"), entry.reason
    assert left == 0   # set aside, not retried
    [delivered] = emulator.accepted()
    assert delivered.recipients == ("ann@contoso.com",) and attachments_of(delivered) == {"1042.pdf": PDF}


def test_a_claim_check_or_attachment_of_another_request_or_producer_is_refused_before_any_read(storage, emulator):
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator))
        try:
            a_request = await upload(relay, claim_check_blob_name("a-7", "producer-a"),
                                     json.dumps(mail("a-7", "ann@contoso.com")).encode())
            unknown = await upload(relay, attachment_blob_name("x-1", "1042.pdf", "producer-x"), PDF)
            outcomes = {}
            # Another request's claim check, even under that request's own id and the producer's prefix...
            await enqueue(relay, {"id": "b-7", "claimCheck": {"blobUrl": a_request}})
            # ...a producer not in BLOB_PRODUCERS (it has no prefix of its own to write under)...
            await enqueue(relay, mail("x-1", "bee@contoso.com", attachments=pdf(unknown)))
            # ...and the relay's own copies (RELAY_STATE_CONTAINER) are never an attachment.
            state = await relay.payloads.store("s-1", json.dumps(mail("s-1", "ann@contoso.com")).encode())
            await enqueue(relay, mail("s-1", "bee@contoso.com", attachments=pdf(state)))
            await enqueue(relay, {"id": "s-2", "claimCheck": {"blobUrl": state}})
            for h in await drain(relay):
                outcomes[h.request_id] = (h.state, h.reason.split(":")[0])
            return outcomes
        finally:
            await relay.close()

    assert run(main()) == {"b-7": ("refused", "blob-not-owned"), "x-1": ("refused", "blob-not-owned"),
                           "s-1": ("refused", "blob-not-owned"), "s-2": ("refused", "blob-not-owned")}
    assert emulator.accepted() == []


def test_a_producer_reusing_another_requests_id_to_reach_its_blob_is_an_id_conflict(storage, emulator):
    """B names A's blob under A's own request id: the id is taken by A's request (other content),
    so B's copy is refused as an id conflict, recorded under its queue message id, counted."""
    async def main():
        relay = await Relay.create(relay_settings(storage, emulator, AGGREGATES_FLUSH_SECONDS="0"))
        try:
            own = await upload(relay, attachment_blob_name("a-1042", "1042.pdf", "producer-a"), PDF)
            await enqueue(relay, mail("a-1042", "ann@contoso.com", attachments=pdf(own)))
            await drain(relay)
            await relay.queue.send_message(json.dumps(mail("a-1042", "bee@contoso.com", attachments=pdf(own))))
            [message] = [m async for m in relay.queue.receive_messages()]
            handled = await relay.handle(message.content, message.id)
            await relay.aggregates.flush()
            counts = [json.loads(r["Data"])["n"] async for r in relay.aggregates._table.list_entities() if "Data" in r]
            return handled, await relay.ledger.get("a-1042"), await relay.ledger.get(message.id), counts
        finally:
            await relay.close()

    handled, original, set_aside, counts = run(main())
    assert handled.state == "refused" and handled.reason.startswith("id-conflict:")
    assert original.state == "sent" and set_aside.state == "refused" and set_aside.reason.startswith("id-conflict:")
    assert [m.recipients for m in emulator.accepted()] == [("ann@contoso.com",)]
    assert sum(n.get("requests.id-conflict", 0) for n in counts) == 1, counts


def test_blob_urls_are_checked_against_the_request_id_and_producer_allowlist():
    class Container:
        def __init__(self, name):
            self.container_name = name
            self.url = f"https://acct.blob.core.windows.net/{name}"

    reader = BlobReader(Container("mail-payloads"), None, state_container=Container("hve-relay-state"),
                        producers=frozenset({"billing"}))
    base = "https://acct.blob.core.windows.net/mail-payloads/"
    assert reader.locate(base + "requests/billing/r-1/x/inv.pdf", "r-1", "a")[1] == "requests/billing/r-1/x/inv.pdf"
    assert reader.locate(base + "requests/hve-relay/r-1/c.json", "r-1", "a")[1] == "requests/hve-relay/r-1/c.json"
    for name, request_id in [("requests/billing/r-1/inv.pdf", "r-2"),   # another request's
                             ("requests/billing/r-10/inv.pdf", "r-1"),  # a longer id is another id
                             ("requests/crm/r-1/inv.pdf", "r-1"),       # a producer not allowed
                             ("requests/billing/r-1/", "r-1"),          # the prefix itself
                             ("requests/r-1/inv.pdf", "r-1"),           # no producer
                             ("invoices/2026/1042.pdf", "r-1")]:
        try:
            reader.locate(base + name, request_id, "a")
        except Exception as refusal:  # noqa: BLE001
            assert getattr(refusal, "reason", None) == "blob-not-owned", (name, refusal)
        else:
            raise AssertionError(f"{name} accepted for {request_id}")
    state = "https://acct.blob.core.windows.net/hve-relay-state/deferred/r-1-" + "a" * 32 + ".json"
    assert reader.locate(state, "r-1", "claim check", claim_check=True)[1].startswith("deferred/r-1-")
    for url, request_id, claim in [(state, "r-2", True), (state, "r-1", False)]:
        try:
            reader.locate(url, request_id, "x", claim_check=claim)
        except Exception as refusal:  # noqa: BLE001
            assert getattr(refusal, "reason", None) == "blob-not-owned"
        else:
            raise AssertionError(url)
