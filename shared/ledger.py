"""The outcome ledger in Table storage: one row per request id.

Never bodies, never recipient addresses. Recipients are written to a second table keyed by a
keyed hash (HMAC-SHA256) of the address, so "was this address mailed?" has an answer while no
table holds a recipient list.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from shared.send.replies import mask_addresses

RECEIVED, SENDING, SENT, DEFERRED, REFUSED, DEAD = "received", "sending", "sent", "deferred", "refused", "dead"
FINAL_STATES = frozenset({SENT, REFUSED, DEAD})
_ROW = "request"
_MAX_TEXT = 500


class LedgerConflict(Exception):
    """Another instance changed the row since it was read (ETag mismatch) or created it first;
    or our own write did land and only its answer was lost (the SDK's retry then met our ETag):
    `write` is that write's mark, which the row holds in that case only (`Ledger.landed`)."""

    def __init__(self, request_id: str, write: str = "") -> None:
        super().__init__(request_id)
        self.write = write


@dataclass(frozen=True)
class LedgerEntry:
    request_id: str
    state: str
    first_received: datetime
    updated: datetime
    attempts: int = 0
    account: str = ""
    category: str = ""
    internal_recipients: int = 0
    external_recipients: int = 0
    last_code: int = 0
    last_reply: str = ""
    reason: str = ""
    message_id: str = ""
    queue_message_id: str = ""
    chunks_total: int = 1
    chunks_sent: int = 0
    # A slot the governor booked for this request later today (account, epoch seconds, chunk).
    booked_account: str = ""
    booked_at: float = 0.0
    booked_chunk: int = -1
    booked_wake: float = 0.0  # when the booked copy was due to become visible on the queue
    # Recipients by their index in the request's (de-duplicated) recipient list, never by address:
    # refused for now (4xx at RCPT), still to go in a follow-up transaction; refused for good (5xx).
    pending_recipients: tuple[int, ...] = ()
    refused_recipients: tuple[int, ...] = ()
    # On the suppression list when the request was prepared: left out, never sent (shared/send/suppression.py).
    suppressed_recipients: tuple[int, ...] = ()
    # The request's claim-check blob (URL), deleted once the request is final.
    claim_blob: str = ""
    # Keyed digest of the request's content (contract.content_digest; never the content): another
    # request under the same id is an `id-conflict`, the same content again a duplicate.
    content_digest: str = ""
    # The request's sendAt (epoch seconds), when it names one: its age limit counts from there.
    send_at: float | None = None
    etag: str | None = field(default=None, compare=False)
    write: str = field(default="", compare=False)  # a random mark of the write that stored this row

    def evolve(self, **changes: Any) -> LedgerEntry:
        return replace(self, **changes)

    @property
    def age_from(self) -> float:
        """Where the request's age limit (SEND_MAX_AGE_HOURS) counts from: its sendAt when it has
        one (earlier or later than its first receipt), else its first receipt."""
        return self.send_at if self.send_at is not None else self.first_received.timestamp()


def recipient_hash(key: bytes, address: str) -> str:
    return hmac.new(key, address.strip().lower().encode("utf-8"), hashlib.sha256).hexdigest()


def _to_row(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "PartitionKey": entry.request_id,
        "RowKey": _ROW,
        "State": entry.state,
        "FirstReceived": entry.first_received,
        "Updated": entry.updated,
        "Attempts": entry.attempts,
        "Account": entry.account,
        "Category": entry.category,
        "InternalRecipients": entry.internal_recipients,
        "ExternalRecipients": entry.external_recipients,
        "LastCode": entry.last_code,
        # Free text from HVE or the contract: the last place an address could slip into the table.
        "LastReply": mask_addresses(entry.last_reply)[:_MAX_TEXT],
        "Reason": mask_addresses(entry.reason)[:_MAX_TEXT],
        "MessageId": entry.message_id,
        "QueueMessageId": entry.queue_message_id,
        "ChunksTotal": entry.chunks_total,
        "ChunksSent": entry.chunks_sent,
        "BookedAccount": entry.booked_account,
        "BookedAt": float(entry.booked_at),
        "BookedChunk": entry.booked_chunk,
        "BookedWake": float(entry.booked_wake),
        "PendingRecipients": _indices_to_text(entry.pending_recipients),
        "RefusedRecipients": _indices_to_text(entry.refused_recipients),
        "SuppressedRecipients": _indices_to_text(entry.suppressed_recipients),
        "ClaimCheck": entry.claim_blob,
        "ContentDigest": entry.content_digest,
        "Write": entry.write,
        **({"SendAt": float(entry.send_at)} if entry.send_at is not None else {}),
    }


def as_stored(entry: LedgerEntry) -> LedgerEntry:
    """The entry as its row holds it: free text masked and cut as `_to_row` writes it (an entry kept
    in memory after a write still has HVE's reply as it came, addresses and all)."""
    return entry.evolve(
        last_reply=mask_addresses(entry.last_reply)[:_MAX_TEXT], reason=mask_addresses(entry.reason)[:_MAX_TEXT]
    )


def _indices_to_text(indices: tuple[int, ...]) -> str:
    return ",".join(str(i) for i in indices)


def _indices_from_text(text: str | None) -> tuple[int, ...]:
    return tuple(int(i) for i in text.split(",")) if text else ()


def _from_row(row: Any) -> LedgerEntry:
    def when(name: str) -> datetime:
        return _from_row_time(row.get(name))

    return LedgerEntry(
        request_id=row["PartitionKey"],
        state=row.get("State", RECEIVED),
        first_received=when("FirstReceived"),
        updated=when("Updated"),
        attempts=int(row.get("Attempts", 0)),
        account=row.get("Account", ""),
        category=row.get("Category", ""),
        internal_recipients=int(row.get("InternalRecipients", 0)),
        external_recipients=int(row.get("ExternalRecipients", 0)),
        last_code=int(row.get("LastCode", 0)),
        last_reply=row.get("LastReply", ""),
        reason=row.get("Reason", ""),
        message_id=row.get("MessageId", ""),
        queue_message_id=row.get("QueueMessageId", ""),
        chunks_total=int(row.get("ChunksTotal", 1)),
        chunks_sent=int(row.get("ChunksSent", 0)),
        booked_account=row.get("BookedAccount", ""),
        booked_at=float(row.get("BookedAt", 0.0)),
        booked_chunk=int(row.get("BookedChunk", -1)),
        booked_wake=float(row.get("BookedWake", 0.0)),
        pending_recipients=_indices_from_text(row.get("PendingRecipients")),
        refused_recipients=_indices_from_text(row.get("RefusedRecipients")),
        suppressed_recipients=_indices_from_text(row.get("SuppressedRecipients")),
        claim_blob=row.get("ClaimCheck", ""),
        content_digest=row.get("ContentDigest", ""),
        etag=row.metadata.get("etag") if hasattr(row, "metadata") else None,
        write=row.get("Write", "") or "",
        send_at=float(row["SendAt"]) if row.get("SendAt") is not None else None,
    )


class Ledger:
    def __init__(self, table: Any, recipient_index: Any, hash_key: bytes) -> None:
        self._table = table
        self._index = recipient_index
        self._key = hash_key

    async def get(self, request_id: str) -> LedgerEntry | None:
        try:
            return _from_row(await self._table.get_entity(request_id, _ROW))
        except ResourceNotFoundError:
            return None

    async def save(self, entry: LedgerEntry) -> LedgerEntry:
        """Create the row (entry.etag None) or replace it if unchanged since read; else LedgerConflict."""
        entry = entry.evolve(write=uuid.uuid4().hex)
        row = _to_row(entry)
        try:
            if entry.etag is None:
                meta = await self._table.create_entity(row)
            else:
                meta = await self._table.update_entity(
                    row, mode="replace", etag=entry.etag, match_condition=MatchConditions.IfNotModified
                )
        except (ResourceExistsError, ResourceModifiedError) as exc:
            raise LedgerConflict(entry.request_id, entry.write) from exc
        except ResourceNotFoundError as exc:
            raise LedgerConflict(entry.request_id, entry.write) from exc
        return entry.evolve(etag=meta.get("etag"))

    async def withdraw(self, entry: LedgerEntry) -> bool:
        """Delete the row only while it is as `entry` read or wrote it (its ETag): a claim given back
        (`POST /api/send` when its queue write failed). False when the row changed or is gone."""
        try:
            await self._table.delete_entity(
                entry.request_id, _ROW, etag=entry.etag, match_condition=MatchConditions.IfNotModified
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            return False
        return True

    @staticmethod
    def landed(conflict: LedgerConflict, current: LedgerEntry | None) -> bool:
        """Whether the write that raised `conflict` is the one `current` (the row read after it)
        holds: it landed, only its answer was lost."""
        return bool(conflict.write) and current is not None and current.write == conflict.write

    async def sending_before(self, cutoff: datetime, limit: int) -> list[LedgerEntry]:
        """Up to `limit` request rows still `sending` whose last update is older than `cutoff`."""
        found: list[LedgerEntry] = []
        async for row in self._table.query_entities(
            "RowKey eq @rk and State eq @state and Updated lt @cutoff",
            parameters={"rk": _ROW, "state": SENDING, "cutoff": cutoff},
        ):
            found.append(_from_row(row))
            if len(found) >= limit:
                break
        return found

    async def unsettled_before(self, cutoff: datetime, limit: int) -> list[LedgerEntry]:
        """Up to `limit` request rows neither final nor `sending` (deferred, received) whose last
        update is older than `cutoff`."""
        found: list[LedgerEntry] = []
        query = (
            "RowKey eq @rk and Updated lt @cutoff and State ne @sending and State ne @sent "
            "and State ne @refused and State ne @dead"
        )
        async for row in self._table.query_entities(
            query,
            parameters={
                "rk": _ROW,
                "cutoff": cutoff,
                "sending": SENDING,
                "sent": SENT,
                "refused": REFUSED,
                "dead": DEAD,
            },
        ):
            found.append(_from_row(row))
            if len(found) >= limit:
                break
        return found

    async def put(self, entry: LedgerEntry) -> LedgerEntry:
        """Write unconditionally (for rows only this invocation can own, e.g. unparseable messages)."""
        entry = entry.evolve(write=uuid.uuid4().hex)
        meta = await self._table.upsert_entity(_to_row(entry), mode="replace")
        return entry.evolve(etag=meta.get("etag"))

    async def record_chunk(
        self, entry: LedgerEntry, index: int, *, account: str, recipients: int, code: int, message_id: str
    ) -> None:
        """One row per SMTP transaction of a chunked request, beside the request's row."""
        await self._table.upsert_entity(
            {
                "PartitionKey": entry.request_id,
                "RowKey": f"chunk-{index + 1:04d}",
                "State": SENT,
                "Account": account,
                "Recipients": recipients,
                "LastCode": code,
                "MessageId": message_id,
                "Updated": entry.updated,
            },
            mode="replace",
        )

    async def chunks(self, request_id: str) -> list[dict[str, Any]]:
        rows = []
        async for row in self._table.query_entities(
            "PartitionKey eq @pk and RowKey ge 'chunk-' and RowKey lt 'chunk.'", parameters={"pk": request_id}
        ):
            rows.append(dict(row))
        return sorted(rows, key=lambda r: r["RowKey"])

    async def index_recipients(self, entry: LedgerEntry, addresses: Iterable[str]) -> None:
        rows = [
            {
                "PartitionKey": recipient_hash(self._key, addr),
                "RowKey": entry.request_id,
                "State": entry.state,
                "Account": entry.account,
                "MessageId": entry.message_id,
                "At": entry.updated,
            }
            for addr in {a.strip().lower() for a in addresses}
        ]
        await asyncio.gather(*(self._index.upsert_entity(row) for row in rows))

    async def requests_for_address(self, address: str) -> list[dict[str, Any]]:
        """Operator look-up: the requests that reached this address (by its keyed hash)."""
        key = recipient_hash(self._key, address)
        found = []
        async for row in self._index.query_entities("PartitionKey eq @pk", parameters={"pk": key}):
            found.append(
                {
                    "request_id": row["RowKey"],
                    "state": row.get("State"),
                    "account": row.get("Account"),
                    "message_id": row.get("MessageId"),
                    "at": row.get("At"),
                }
            )
        return found

    async def summary(self, since: datetime | None = None) -> dict[str, Any]:
        """Counts by state, by (state, reason), and of requests that took more than one attempt;
        with `since`, only requests first received then or later."""
        by_state: dict[str, int] = {}
        reasons: dict[str, int] = {}
        retried = 0
        async for row in self._rows(since, ["State", "Reason", "Attempts"]):
            state = row.get("State", "?")
            retried += int(row.get("Attempts") or 0) > 1
            by_state[state] = by_state.get(state, 0) + 1
            if row.get("Reason"):
                key = f"{state}: {row['Reason'].split(':', 1)[0]}"
                reasons[key] = reasons.get(key, 0) + 1
        return {"by_state": by_state, "reasons": reasons, "retried": retried}

    async def report(self, since: datetime) -> list[dict[str, Any]]:
        """The usage report HVE's own lacks, live and with errors: per UTC day, account and category,
        requests by outcome and recipients by kind (recipients of sent requests only)."""
        groups: dict[tuple[str, str, str], dict[str, Any]] = {}
        fields = ["State", "Account", "Category", "FirstReceived", "InternalRecipients", "ExternalRecipients"]
        async for row in self._rows(since, fields):
            day = _from_row_time(row.get("FirstReceived")).date().isoformat()
            key = (day, row.get("Account") or "-", row.get("Category") or "-")
            group = groups.setdefault(
                key,
                {
                    "day": key[0],
                    "account": key[1],
                    "category": key[2],
                    "requests": 0,
                    "outcomes": {},
                    "internal_recipients": 0,
                    "external_recipients": 0,
                },
            )
            state = row.get("State", "?")
            group["requests"] += 1
            group["outcomes"][state] = group["outcomes"].get(state, 0) + 1
            if state == SENT:
                group["internal_recipients"] += int(row.get("InternalRecipients") or 0)
                group["external_recipients"] += int(row.get("ExternalRecipients") or 0)
        return [groups[k] for k in sorted(groups)]

    def _rows(self, since: datetime | None, fields: list[str]):
        if since is None:
            return self._table.query_entities("RowKey eq @rk", parameters={"rk": _ROW}, select=fields)
        return self._table.query_entities(
            "RowKey eq @rk and FirstReceived ge @since", parameters={"rk": _ROW, "since": since}, select=fields
        )


def _from_row_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(0, UTC)
