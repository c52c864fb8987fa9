"""`POST /api/send`: one mail request over HTTP, checked like the queue path and put on the queue.

The body is one request in contract v1 (shared/schema/mail-request.v1.json). What the intake
answers:

- 202 `{"id", "status"}` once the request is on the mail queue (or was already: the same body
  again, a retry after a lost answer, two identical POSTs at once); `status` is the path of
  `GET /api/requests/<id>`;
- 400 `{"error": "refused", "reasons": [{"reason", "detail"}]}` with the queue path's refusal
  codes (shared/send/contract.py; a detail names fields and indexes, never a value);
- 409 `id-conflict` when another request (other content) already holds the id;
- 413 `too-large` for a body over HTTP_SEND_MAX_BYTES (the declared Content-Length is checked before
  the body is looked at);
- 503 `busy` when an identical POST is still putting the request on the queue (Retry-After).

**Idempotency.** The id is claimed by creating the request's ledger row (`received`, with its
`ContentDigest`, insert-only): of two POSTs under one id exactly one creates it, so only that one
enqueues. The row is the same row the send stage works on, so a queue producer and an HTTP client
share one namespace of ids, and a different request under a taken id is refused on either path. Once
the message is on the queue its id is written into the row (`QueueMessageId`): a later POST of the
same content finds the row on the queue (or beyond `received`) and answers 202 without a second
message. A row still `received` without a queue message belongs to a POST in progress: a concurrent
POST waits for it a few seconds; a row left so for INTAKE_LEASE_SECONDS belongs to a POST that died
between its claim and the queue, and the next identical POST takes it over (an ETag write, so one
does) and enqueues. A request without an id gets the queue path's: `c-` + 32 hex digits of the
SHA-256 of the body, so a client retrying an id-less POST gets the same id, not a second mail.

**Scheduled send.** A request whose `sendAt` is ahead goes on the queue hidden for the time left
(whole seconds, at most the queue's longest visibility, 7 days less a minute: shared/send/send_at.py),
so it is not read before it is due; a `sendAt` more than 7 days ahead is refused
(`send-at-too-far`) as the send stage would. The row holds the time (`SendAt`), and the send stage
still holds a copy that comes back early (shared/send/hold.py).

**Lanes.** `"priority": "high"` puts the request on the priority queue (MAIL_QUEUE_PRIORITY, its own
trigger, the same send stage), `"normal"` or none on the mail queue. The lane is not content: the
same request POSTed again in the other lane is the same request (202, not queued twice).

**Claim check.** A request that does not fit in a queue message goes to CLAIM_CHECK_CONTAINER under
`requests/http/<id>/` (producer name `http`, shared/send/blobs.py) and the queue gets the stub; the
row names the blob, so the relay deletes it once the request is final.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError

from shared.ledger import RECEIVED, Ledger, LedgerConflict, LedgerEntry
from shared.send.blobs import HTTP_PRODUCER, BlobReader
from shared.send.contract import (
    MailRequest,
    RequestRefused,
    ValidationPolicy,
    check_id_claim,
    check_send_at,
    content_digest,
    content_request_id,
    decode_queue_body,
    fits_on_queue,
    id_proof,
    is_relay_id,
    mime_base64_size,
    parse_request_id,
    queue_text,
    validate_request,
)
from shared.send.producer import claim_check_blob_name
from shared.send.replies import mask_addresses
from shared.send.retry import visibility_for
from shared.send.send_at import hold_seconds

if TYPE_CHECKING:
    from shared.send.stage import Relay

log = logging.getLogger("hve_relay.intake")

# A row `received` with no queue message this long after its claim: the POST that claimed it died
# before the queue (or its storage calls failed); an identical POST may take it over.
INTAKE_LEASE_SECONDS = 30.0
# How long a POST that finds an identical one in progress waits for its queue message.
WAIT_FOR_QUEUE_SECONDS = 5.0
POLL_SECONDS = 0.1
# The path the 202 points at (host.json routePrefix "api").
STATUS_PATH = "/api/requests/"
# What HTTP clients see of JSON: never cached, never sniffed as another type.
JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, JSON body, extra headers."""

    status: int
    body: dict[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


def status_path(request_id: str) -> str:
    return STATUS_PATH + quote(request_id, safe=":@=+")


def error(
    status: int,
    code: str,
    message: str,
    reasons: list[dict[str, str]] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> Answer:
    """The error shape of every route (shared/schema/error.v1.json)."""
    body: dict[str, Any] = {"error": code, "message": message}
    if reasons is not None:
        body["reasons"] = reasons
    body.update(extra)
    return Answer(status, body, dict(headers or {}))


def refused(refusal: RequestRefused, status: int = 400) -> Answer:
    # The contract's details name fields and indexes; the masking is for field names a caller chose.
    detail = mask_addresses(refusal.detail).replace("the queue message", "the body")
    code = "refused" if status == 400 else refusal.reason
    return error(status, code, "the request was refused", [{"reason": refusal.reason, "detail": detail}])


def declared_length(value: str | None) -> int | None:
    """The Content-Length a client declared, or None (absent or unreadable)."""
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        return None
    return length if length >= 0 else None


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


class Intake:
    """`POST /api/send` in one worker process: built by the wiring from the Relay's clients."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        queue: Any,
        container: Any,
        payloads: BlobReader,
        policy: ValidationPolicy,
        hash_key: bytes,
        clock: Callable[[], float],
        max_body_bytes: int,
        message_bytes: int | None,
        max_attachments: int,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        lease_seconds: float = INTAKE_LEASE_SECONDS,
        wait_seconds: float = WAIT_FOR_QUEUE_SECONDS,
        priority_queue: Any = None,
    ) -> None:
        self.ledger = ledger
        self.queue = queue
        # "priority": "high" goes here; without a priority queue (one lane) onto `queue` as well.
        self.priority_queue = priority_queue if priority_queue is not None else queue
        self.container = container
        self.payloads = payloads
        self.policy = policy
        self.key = hash_key
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.message_bytes = message_bytes
        self.max_attachments = max_attachments
        self.sleep = sleep
        self.lease_seconds = lease_seconds
        self.wait_seconds = wait_seconds

    # --- the route ------------------------------------------------------------------------------

    async def submit(self, body: bytes, content_length: str | None = None) -> Answer:
        declared = declared_length(content_length)
        if declared is not None and declared > self.max_body_bytes:
            return self._too_large(declared)
        if len(body) > self.max_body_bytes:
            return self._too_large(len(body))
        try:
            request_id, doc, request = self._check(body)
        except RequestRefused as refusal:
            return refused(refusal)
        full: dict[str, Any] = {**doc, "id": request_id}
        if is_relay_id(request_id):
            full["idProof"] = id_proof(self.key, request_id)
        digest = content_digest(self.key, doc)
        text = queue_text(full)
        queue = self.priority_queue if request.priority == "high" else self.queue
        try:
            return await self._claim_and_enqueue(request_id, digest, text, request, queue)
        except AzureError as exc:
            log.warning("POST /api/send %s: storage failed: %s", request_id, type(exc).__name__)
            return error(503, "unavailable", "storage could not be reached; try again", headers={"Retry-After": "5"})

    def _too_large(self, size: int) -> Answer:
        return refused(
            RequestRefused(
                "too-large",
                f"the body is {size} bytes; the limit is {self.max_body_bytes} (HTTP_SEND_MAX_BYTES): "
                "send big attachments as blobs (blobUrl) on the queue path",
            ),
            status=413,
        )

    def _check(self, body: bytes) -> tuple[str, dict[str, Any], MailRequest]:
        """The request's id, its JSON object and the typed request; RequestRefused as on the queue path."""
        doc = decode_queue_body(body)
        if "claimCheck" in doc:
            raise RequestRefused("schema", "claimCheck is for the queue; POST the whole request")
        request_id = parse_request_id(doc.get("id"))
        if request_id is None:
            request_id = content_request_id(body)
        else:
            check_id_claim(doc, request_id, self.key)
        request = validate_request(doc, self.policy)
        # What the send stage would refuse before reading anything, refused here already.
        check_send_at(request, self.clock())
        if len(request.attachments) > self.max_attachments:
            raise RequestRefused(
                "too-many-attachments",
                f"{len(request.attachments)} attachments; the limit is {self.max_attachments}",
            )
        for i, attachment in enumerate(request.attachments):
            if attachment.blob_url is not None:
                self.payloads.locate(attachment.blob_url, request_id, f"attachments[{i}].blobUrl")
        inline = sum(mime_base64_size(len(a.content)) for a in request.attachments if a.content is not None)
        if self.message_bytes is not None and inline > self.message_bytes:
            raise RequestRefused(
                "too-large",
                f"the attachments take about {inline} bytes encoded; the message limit is {self.message_bytes}",
            )
        return request_id, doc, request

    # --- the claim ------------------------------------------------------------------------------

    async def _claim_and_enqueue(
        self, request_id: str, digest: str, text: str, request: MailRequest, queue: Any
    ) -> Answer:
        blob_url = ""
        if not fits_on_queue(text):
            blob_url = await self._upload(request_id, text)
        now = self.clock()
        entry = LedgerEntry(
            request_id=request_id,
            state=RECEIVED,
            first_received=_utc(now),
            updated=_utc(now),
            category=request.category,
            chunks_total=0,
            claim_blob=blob_url,
            content_digest=digest,
            send_at=request.send_at,
        )
        try:
            entry = await self.ledger.save(entry)
        except LedgerConflict:
            if blob_url:
                await self._delete_blob(blob_url)
            return await self._taken(request_id, digest, text, request, queue)
        return await self._enqueue(entry, text, queue)

    async def _taken(self, request_id: str, digest: str, text: str, request: MailRequest, queue: Any) -> Answer:
        """The id has a row: this request's (202, or take over a dead POST's claim) or another's (409)."""
        polls = max(1, int(self.wait_seconds / POLL_SECONDS))
        for _ in range(polls):
            current = await self.ledger.get(request_id)
            if current is None:  # a failed POST withdrew its claim a moment ago: claim it now
                return await self._claim_and_enqueue(request_id, digest, text, request, queue)
            if current.content_digest and current.content_digest != digest:
                return error(
                    409,
                    "id-conflict",
                    "another request with different content was already received under this id; "
                    "give each request its own id",
                    [{"reason": "id-conflict", "detail": "id is taken by a request with other content"}],
                    id=request_id,
                )
            if current.state != RECEIVED or current.queue_message_id:
                return self._accepted(request_id)
            if self.clock() - current.updated.timestamp() >= self.lease_seconds:
                try:
                    mine = await self.ledger.save(current.evolve(updated=_utc(self.clock())))
                except LedgerConflict:
                    continue  # another POST took it over, or the send stage moved it on: look again
                return await self._enqueue(mine, text, queue)
            await self.sleep(POLL_SECONDS)
        return error(
            503,
            "busy",
            "an identical request is being put on the queue right now; ask again",
            headers={"Retry-After": str(max(1, round(self.lease_seconds)))},
        )

    async def _enqueue(self, entry: LedgerEntry, text: str, queue: Any) -> Answer:
        """Put the claimed request on its lane's queue (its stub when it has a claim-check blob), then
        note the queue message in its row."""
        if entry.claim_blob:
            stub: dict[str, Any] = {"id": entry.request_id, "claimCheck": {"blobUrl": entry.claim_blob}}
            if is_relay_id(entry.request_id):
                stub["idProof"] = id_proof(self.key, entry.request_id)
            text = queue_text(stub)
        elif not fits_on_queue(text):  # taken over from a POST that died before its blob
            entry = entry.evolve(claim_blob=await self._upload(entry.request_id, text))
            entry = await self.ledger.save(entry)
            return await self._enqueue(entry, text, queue)
        # A sendAt ahead: hidden until then (no jitter; at most the queue's longest visibility).
        delay = visibility_for(hold_seconds(entry.send_at, self.clock()), jitter_fraction=0.0)
        try:
            # time_to_live=-1: a request must not expire unseen while HVE is throttling.
            sent = await queue.send_message(text, visibility_timeout=delay or None, time_to_live=-1)
        except AzureError:
            await self._withdraw(entry)
            raise
        try:
            await self.ledger.save(entry.evolve(queue_message_id=str(sent.id)))
        except LedgerConflict:
            pass  # the send stage has the request already: it is on the queue, which is all this says
        except AzureError as exc:
            # The request is on the queue; a later identical POST may enqueue it again after the lease
            # (the send stage treats that copy as the duplicate it is).
            log.warning("POST /api/send %s: noting the queue message failed: %s", entry.request_id, exc)
        return self._accepted(entry.request_id)

    def _accepted(self, request_id: str) -> Answer:
        path = status_path(request_id)
        return Answer(202, {"id": request_id, "status": path}, {"Location": path})

    async def _withdraw(self, entry: LedgerEntry) -> None:
        """Give the id back after the queue write failed (only while the row is still this claim)."""
        try:
            await self.ledger.withdraw(entry)
        except AzureError as exc:
            log.warning("POST /api/send %s: withdrawing the claim failed: %s", entry.request_id, exc)

    # --- blobs ----------------------------------------------------------------------------------

    async def _upload(self, request_id: str, text: str) -> str:
        name = claim_check_blob_name(request_id, HTTP_PRODUCER)
        data = text.encode("utf-8")
        try:
            blob = await self.container.upload_blob(name, data, overwrite=False)
        except ResourceNotFoundError:  # Azurite starts empty (Bicep creates the container in Azure)
            try:
                await self.container.create_container()
            except ResourceExistsError:
                pass
            blob = await self.container.upload_blob(name, data, overwrite=False)
        return str(blob.url)

    async def _delete_blob(self, url: str) -> None:
        try:
            await self.container.delete_blob(self.payloads.blob_name(url))
        except (AzureError, RequestRefused) as exc:  # the lifecycle rule takes what is left
            log.warning("POST /api/send: deleting an unused claim-check blob failed: %s", type(exc).__name__)


def intake_for(relay: Relay, **overrides: Any) -> Intake:
    """The intake on a Relay's own clients and settings (the wiring's, and the tests' with a few
    `overrides`: a clock, a priority queue, short leases)."""
    kwargs: dict[str, Any] = dict(
        ledger=relay.ledger,
        queue=relay.queue,
        container=relay.storage.container(relay.settings.claim_check_container),
        payloads=relay.payloads,
        policy=relay.policy,
        hash_key=relay.settings.recipient_hash_key,
        clock=relay.clock,
        max_body_bytes=relay.settings.http_send_max_bytes,
        message_bytes=relay.limits.message_bytes,
        max_attachments=relay.settings.max_attachments,
    )
    kwargs.update(overrides)
    return Intake(**kwargs)
