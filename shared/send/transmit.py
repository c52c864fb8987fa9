"""The transmit step of the send stage: one SMTP transaction on a slot, and what HVE answered.

The SMTP adapter lends a session ready for MAIL FROM (shared/hve/smtp.py, `HveSmtp.lease`; for a
booked slot waited for in the process, the schedule step took it before the slot); that is the
moment that counts at HVE, so only then is a grant that got old waiting for the session taken
again, and only then is the request claimed in the ledger (its lease never runs out while the
message waits for a session). A lost claim or a lapsed slot calls the send off: nothing is sent.
Otherwise the reply teaches the governor, and a charge for a message certainly not delivered is
given back. The ledger writes that follow are the record step's (shared/send/record.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.governor.pacing import Release
from shared.hve.smtp import SubmitResult
from shared.ledger import DEFERRED, SENDING, LedgerEntry
from shared.reporting.rows import reply_labels
from shared.send.ledger_gate import BUSY_RECHECK_SECONDS
from shared.send.outcome import Handled, utc
from shared.send.prepare import Prepared
from shared.send.replies import Outcome, Verdict
from shared.send.schedule import Slot, let_go

if TYPE_CHECKING:
    from shared.send.stage import Relay

# A slot whose session took too long to be ready is taken again after this short deferral.
LAPSED_RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class Transmitted:
    """One SMTP transaction done: HVE answered, or the session could not be had or was lost."""

    entry: LedgerEntry  # the row as claimed for it, with the reply and the recipients refused for good
    account: str
    envelope: tuple[int, ...]  # recipient indices
    verdict: Verdict
    refused: tuple[int, ...]  # refused for good at RCPT
    deferred: tuple[int, ...]  # refused for now at RCPT: they need a follow-up
    accepted: tuple[str, ...]  # the addresses HVE took
    at: float  # when the reply came


@dataclass(frozen=True)
class _Go:
    entry: LedgerEntry
    slot_at: float


@dataclass(frozen=True)
class _CalledOff:
    why: str  # "lapsed" | "claimed"
    slot_at: float


class Transmit:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def chunk(
        self,
        entry: LedgerEntry,
        stub: dict,
        prepared: Prepared,
        index: int,
        envelope: list[int],
        slot: Slot,
        *,
        claimed: bool,
    ) -> Transmitted | Handled:
        """Transaction `index` to `envelope` on `slot`. `claimed`: this delivery created the row as
        `sending` a moment ago (the plain path)."""
        r = self.relay
        account, shape = slot.account, slot.shape
        addresses = [prepared.recipients[i] for i in envelope]
        trying = entry.evolve(account=account, attempts=entry.attempts + 1, reason="")
        try:
            if index == 0 and account == r.settings.accounts[0] and prepared.first is not None:
                message = prepared.first
            else:
                message = r.preparer.message(prepared, entry.request_id, account, index, r.clock())
        except BaseException:
            await let_go(slot.lease)
            raise
        # A booked slot waited for in the process comes with its session ready (shared/send/schedule.py).
        lease = slot.lease if slot.lease is not None else await r.smtp.lease(account)
        go: _Go | _CalledOff
        result: SubmitResult | None
        if isinstance(lease, SubmitResult):
            go, result = _Go(trying, slot.at), lease  # no session: nothing claimed, nothing sent
        else:
            async with lease:
                go = await self._ready_to_mail(trying, index, account, slot, claimed)
                result = await lease.send(addresses, message) if isinstance(go, _Go) else None
        if isinstance(go, _CalledOff):
            return await self._called_off(go, entry, stub, slot)
        assert result is not None
        trying, slot_at = go.entry, go.slot_at

        verdict = result.verdict
        now = r.clock()
        r.instruments.smtp_replies.add(1, {"code": verdict.enhanced or str(verdict.code), "account": account})
        if r.aggregates is not None:
            r.aggregates.replies(now, account, entry.category, reply_labels(result, len(envelope)))
        # Throttling at RCPT teaches the governor as much as at DATA.
        feedback = verdict if verdict.throttled else next((v for v in result.deferred.values() if v.throttled), verdict)
        await r.governor.report(account, feedback, now)
        if result.refused and (suppressions := await r.preparer.suppression_list()) is not None:
            await suppressions.note_refused(result.refused, entry.request_id)  # 5xx at RCPT: suppressed
        refused_now = [i for i, a in zip(envelope, addresses, strict=False) if a in result.refused]
        deferred_now = [i for i, a in zip(envelope, addresses, strict=False) if a in result.deferred]
        trying = trying.evolve(
            last_code=verdict.code,
            last_reply=verdict.text[:300],
            updated=utc(now),
            refused_recipients=tuple(sorted(set(trying.refused_recipients) | set(refused_now))),
        )
        if verdict.outcome is not Outcome.SENT and not result.maybe_delivered:
            # Definitely not delivered: the charge goes back. (A reply lost after DATA keeps it.)
            if r.scheduler is not None:
                r.scheduler.give_back(shape.recipients)
            else:
                await r.governor.refund(Release(account, slot_at, shape))
        accepted = [
            a for i, a in zip(envelope, addresses, strict=False) if i not in refused_now and i not in deferred_now
        ]
        return Transmitted(
            trying, account, tuple(envelope), verdict, tuple(refused_now), tuple(deferred_now), tuple(accepted), now
        )

    async def _ready_to_mail(
        self, trying: LedgerEntry, index: int, account: str, slot: Slot, claimed: bool
    ) -> _Go | _CalledOff:
        """A session is ready for MAIL FROM: the slot taken again if it got old waiting for the
        session (or given back), then the claim."""
        r = self.relay
        now = r.clock()
        slot_at = slot.at
        if claimed and now - trying.updated.timestamp() < r.settings.sending_lease_seconds / 2:
            return _Go(trying, slot_at)  # the row was created as `sending` by this delivery a moment ago
        if r.scheduler is None and now - slot_at > r.settings.pacing_margin_seconds / 2:
            new_at = await r.governor.recheck(account, slot_at, slot.shape, now)
            if new_at is None:
                return _CalledOff("lapsed", slot_at)
            slot_at = new_at
        row = await r.gate.claim(trying.evolve(state=SENDING, updated=utc(now), chunks_sent=index))
        if row is None:
            return _CalledOff("claimed", slot_at)
        return _Go(row, slot_at)

    async def _called_off(self, off: _CalledOff, entry: LedgerEntry, stub: dict, slot: Slot) -> Handled:
        r = self.relay
        if off.why == "claimed":
            # Another delivery of the same request got there first; let it finish. Its slot is
            # given back unless it is the booking the other delivery sends on.
            if r.scheduler is not None:
                r.scheduler.give_back(slot.shape.recipients)
            elif not (slot.shared and off.slot_at == slot.at):
                await r.governor.refund(Release(slot.account, off.slot_at, slot.shape))
            delay = await r.recorder.requeue(stub, BUSY_RECHECK_SECONDS, entry.attempts)
            return Handled(entry.request_id, "busy", "another instance claimed it", slot.account, 0, delay)
        # The slot lapsed: recheck gave it back already.
        r.stats.lapsed += 1
        delay = await r.recorder.requeue(stub, LAPSED_RETRY_SECONDS, entry.attempts)
        await r.recorder.save(
            entry.evolve(
                state=DEFERRED,
                reason="waiting: the slot lapsed before an SMTP session was ready",
                updated=utc(r.clock()),
            )
        )
        return Handled(entry.request_id, DEFERRED, "slot lapsed", slot.account, 0, delay)
