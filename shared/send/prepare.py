"""Step 3 of the send stage: the request read whole, validated, its attachments fetched, its MIME
built and sized, its recipients planned in chunks (one SMTP transaction each).

Claim checks and blob attachments are read only from blobs of this request's own
(shared/send/blobs.py), and bounded before anything is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from shared.governor.pacing import chunk_recipients
from shared.hve.limits import Limits
from shared.ledger import DEAD, REFUSED, LedgerEntry
from shared.send.contract import (
    MailRequest,
    RequestRefused,
    check_send_at,
    content_digest,
    is_internal,
    mime_base64_size,
    validate_request,
)
from shared.send.decode import Decoded, read_full
from shared.send.ledger_gate import Admitted
from shared.send.mime import automatic_headers, build_message, message_id
from shared.send.outcome import Handled, utc
from shared.send.suppression import SuppressionList, all_suppressed

if TYPE_CHECKING:
    from shared.send.stage import Relay


@dataclass(frozen=True)
class Prepared:
    request: MailRequest
    attachments: list[tuple[str, str, bytes]]
    recipients: list[str]  # envelope addresses, de-duplicated; the ledger names them by index
    chunks: list[list[int]]  # recipient indices of each planned SMTP transaction
    first: bytes | None = None  # the message of chunk 0 as the first account
    full: dict[str, Any] | None = None  # the request's JSON object (for its content digest)


def envelope_of(entry: LedgerEntry, prepared: Prepared, index: int, limits: Limits) -> list[int] | None:
    """Recipient indices of transaction `index`: a planned chunk, then follow-ups for the
    recipients HVE deferred at RCPT; None when nothing is left to send. Suppressed recipients are left out."""
    refused = set(entry.refused_recipients) | set(entry.suppressed_recipients)
    if index < len(prepared.chunks):
        return [i for i in prepared.chunks[index] if i not in refused]
    pending = [i for i in entry.pending_recipients if i not in refused]
    return pending[: limits.recipients_per_message or len(pending)] or None


class Preparer:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        # The suppression list (shared/send/suppression.py), opened on first use; the wiring shares
        # the process's one list with the priority lane.
        self.suppressions: SuppressionList | None = None

    async def suppression_list(self) -> SuppressionList | None:
        """The suppression list; None when SUPPRESSION_ENABLED is false."""
        r = self.relay
        if self.suppressions is None and r.settings.suppression_enabled:
            opened = await SuppressionList.of(r.storage, r.settings, r.clock)
            self.suppressions = self.suppressions or opened  # requests that opened it at once share the first
        return self.suppressions

    async def prepare(self, admitted: Admitted, decoded: Decoded) -> tuple[LedgerEntry, Prepared] | Handled:
        """The request ready to send, and its row annotated (category, recipients, Message-ID,
        chunks, sendAt); or the request refused (or dead, past its age limit) and recorded."""
        r = self.relay
        key = r.settings.recipient_hash_key
        entry, claim = admitted.entry, decoded.claim
        try:
            prepared = await self._read(decoded, admitted.full)
        except RequestRefused as refusal:
            # A claim-check blob that is missing, elsewhere or another request's is not ours to delete.
            if claim is not None and refusal.reason not in ("claim-check", "blob-not-owned"):
                entry = entry.evolve(claim_blob=claim.blob_url)
            if not entry.content_digest:
                # What is known of it (the stub, when its blob could not be read): a different
                # request under this id is still told apart.
                entry = entry.evolve(content_digest=content_digest(key, decoded.doc))
            return await r.recorder.finish(entry, REFUSED, f"{refusal.reason}: {refusal.detail}")
        if claim is not None:
            entry = entry.evolve(claim_blob=claim.blob_url)
        if not entry.content_digest:
            entry = entry.evolve(content_digest=content_digest(key, prepared.full or decoded.doc))
        request = prepared.request
        internal = sum(1 for a in request.recipients if is_internal(a, r.policy.internal_domains))
        entry = entry.evolve(
            category=request.category,
            internal_recipients=internal,
            external_recipients=len(request.recipients) - internal,
            message_id=message_id(decoded.request_id, r.message_id_domain, key=key),
            chunks_total=max(entry.chunks_total, len(prepared.chunks)),
            send_at=request.send_at,
        )
        # The clock is read after the downloads: a slot is the moment the message goes, not the
        # moment the handler started.
        expired = r.recorder.expired(entry, r.clock())
        if expired:
            return await r.recorder.finish(entry, DEAD, expired)
        if (suppressions := await self.suppression_list()) is not None:  # one batched lookup
            entry = await suppressions.skip(entry, prepared.recipients, prepared.chunks, r.policy.internal_domains)
            if len(entry.suppressed_recipients) >= len(prepared.recipients):
                return await r.recorder.finish(entry, REFUSED, all_suppressed(len(prepared.recipients)))
        return entry, prepared

    async def _read(self, decoded: Decoded, full: dict[str, Any] | None) -> Prepared:
        """Read the full request (claim check, blob attachments), validate it, check its size."""
        r = self.relay
        request_id = decoded.request_id
        if full is None:
            full = await read_full(r.payloads, decoded)
        request = validate_request(full, r.policy)
        check_send_at(request, r.clock())
        attachments = await self._attachments(request, request_id)
        recipients = list(dict.fromkeys(a.addr for a in request.recipients))
        prepared = Prepared(
            request,
            attachments,
            recipients,
            chunk_recipients(range(len(recipients)), r.limits.recipients_per_message),
            full=full,
        )
        # Built once here for the size check, and reused if the first chunk goes out as this account.
        prepared = replace(prepared, first=self.message(prepared, request_id, r.settings.accounts[0], 0, r.clock()))
        size = len(prepared.first or b"")
        if r.limits.message_bytes is not None and size > r.limits.message_bytes:
            raise RequestRefused(
                "too-large", f"the encoded message is {size} bytes; the limit is {r.limits.message_bytes}"
            )
        return prepared

    async def _attachments(self, request: MailRequest, request_id: str) -> list[tuple[str, str, bytes]]:
        """The attachments' bytes, bounded before anything is read: their number, then the sum of
        their sizes (blob properties, base64 overhead included) against the message size limit. A
        few hundred bytes naming one big blob many times are refused without a download."""
        r = self.relay
        if len(request.attachments) > r.settings.max_attachments:
            raise RequestRefused(
                "too-many-attachments",
                f"{len(request.attachments)} attachments; the limit is {r.settings.max_attachments}",
            )
        limit = r.limits.message_bytes
        # Every blob is checked to be this request's (shared/send/blobs.py) before anything of any is read.
        for i, a in enumerate(request.attachments):
            if a.blob_url is not None:
                r.payloads.locate(a.blob_url, request_id, f"attachments[{i}].blobUrl")
        sizes = [
            len(a.content)
            if a.content is not None
            else await r.payloads.size(a.blob_url or "", f"attachment {a.name!r}", request_id)
            for a in request.attachments
        ]
        estimate = sum(mime_base64_size(size) for size in sizes)
        if limit is not None and estimate > limit:
            raise RequestRefused(
                "too-large", f"the attachments take about {estimate} bytes encoded; the message limit is {limit}"
            )
        # What the blobs may still grow by before the limit: a blob that grew past it since its size
        # was read is refused at that many bytes, never read whole.
        slack = (limit - estimate) * 3 // 4 if limit is not None else None
        out: list[tuple[str, str, bytes]] = []
        for a, size in zip(request.attachments, sizes, strict=False):
            if a.content is None:
                data = await r.payloads.read(
                    a.blob_url or "", f"attachment {a.name!r}", request_id, size + slack if slack is not None else None
                )
                if slack is not None:
                    slack -= max(0, len(data) - size)
                out.append((a.name, a.content_type, data))
            else:
                out.append((a.name, a.content_type, a.content))
        return out

    def message(self, prepared: Prepared, request_id: str, account: str, index: int, now: float) -> bytes:
        # Transaction `index` > 0 (another chunk, or a follow-up for recipients HVE deferred) has
        # its own Message-ID suffix, or Exchange would drop it as a duplicate of the first.
        r = self.relay
        return build_message(
            prepared.request,
            request_id=request_id,
            account=account,
            message_id_key=r.settings.recipient_hash_key,
            sender_name=r.settings.sender_name,
            message_id_domain=r.message_id_domain,
            attachments=prepared.attachments,
            now=utc(now),
            chunk=index,
            relay_headers=automatic_headers(r.settings),
        )
