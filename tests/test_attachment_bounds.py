"""Attachments are bounded before they are read: their number, and the sum of their sizes from blob
properties, checked against the message size limit; downloads never hold more than the limit."""

from __future__ import annotations

import asyncio
import base64
import json
import tracemalloc
from email import message_from_bytes, policy

from shared.send.blobs import BlobReader
from shared.send.contract import RequestRefused
from shared.send.stage import Relay
from tests.relay_harness import relay_settings

LIMIT = 1024 * 1024            # HVE_LIMITS message_bytes for these tests: small keeps them fast
BLOB = 900 * 1024              # one attachment well under the limit...
# ...named twelve times in a message of under 2 KB. Peak memory while handling it must stay within
# this multiple of the message size limit (the old code read all twelve: about 10.8 MB, then built
# the message: several times that).
PEAK_MULTIPLE = 2


async def open_relay(storage, emulator, **overrides) -> Relay:
    return await Relay.create(relay_settings(storage, emulator, HVE_LIMITS=json.dumps({"message_bytes": LIMIT}),
                                             **overrides))


async def upload(relay: Relay, name: str, data: bytes) -> str:
    container = relay.storage.container(relay.settings.claim_check_container)
    if not await container.exists():
        await container.create_container()
    return (await container.upload_blob(name, data, overwrite=True)).url


async def handle_measured(relay: Relay, doc: dict):
    """Handle one queue message; its outcome, ledger row and the peak of Python memory meanwhile."""
    body = json.dumps(doc)
    tracemalloc.start()
    try:
        handled = await relay.handle(body, "qm-1", 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return handled, await relay.ledger.get(handled.request_id), peak


def with_relay(storage, emulator, scenario, **overrides):
    async def main():
        relay = await open_relay(storage, emulator, **overrides)
        try:
            return await scenario(relay)
        finally:
            await relay.close()

    return asyncio.run(main())


def test_a_small_message_naming_one_big_blob_twelve_times_is_refused_before_it_is_read(storage, emulator):
    async def scenario(relay):
        url = await upload(relay, "requests/producer-a/bomb-1/big.bin", b"\0" * BLOB)
        doc = {"id": "bomb-1", "to": ["ann@contoso.com"], "subject": "s", "text": "t",
               "attachments": [{"name": f"a{i}.bin", "blobUrl": url} for i in range(12)]}
        assert len(json.dumps(doc)) < 2000
        return await handle_measured(relay, doc)

    handled, entry, peak = with_relay(storage, emulator, scenario)
    assert handled.state == "refused" and entry.reason.startswith("too-large"), entry
    assert peak < PEAK_MULTIPLE * LIMIT, f"peak {peak} bytes while handling a request that was refused"
    assert emulator.accepted() == []


def test_an_attachment_within_the_limit_is_sent_intact(storage, emulator):
    data = bytes(range(256)) * (700 * 1024 // 256)   # 700 KiB: about 950 KB once base64-encoded

    async def scenario(relay):
        url = await upload(relay, "requests/producer-a/ok-1/ok.bin", data)
        return await handle_measured(relay, {"id": "ok-1", "to": ["ann@contoso.com"], "subject": "s", "text": "t",
                                             "attachments": [{"name": "ok.bin", "blobUrl": url}]})

    handled, entry, _ = with_relay(storage, emulator, scenario)
    assert handled.state == "sent", entry
    [stored] = emulator.accepted()
    [part] = message_from_bytes(stored.path.read_bytes(), policy=policy.default).iter_attachments()
    assert part.get_content() == data


def test_more_attachments_than_max_attachments_are_refused(storage, emulator):
    tiny = base64.b64encode(b"x").decode()

    async def scenario(relay):
        return await handle_measured(relay, {"id": "many-1", "to": ["ann@contoso.com"], "subject": "s", "text": "t",
                                             "attachments": [{"name": f"{i}.txt", "contentBase64": tiny} for i in range(4)]})

    handled, entry, _ = with_relay(storage, emulator, scenario, MAX_ATTACHMENTS="3")
    assert handled.state == "refused" and entry.reason.startswith("too-many-attachments: 4 attachments"), entry
    assert emulator.accepted() == []


def test_a_blob_read_stops_at_its_cap_even_if_it_grew_after_its_size_was_checked(storage, emulator):
    cap = 100 * 1024

    async def scenario(relay):
        url = await upload(relay, "requests/producer-a/g-1/grows.bin", b"\0" * 10)
        reader: BlobReader = relay.payloads
        assert await reader.size(url, "attachment", "g-1") == 10
        await upload(relay, "requests/producer-a/g-1/grows.bin", b"\0" * (8 * 1024 * 1024))  # the producer rewrites it, bigger
        tracemalloc.start()
        try:
            try:
                await reader.read(url, "attachment", "g-1", cap)
            except RequestRefused as refusal:
                outcome = refusal.reason
            else:
                outcome = "read"
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert await reader.read(await upload(relay, "requests/producer-a/g-1/empty.bin", b""), "attachment", "g-1", cap) == b""
        return outcome, peak

    outcome, peak = with_relay(storage, emulator, scenario)
    assert outcome == "too-large"
    assert peak < 4 * cap, peak
