"""Putting mail requests on the relay's queue: what any producer does, and what the welcome scan
uses. Requests too big for a queue message go to the claim-check container, and the queue gets a
stub pointing at them."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from typing import Any, Iterable

from .storage import StorageClients

# 64 KiB per queue message, less room for base64 and the envelope.
QUEUE_MESSAGE_BUDGET = 48 * 1024


# The relay deletes claim-check blobs under this prefix once their request is final (and a
# lifecycle rule in infra/ deletes what is left after some days): never put attachments here.
CLAIM_CHECK_PREFIX = "requests/"


def claim_check_blob_name() -> str:
    """`requests/<uuid4>-<22 random url-safe characters>.json`: 250 random bits, no request id."""
    return f"{CLAIM_CHECK_PREFIX}{uuid.uuid4()}-{secrets.token_urlsafe(16)}.json"


async def enqueue_requests(storage: StorageClients, queue_name: str, container_name: str,
                           requests: Iterable[dict[str, Any]], *, encode_base64: bool = False) -> list[str]:
    """Put each request on the queue (claim check for big ones). Returns the ids it carried ('' if none)."""
    queue = await storage.queue(queue_name)
    container = storage.container(container_name)
    container_ready = False
    ids: list[str] = []
    for request in requests:
        body = json.dumps(request, separators=(",", ":"))
        if len(body.encode()) > QUEUE_MESSAGE_BUDGET:
            if not container_ready:
                if not await container.exists():
                    await container.create_container()
                container_ready = True
            request_id = request.get("id") or f"cc-{uuid.uuid4()}"
            # Unguessable and never overwritten: no producer can replace (or predict) another's
            # request. The relay deletes the blob once the request is final.
            blob = await container.upload_blob(claim_check_blob_name(), json.dumps({**request, "id": request_id}),
                                               overwrite=False)
            body = json.dumps({"id": request_id, "claimCheck": {"blobUrl": blob.url}})
        if encode_base64:
            body = base64.b64encode(body.encode()).decode()
        # time_to_live=-1: a request must not expire unseen while HVE is throttling.
        await queue.send_message(body, time_to_live=-1)
        ids.append(str(request.get("id", "")))
    return ids
