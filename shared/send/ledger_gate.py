"""Step 2 of the send stage: the ledger gate, and the one policy for ledger write conflicts.

Every delivery of a request writes its one ledger row: the host's retries, a poison replay, the
relay's own deferred copies, two instances at the same moment. The writes are conditional (create,
or replace if unchanged since read: the ETag), so any of them can meet a conflict. One policy
settles every conflict, by what the write says:

- A **claim** says "this delivery is the one sending": the plain path's creation of the row as
  `sending`, and the ETag'd `sending` write just before MAIL FROM (`claim`). A claim never
  overwrites. On a conflict another delivery has the request: at the row's creation the row is
  read and judged like any row found (`admit`, below); before MAIL FROM the send is called off
  and the copy comes back in BUSY_RECHECK_SECONDS, when that judgement is made.
- A **record** says what happened: progress after an accepted transaction, a deferral, a final
  outcome, a refusal (`write`). On a conflict the row is read once, and
  1. a final row stays final. It is this delivery's own write when that landed and only its
     answer was lost (`Ledger.landed`);
  2. a deferral yields to a delivery sending under a live lease (that one's outcome follows);
  3. otherwise what this delivery learned from HVE is the truth: the row is overwritten.
  `Written.ours` says whether the row holds this write; the stage counts an outcome in the
  aggregates exactly then (shared/send/record.py), so a retry, a duplicate delivery or a lost
  answer never counts a request twice.

Why claims and records differ: a claim that overwrote would let two deliveries send the same
transaction; a record that yielded to a `sending` row would drop what HVE already accepted (the
next delivery would send it again), and one that overwrote a final row would move a finished
request back. Progress is a record whose state is `sending`, so rule 2 never applies to it.

A row found (`admit`): none, a new request; another request's content under the id, `id-conflict`
(refused under the queue message id); final, a duplicate (acknowledged, nothing sent); `sending`
under a live lease, busy (the copy comes back in at most BUSY_RECHECK_SECONDS); otherwise
(received, deferred, a `sending` row whose lease ran out) this delivery goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.ledger import FINAL_STATES, SENDING, LedgerConflict, LedgerEntry
from shared.send.contract import RequestRefused, content_digest
from shared.send.decode import Decoded, read_full
from shared.send.outcome import Handled, utc
from shared.send.relay_blobs import RelayBlobs

if TYPE_CHECKING:
    from shared.send.stage import Relay

log = logging.getLogger("hve_relay.sender")

# A request some instance is submitting right now is left alone for SENDING_LEASE_SECONDS (a setting);
# others look again this often (usually the other instance has finished by then).
BUSY_RECHECK_SECONDS = 5.0


@dataclass(frozen=True)
class Admitted:
    """The gate let this delivery go on with the request."""

    entry: LedgerEntry
    claimed: bool  # this delivery created the row as `sending` a moment ago (the plain path)
    full: dict[str, Any] | None  # the request's full JSON object, when telling it apart had to read it


@dataclass(frozen=True)
class Written:
    """A record after the conflict policy: the row as it now stands, and whether it holds our write.
    When it does not, `entry` is the row another delivery wrote."""

    entry: LedgerEntry
    ours: bool


class LedgerGate:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def admit(self, decoded: Decoded, queue_message_id: str, received: float) -> Admitted | Handled:
        """Whether this delivery may go on with the request: new, or found in a state it may take."""
        r = self.relay
        request_id, claim = decoded.request_id, decoded.claim
        claimed = False
        entry: LedgerEntry | None
        if r.scheduler is not None and claim is None:
            # Nothing to wait for before sending: the claim is the row's creation (one write,
            # no read). A row that exists already (a copy, a retry, another request) is read.
            try:
                entry = await r.ledger.save(
                    LedgerEntry(
                        request_id=request_id,
                        state=SENDING,
                        first_received=utc(received),
                        updated=utc(received),
                        queue_message_id=queue_message_id,
                        chunks_total=0,
                        content_digest=content_digest(r.settings.recipient_hash_key, decoded.doc),
                    )
                )
                claimed = True
            except LedgerConflict:
                entry = await r.ledger.get(request_id)
        else:
            entry = await r.ledger.get(request_id)
        full: dict[str, Any] | None = None
        if entry is not None and not claimed:
            # The id is taken: by this request (a copy, a retry, a replay) or by another one.
            try:
                same, full = await self._same_request(entry, decoded)
            except RequestRefused as refusal:
                return await r.recorder.refuse_unread(queue_message_id, refusal, received)
            if not same:
                conflict = RequestRefused(
                    "id-conflict",
                    "another request with different content was already received under this id; "
                    "give each request its own id",
                )
                return await r.recorder.refuse_unread(queue_message_id, conflict, received)
        if entry is not None and entry.state in FINAL_STATES:
            if claim is not None:  # a copy of ours that came back after the clean-up
                await RelayBlobs.of(r.storage, r.settings).delete_copy(request_id, claim.blob_url, logger=log)
            # (Its event is published again: this may be the delivery of one that died before.)
            return Handled(request_id, "duplicate", f"already {entry.state}", entry.account, entry.last_code, row=entry)
        if entry is not None and entry.state == SENDING and not claimed:
            lease_left = entry.updated.timestamp() + r.settings.sending_lease_seconds - received
            if lease_left > 0:
                delay = await r.recorder.requeue(decoded.stub, min(lease_left, BUSY_RECHECK_SECONDS), entry.attempts)
                return Handled(request_id, "busy", "another instance is sending it", entry.account, 0, delay)
        if entry is None:
            entry = LedgerEntry(
                request_id=request_id,
                state="received",
                first_received=utc(received),
                updated=utc(received),
                queue_message_id=queue_message_id,
                chunks_total=0,
            )
        return Admitted(entry, claimed, full)

    async def _same_request(self, entry: LedgerEntry, decoded: Decoded) -> tuple[bool, dict[str, Any] | None]:
        """Whether this message is the request the row was made for (by the keyed digest of its
        content, contract.content_digest), and its full object if it had to be read."""
        key = self.relay.settings.recipient_hash_key
        claim = decoded.claim
        if not entry.content_digest:
            return True, None  # a row written before digests were kept: it cannot tell
        if claim is not None and claim.blob_url == entry.claim_blob:
            return True, None  # the very blob the row was made from (it may be deleted by now)
        if content_digest(key, decoded.doc) == entry.content_digest:
            return True, None
        if claim is None:
            return False, None
        full = await read_full(self.relay.payloads, decoded)
        return content_digest(key, full) == entry.content_digest, full

    async def claim(self, entry: LedgerEntry) -> LedgerEntry | None:
        """The claim before MAIL FROM (`entry` is `sending`, with the ETag of the row as this
        delivery read or wrote it): the row as written, or None when another delivery changed the
        row since (it is sending, or has finished): this one yields."""
        try:
            return await self.relay.ledger.save(entry)
        except LedgerConflict:
            return None

    async def write(self, entry: LedgerEntry) -> Written:
        """A record, under the conflict policy above."""
        ledger = self.relay.ledger
        try:
            return Written(await ledger.save(entry), True)
        except LedgerConflict as conflict:
            current = await ledger.get(entry.request_id)
            if current is not None and current.state in FINAL_STATES:
                return Written(current, ledger.landed(conflict, current))
            if (
                current is not None
                and current.state == SENDING
                and entry.state != SENDING
                and entry.state not in FINAL_STATES
                and current.updated.timestamp() + self.relay.settings.sending_lease_seconds > self.relay.clock()
            ):
                return Written(current, False)
            return Written(await ledger.put(entry), True)
