"""The record step of the send stage: what became of a request, in the ledger, the counts and the queue.

Every outcome row goes through `Recorder.save`: the ledger's conflict policy
(shared/send/ledger_gate.py, `LedgerGate.write`), then the hourly aggregates, counted exactly when
the row holds this delivery's write. A request that is to be tried again goes back on the queue as
a copy with a visibility delay (`requeue`); the ledger, not the copy, is what the relay trusts.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from shared.ledger import DEAD, DEFERRED, FINAL_STATES, REFUSED, SENT, LedgerEntry
from shared.send.contract import RequestRefused, fits_on_queue, queue_text
from shared.send.ledger_gate import Written
from shared.send.mime import message_id
from shared.send.outcome import Handled, utc
from shared.send.prepare import Prepared, envelope_of
from shared.send.relay_blobs import RelayBlobs
from shared.send.replies import Outcome, Verdict
from shared.send.retry import retry_delay, visibility_for
from shared.send.suppression import all_suppressed

if TYPE_CHECKING:
    from shared.send.stage import Relay
    from shared.send.transmit import Transmitted

log = logging.getLogger("hve_relay.sender")

# After an account problem another account can usually take the message at once.
ACCOUNT_RETRY_SECONDS = 2.0
# After a local failure with an account (a credential read), this process leaves it alone this long.
LOCAL_HOLD_SECONDS = 10.0


def outcome_of(entry: LedgerEntry, prepared: Prepared) -> tuple[str, str]:
    """The final state and reason of a request whose transactions are all done."""
    everyone, refused = len(prepared.recipients), len(entry.refused_recipients)
    skipped = len(entry.suppressed_recipients)
    if refused + skipped >= everyone:
        if not refused:
            return REFUSED, all_suppressed(everyone)
        return REFUSED, (
            f"refused by HVE: all {refused} recipient(s){f' ({skipped} suppressed)' if skipped else ''}; "
            f"last reply {entry.last_code} {entry.last_reply}"
        )[:300]
    notes = [f"{refused} recipient(s) refused by HVE"] if refused else []
    return SENT, "; ".join(notes + ([f"{skipped} recipient(s) suppressed"] if skipped else []))


class Recorder:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    # --- ledger rows ----------------------------------------------------------------------------

    async def save(self, entry: LedgerEntry) -> Written:
        """Record an outcome (or progress) under the conflict policy; counted once it is the row's."""
        written = await self.relay.gate.write(entry)
        if written.ours:
            self.count(entry)
        return written

    async def progress(self, entry: LedgerEntry) -> LedgerEntry:
        """Progress after an accepted transaction. If another delivery finished the request
        meanwhile, its final row stays final and this delivery goes on with its own entry (its
        next write finds the row final, and counts nothing)."""
        written = await self.save(entry)
        return written.entry if written.ours else entry

    async def final(self, entry: LedgerEntry) -> tuple[LedgerEntry, bool]:
        """The final row written with the last transaction's progress: (the row, whether another
        delivery had made it final already, so this one counted nothing)."""
        written = await self.save(entry)
        return written.entry, not written.ours

    async def finish(self, entry: LedgerEntry, state: str, reason: str) -> Handled:
        entry = entry.evolve(state=state, reason=reason, updated=utc(self.relay.clock()))
        row = (await self.save(entry)).entry
        if state in FINAL_STATES:
            await self.delete_claim_check(entry)
        return Handled(entry.request_id, state, reason, entry.account, entry.last_code, row=row)

    async def finished(self, entry: LedgerEntry) -> Handled:
        """A request whose final row is written (and counted) already: its blobs deleted."""
        await self.delete_claim_check(entry)
        return Handled(entry.request_id, entry.state, entry.reason, entry.account, entry.last_code, row=entry)

    async def refuse_unread(self, queue_message_id: str, refusal: RequestRefused, now: float) -> Handled:
        """A message that cannot even be read is recorded under its queue message id and set aside."""
        entry = LedgerEntry(
            request_id=queue_message_id,
            state=REFUSED,
            first_received=utc(now),
            updated=utc(now),
            reason=f"{refusal.reason}: {refusal.detail}",
            queue_message_id=queue_message_id,
        )
        row = (await self.save(entry)).entry  # a second delivery finds the row final: counted once
        return Handled(queue_message_id, REFUSED, entry.reason, row=row)

    async def transaction(self, sent: Transmitted, stub: dict, prepared: Prepared, index: int) -> LedgerEntry | Handled:
        """What one SMTP transaction changed: progress (or the final row), the chunk's row, the
        recipient index; or what became of the request when HVE did not take it."""
        r = self.relay
        trying, verdict, envelope = sent.entry, sent.verdict, sent.envelope
        if verdict.outcome is not Outcome.SENT:
            if len(sent.refused) == len(envelope):
                # Every recipient of this transaction refused for good at RCPT: the others of the
                # request (other chunks) still go; the ledger names these by index.
                return await self.progress(trying.evolve(chunks_sent=index + 1))
            return await self.not_sent(trying, stub, verdict, sent.account, sent.at)
        pending = [i for i in trying.pending_recipients if i not in envelope] + list(sent.deferred)
        done = trying.evolve(
            chunks_sent=index + 1,
            pending_recipients=tuple(pending),
            chunks_total=max(trying.chunks_total, index + (2 if pending else 1)),
        )
        finished_by_other = False
        if r.scheduler is not None and envelope_of(done, prepared, index + 1, r.limits) is None:
            # Nothing left to send: the progress write is the final one (and the recipient index
            # below comes after it, as it does after progress).
            state, reason = outcome_of(done, prepared)
            done, finished_by_other = await self.final(done.evolve(state=state, reason=reason))
        else:
            # Progress is durable before the next slot is asked for: a crash or a failed governor
            # call from here on never sends this transaction again.
            done = await self.progress(done)
        if done.chunks_total > 1:
            await r.ledger.record_chunk(
                done,
                index,
                account=sent.account,
                recipients=len(sent.accepted),
                code=verdict.code,
                message_id=message_id(done.request_id, r.message_id_domain, index, key=r.settings.recipient_hash_key),
            )
        await r.ledger.index_recipients(done.evolve(state=SENT), sent.accepted)
        if finished_by_other:
            return Handled(
                done.request_id,
                "duplicate",
                f"already {done.state} by another delivery",
                sent.account,
                verdict.code,
                row=done,
            )
        return done

    async def not_sent(self, entry: LedgerEntry, stub: dict, verdict: Verdict, account: str, now: float) -> Handled:
        if verdict.outcome is Outcome.REFUSE:
            return await self.finish(entry, REFUSED, f"refused by HVE: {verdict.code} {verdict.text}"[:300])
        # DEFER or ACCOUNT: the message is fine; try again later, maybe on another account.
        expired = self.expired(entry, now, count_attempts=verdict.outcome is Outcome.DEFER)
        if expired:
            return await self.finish(entry, DEAD, f"{expired}; last reply {verdict.code} {verdict.text}"[:300])
        settings = self.relay.settings
        if verdict.outcome is Outcome.ACCOUNT:
            if not verdict.code:
                # A local failure (a credential read): this process leaves the account alone for
                # a moment; nothing is shared, the account itself may be fine.
                self.relay.governor.hold_locally(account, LOCAL_HOLD_SECONDS)
            wait, why = ACCOUNT_RETRY_SECONDS, f"account {account} unavailable: {verdict.code} {verdict.text}"[:300]
        else:
            wait = retry_delay(entry.attempts, settings.retry_base_seconds, settings.retry_max_seconds, self.relay.rng)
            why = f"transient: {verdict.code} {verdict.text}"[:300]
        delay = await self.defer(stub, wait, entry.evolve(state=DEFERRED, reason=why))
        return Handled(entry.request_id, DEFERRED, why, account, verdict.code, delay)

    async def retry_later(self, entry: LedgerEntry, stub: dict, why: str) -> Handled:
        now = self.relay.clock()
        expired = self.expired(entry, now)
        if expired:
            return await self.finish(entry, DEAD, f"{expired}; {why}")
        settings = self.relay.settings
        wait = retry_delay(entry.attempts, settings.retry_base_seconds, settings.retry_max_seconds, self.relay.rng)
        delay = await self.defer(stub, wait, entry.evolve(state=DEFERRED, reason=why, updated=utc(now)))
        return Handled(entry.request_id, DEFERRED, why, entry.account, entry.last_code, delay)

    def expired(self, entry: LedgerEntry, now: float, count_attempts: bool = True) -> str:
        settings = self.relay.settings
        if count_attempts and entry.attempts >= settings.max_attempts:
            return f"gave up after {entry.attempts} attempts"
        age = now - entry.age_from
        if age > settings.max_age_seconds:
            return f"gave up after {age / 3600:.1f} hours"
        return ""

    # --- the queue ------------------------------------------------------------------------------

    async def defer(self, stub: dict, wait_seconds: float, row: LedgerEntry, *, jitter: bool = True) -> int:
        """A copy back on the queue, then the deferred row; the copy's visibility delay."""
        delay = await self.requeue(stub, wait_seconds, row.attempts, jitter=jitter)
        await self.save(row)
        return delay

    async def requeue(self, stub: dict, wait_seconds: float, attempts: int, *, jitter: bool = True) -> int:
        """A copy of the caller's message, carrying its id and (for people reading the queue) the
        attempts so far; the ledger, not this field, is what the relay trusts."""
        r = self.relay
        delay = visibility_for(wait_seconds, jitter_fraction=0.1 if jitter else 0.0, rng=r.rng)
        stub = {**stub, "attempt": attempts}
        text = queue_text(stub)
        if not fits_on_queue(text):
            # The caller's message fitted, but not with its id and attempts added: the copy travels by
            # claim check (once: later copies re-enqueue the small stub).
            # (In RELAY_STATE_CONTAINER, which no producer can write.)
            url = await r.payloads.store(stub["id"], text.encode("utf-8"))
            copy = {"id": stub["id"], "claimCheck": {"blobUrl": url}, "attempt": attempts}
            if "idProof" in stub:
                copy["idProof"] = stub["idProof"]
            text = queue_text(copy)
        # time_to_live=-1: a deferred request must never expire silently on the queue.
        await r.queue.send_message(text, visibility_timeout=delay, time_to_live=-1)
        return delay

    # --- counts and blobs -----------------------------------------------------------------------

    def count(self, entry: LedgerEntry) -> None:
        r = self.relay
        if r.aggregates is None:
            return
        if entry.state in FINAL_STATES:
            r.aggregates.outcome(
                r.clock(),
                entry.account,
                entry.category,
                entry.state,
                internal=entry.internal_recipients,
                external=entry.external_recipients,
            )
            if entry.state == SENT:  # latency: first seen -> the ledger's record of HVE's last 250
                seconds = (entry.updated - entry.first_received).total_seconds()
                r.aggregates.latency(r.clock(), entry.account, entry.category, seconds)
            if skipped := len(entry.suppressed_recipients):  # left out: on the suppression list
                r.aggregates.add(r.clock(), entry.account, entry.category, {"recipients.suppressed": skipped})
            if entry.state == REFUSED and entry.reason.startswith("id-conflict:"):
                # Of the refused, those that came under an id another request had taken.
                r.aggregates.add(r.clock(), entry.account, entry.category, {"requests.id-conflict": 1})
        elif entry.state == DEFERRED:
            r.aggregates.deferral(r.clock(), entry.account, entry.category)

    async def delete_claim_check(self, entry: LedgerEntry) -> None:
        """Best effort, after the outcome is recorded: the request's claim-check blob and the
        copies the relay wrote for it (shared/send/relay_blobs.py). A blob left behind is for the
        lifecycle rule (infra/) and `purge_expired` to delete, never a reason to fail or retry the
        request. Only the relay's prefixes: what else is in the container (attachments) belongs to
        the producer."""
        await RelayBlobs.of(self.relay.storage, self.relay.settings).delete_for_request(
            entry.request_id, entry.claim_blob, logger=log
        )
