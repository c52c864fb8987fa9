"""Drive the real send stage against Azurite and the HVE emulator, the way the host would."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

from shared.send.stage import Handled, Relay
from shared.settings import Settings

ACCOUNTS = {"news@contoso.com": "news-pw", "alerts@contoso.com": "alerts-pw", "billing@contoso.com": "billing-pw"}


def relay_settings(storage, emulator, **overrides: str) -> Settings:
    env = storage.env(
        HVE_SMTP_HOST="127.0.0.1",
        HVE_SMTP_PORT=str(emulator.port),
        HVE_SMTP_CA_FILE=str(emulator.ca_file),
        HVE_ACCOUNTS=",".join(ACCOUNTS),
        HVE_PASSWORDS=json.dumps(ACCOUNTS),
        HVE_INTERNAL_DOMAINS="contoso.com,fabrikam-internal.com",
        HVE_SENDER_NAME="Contoso Relay",
        RETRY_BASE_SECONDS="1",
        RETRY_MAX_SECONDS="1",
        RECIPIENT_HASH_KEY="test-hash-key",
        # Producers that may hand the relay blobs, each under requests/<name>/<request id>/.
        BLOB_PRODUCERS="producer-a,producer-b",
    )
    env.update(overrides)
    return Settings.from_env(env)


async def enqueue(relay: Relay, doc: dict[str, Any] | str | bytes, *, encoding: str = "raw") -> None:
    body = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
    if isinstance(body, bytes):
        body = body.decode()
    if encoding == "base64":
        body = base64.b64encode(body.encode()).decode()
    await relay.queue.send_message(body)


async def drain(relay: Relay, timeout: float = 30.0) -> list[Handled]:
    """Receive, handle and delete messages (like the host on success) until the queue is empty,
    including re-enqueued copies that become visible later."""
    results: list[Handled] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = False
        async for msg in relay.queue.receive_messages(messages_per_page=16, visibility_timeout=60):
            got = True
            results.append(await relay.handle(msg.content, msg.id, msg.dequeue_count))
            await relay.queue.delete_message(msg)
        if not got:
            props = await relay.queue.get_queue_properties()
            if props.approximate_message_count == 0:
                return results
            await asyncio.sleep(0.2)
    raise AssertionError(f"queue not drained in {timeout}s; handled so far: {results}")
