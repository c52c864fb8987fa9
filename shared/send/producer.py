"""Putting mail requests on the relay's queue: what any producer does, and what the welcome scan
and the tools use. Requests too big for a queue message go to the claim-check container, and the
queue gets a stub pointing at them.

Every blob a request names lives under `requests/<producer>/<request id>/` of CLAIM_CHECK_CONTAINER
(shared/send/blobs.py): the relay reads no other blob for that request. The relay's own producers use
the producer name `hve-relay`.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterable
from typing import Any

from shared.send.blobs import RELAY_PRODUCER, producer_prefix
from shared.storage import StorageClients

# 64 KiB per queue message, less room for base64 and the envelope.
QUEUE_MESSAGE_BUDGET = 48 * 1024


# Everything producers put in the container is under this prefix (requests/<producer>/<id>/...).
# The relay deletes a claim-check blob once its request is final, and a lifecycle rule in infra/
# deletes what is left after some days: attachment blobs there are per-request copies too.
CLAIM_CHECK_PREFIX = "requests/"


def claim_check_blob_name(request_id: str, producer: str = RELAY_PRODUCER) -> str:
    """`requests/<producer>/<request id>/<uuid4>-<22 random url-safe characters>.json`: under the
    request's own prefix, with 250 random bits no other producer can predict."""
    return f"{producer_prefix(producer, request_id)}{uuid.uuid4()}-{secrets.token_urlsafe(16)}.json"


def attachment_blob_name(request_id: str, file_name: str, producer: str = RELAY_PRODUCER) -> str:
    """Where an attachment of one request goes: its request's prefix, a random folder, the file name."""
    return f"{producer_prefix(producer, request_id)}{secrets.token_urlsafe(16)}/{file_name}"


async def enqueue_requests(
    storage: StorageClients,
    queue_name: str,
    container_name: str,
    requests: Iterable[dict[str, Any]],
    *,
    encode_base64: bool = False,
    producer: str = RELAY_PRODUCER,
) -> list[str]:
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
            # The blob is under its request's id: a claim check needs one.
            request_id = request.get("id") or f"cc-{uuid.uuid4()}"
            # Unguessable and never overwritten: no producer can replace (or predict) another's
            # request. The relay deletes the blob once the request is final.
            blob = await container.upload_blob(
                claim_check_blob_name(request_id, producer), json.dumps({**request, "id": request_id}), overwrite=False
            )
            stub: dict[str, Any] = {"id": request_id, "claimCheck": {"blobUrl": blob.url}}
            if "idProof" in request:
                stub["idProof"] = request["idProof"]
            body = json.dumps(stub)
        if encode_base64:
            body = base64.b64encode(body.encode()).decode()
        # time_to_live=-1: a request must not expire unseen while HVE is throttling.
        await queue.send_message(body, time_to_live=-1)
        ids.append(str(request.get("id", "")))
    return ids
