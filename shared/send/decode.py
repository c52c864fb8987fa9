"""Step 1 of the send stage: a queue message becomes a request to look up, a refusal, or a pacer tick.

Nothing here touches the ledger. The body is decoded (raw or base64) and its id settled: the id it
names, the id of its claim check, or, without one, the id derived from its content (never the queue
message id: the host's poison copy and a replay are new queue messages, yet must map to the same
row and Message-ID). `read_full` reads what a claim check points at (a blob of this request's own;
shared/send/blobs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.send.blobs import BlobReader
from shared.send.contract import (
    ClaimCheck,
    RequestRefused,
    check_id_claim,
    claim_check_of,
    content_request_id,
    decode_queue_body,
    id_proof,
    is_relay_id,
    parse_request_id,
)

# The body of the pacer message (shared/send/pacer.py).
PACER_KEY = "hveRelayPacer"


@dataclass(frozen=True)
class Decoded:
    """A readable request message, with the id it is known by."""

    request_id: str
    doc: dict[str, Any]  # the queue message's JSON object (a claim-check stub, or the whole request)
    claim: ClaimCheck | None
    # What goes back on the queue: the caller's message, now carrying its id (and, for an id of
    # the relay's own, the proof that the relay gave it).
    stub: dict[str, Any]


@dataclass(frozen=True)
class Unreadable:
    """A message that cannot be read, or may not use its id: recorded under its queue message id."""

    refusal: RequestRefused


@dataclass(frozen=True)
class PacerTick:
    """The relay's own pacer message."""


def decode(body: bytes | str, key: bytes) -> Decoded | Unreadable | PacerTick:
    try:
        doc = decode_queue_body(body)
        if PACER_KEY in doc and len(doc) == 1:
            return PacerTick()
        claim = claim_check_of(doc)
        request_id = (claim.id if claim else parse_request_id(doc.get("id"))) or content_request_id(body)
        if doc.get("id") is not None:
            # A producer's claim on an id of the relay's own namespaces (`c-`, `welcome-`) is set
            # aside under its queue message id: it never takes (or touches) the row of that id.
            check_id_claim(doc, request_id, key)
    except RequestRefused as refusal:
        return Unreadable(refusal)
    stub = {**doc, "id": request_id}
    if is_relay_id(request_id):
        stub["idProof"] = id_proof(key, request_id)
    return Decoded(request_id, doc, claim, stub)


async def read_full(payloads: BlobReader, decoded: Decoded) -> dict[str, Any]:
    """The request's JSON object: the message itself, or what its claim check points at."""
    claim, request_id = decoded.claim, decoded.request_id
    if claim is None:
        return decoded.doc
    full = decode_queue_body(await payloads.read(claim.blob_url, "claim check", request_id, claim_check=True))
    if full.get("id") not in (None, request_id):
        raise RequestRefused("claim-check", "the id in the blob differs from the id on the queue")
    return {**full, "id": request_id}
