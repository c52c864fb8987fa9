"""The schedule step of the send stage: the account and the moment for one SMTP transaction.

Through the scheduler seam: on the plain path (no per-minute window, no per-account daily limit)
`shared/governor/scheduler.py` only picks a healthy account; otherwise the governor's `acquire`
grants a slot now, books one ahead (the request goes back on the queue to wake just before it), or
says wait. A request that cannot go now comes back as a `Handled` (deferred, booked, refused, dead).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from shared.governor.pacing import NO_SESSION, Decision, Impossible, Release, Shape, Wait
from shared.governor.scheduler import Later, Refuse
from shared.governor.table import Grant
from shared.hve.smtp import SessionLease, SubmitResult
from shared.ledger import DEAD, DEFERRED, REFUSED, LedgerEntry
from shared.send.outcome import Handled, utc
from shared.send.prepare import Prepared

if TYPE_CHECKING:
    from shared.send.stage import Relay


@dataclass(frozen=True)
class Slot:
    """Where and when transaction `index` goes."""

    account: str
    at: float
    entry: LedgerEntry  # the request's row, minus a booking this slot used up
    shape: Shape
    # The request's own booking (not this delivery's): a duplicate delivery holds the same one, so
    # losing the claim to it must not give the slot back.
    shared: bool
    # A session of `account` made ready while waiting for a booked slot (or why there is none):
    # the transmit step sends on it instead of asking the pool at the slot.
    lease: SessionLease | SubmitResult | None = None


@dataclass(frozen=True)
class _SentOn:
    """A slot now, on the account whose session the request holds already."""

    account: str
    at: float
    lease: SessionLease


class Slots:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    async def next(
        self, entry: LedgerEntry, stub: dict, prepared: Prepared, envelope: list[int], index: int
    ) -> Slot | Handled:
        r = self.relay
        addresses = [prepared.recipients[i] for i in envelope]
        internal = sum(1 for a in addresses if a.rsplit("@", 1)[1].lower() in r.policy.internal_domains)
        shape = Shape(internal, len(addresses) - internal, prepared.request.account)
        booking = (entry.booked_account, entry.booked_at) if entry.booked_chunk == index else None
        got: tuple[str, float, LedgerEntry, SessionLease | SubmitResult | None] | Handled
        if r.scheduler is not None:
            got = await self._plain(entry, stub, shape)
        else:
            got = await self._paced(entry, stub, shape, index, r.clock())
        if isinstance(got, Handled):
            return got
        account, at, entry, held = got
        return Slot(account, at, entry, shape, shared=booking == (account, at), lease=held)

    async def _plain(
        self, entry: LedgerEntry, stub: dict, shape: Shape
    ) -> tuple[str, float, LedgerEntry, None] | Handled:
        """The account to send on now, or the request back on the queue while every account rests."""
        r = self.relay
        now = r.clock()
        decision = await r.scheduler.decide(shape, now) if r.scheduler is not None else None
        if isinstance(decision, Refuse):
            return await r.recorder.finish(entry, REFUSED, f"over-limit: {decision.reason}")
        if isinstance(decision, Later):
            if now + decision.delay - entry.age_from > r.settings.max_age_seconds:
                return await r.recorder.finish(entry, DEAD, f"no send slot before the age limit ({decision.reason})")
            waiting = entry.evolve(state=DEFERRED, reason=f"waiting: {decision.reason}", updated=utc(now))
            delay = await r.recorder.defer(stub, decision.delay, waiting)
            return Handled(entry.request_id, DEFERRED, decision.reason, "", 0, delay)
        assert decision is not None
        return decision.account, decision.at, entry, None

    async def _paced(
        self, entry: LedgerEntry, stub: dict, shape: Shape, index: int, now: float
    ) -> tuple[str, float, LedgerEntry, SessionLease | SubmitResult | None] | Handled:
        """The account and slot time to send transaction `index` on now (with the entry minus a
        used-up booking, and for a booked slot waited for here, the session made ready meanwhile),
        or what became of the request when it cannot go now (booked, waiting, refused, dead)."""
        r = self.relay
        release = None
        held: SessionLease | SubmitResult | None = None
        if entry.booked_account and entry.booked_chunk == index:
            if entry.booked_wake:
                r.return_latency.observe(now - entry.booked_wake)
            if now < entry.booked_at:
                early = entry.booked_at - now
                if early > r.settings.slot_wait_seconds + 1:  # (+1: wakes are whole seconds)
                    # Far from the slot (a redelivery): sleep again on the queue, not here.
                    delay = await r.recorder.requeue(
                        stub, early - r.return_latency.early_wake(), entry.attempts, jitter=False
                    )
                    return Handled(
                        entry.request_id, DEFERRED, "booked slot not reached", entry.booked_account, 0, delay
                    )
                # Woke early on purpose (see shared/governor/preview/queue_timing.py): the slot is a
                # moment away. Its account is known, so its session is made ready first (TCP,
                # STARTTLS, AUTH when none is idle: seconds on a loaded host), and MAIL FROM goes
                # at the slot instead of a session set-up later (unless the pool is held ahead
                # already: one session stays for the requests whose slot is now).
                held = await r.smtp.lease_ahead(entry.booked_account)
                try:
                    await r.sleep(max(0.0, entry.booked_at - r.clock()))
                except BaseException:
                    await let_go(held)
                    raise
                now = max(r.clock(), entry.booked_at)
            booked, booked_at = entry.booked_account, entry.booked_at
            entry = entry.evolve(booked_account="", booked_at=0.0, booked_chunk=-1, booked_wake=0.0)
            # Late by up to half the margin is safe: the other half covers the SMTP exchange. An
            # account this process saw start resting since is not used (no extra round trip).
            if now <= booked_at + r.settings.pacing_margin_seconds / 2 and not r.governor.known_resting(booked, now):
                return booked, booked_at, entry, held
            await let_go(held)
            # Later than that: the booking is given back in the same write that takes the next
            # slot, which is now if the windows allow it.
            release = Release(booked, booked_at, shape)
            r.stats.late += 1
        lead = await r.pacer.backlog_lead(now)
        # While a backlog's drain rate is not known yet (a first reading), nothing is booked: the
        # request waits unbooked for its earliest slot (no slot held, so none can go unused).
        # An account's window opening before the middle of the estimate's band (plain to padded)
        # is left to the backlog's fresh messages; one after it is booked at the padded end. (The
        # first readings err either way by about 10%: with one instance draining 217 s, openings
        # at +186 were booked at the padded end, came back behind it and were lost; with four
        # draining 55 s, skipping the +62 opening left it empty.)
        plain = r.backlog.lead(now, padded=False) or 0.0
        late = release is not None
        decided = await self._decide_with_session(
            shape,
            release,
            allow_booking=lead is not None,
            lead=lead or 0.0,
            plain=plain,
        )
        if isinstance(decided, _SentOn):
            return decided.account, decided.at, entry, decided.lease
        decision, now = decided
        if late and not (isinstance(decision, Grant) and decision.at <= now):
            r.stats.late_rebooked += 1
        if isinstance(decision, Impossible):
            return await r.recorder.finish(entry, REFUSED, f"over-limit: {decision.reason}")
        if isinstance(decision, Wait):
            if decision.until - entry.age_from > r.settings.max_age_seconds:
                return await r.recorder.finish(entry, DEAD, f"no send slot before the age limit ({decision.reason})")
            waiting = entry.evolve(state=DEFERRED, reason=f"waiting: {decision.reason}", updated=utc(now))
            delay = await r.recorder.defer(stub, decision.until - now, waiting)
            return Handled(entry.request_id, DEFERRED, decision.reason, "", 0, delay)
        if decision.at > now:
            # Back on the queue to wake as much before the slot as booked messages come back late.
            # (Whole seconds, rounded down: at least that early.)
            wake_in = max(0, math.floor(decision.at - now - r.return_latency.early_wake() + 1e-6))
            delay = await r.recorder.requeue(stub, wake_in, entry.attempts, jitter=False)
            await r.recorder.save(
                entry.evolve(
                    state=DEFERRED,
                    reason=f"booked a slot on {decision.account}",
                    updated=utc(now),
                    booked_account=decision.account,
                    booked_at=decision.at,
                    booked_chunk=index,
                    booked_wake=now + delay,
                )
            )
            await r.pacer.keep_host_polling(decision.at)
            return Handled(entry.request_id, DEFERRED, "booked", decision.account, 0, delay)
        # Its session now: at once when no other caller took the place the decision saw free.
        return decision.account, decision.at, entry, await r.smtp.lease(decision.account)

    async def _decide_with_session(
        self, shape: Shape, release: Release | None, *, allow_booking: bool, lead: float, plain: float
    ) -> _SentOn | tuple[Decision, float]:
        """The governor's decision, with the session for a slot now held first: the slot and its
        session when the slot is now on the account whose session was made ready, else the
        decision and the time it was made.

        A slot now is granted only on an account this process has an SMTP session free for
        (`busy`): a grant now on a busy account waits for a session and, on a loaded host, got too
        old to be sent on behind the next window's bookings. While every account free now is busy,
        the request waits here for a session to come free, up to the pool wait; past that it is
        decided as before. And the session of the account the grant will most likely be on is made
        ready first (a new one takes seconds on a loaded host), so MAIL FROM goes at the slot."""
        r = self.relay
        loop = asyncio.get_running_loop()  # (a local wait: the event loop's clock, like the pool's)
        give_up = loop.time() + r.settings.pool_wait_seconds
        sessions_first = True
        while True:
            now = r.clock()
            likely = r.governor.likely_account(shape, now, r.smtp.busy)
            if shape.preferred_account not in (None, likely):
                likely = None  # a producer's choice of account stands
            held = await r.smtp.lease(likely) if likely is not None else None
            if not isinstance(held, SessionLease):
                held, likely = None, None
            mark = r.smtp.places_given_back  # a session given back while deciding is not missed
            now = r.clock()
            try:
                decision = await r.governor.acquire(
                    shape if likely is None else replace(shape, preferred_account=likely),
                    now,
                    release=release,
                    allow_booking=allow_booking,
                    book_not_before=now + lead,
                    backlog_until=now + (plain + lead) / 2,
                    busy=_busy_but(r.smtp.busy, likely) if sessions_first else None,
                    clock=r.clock,  # (dated when decided: the turn may take a while on a loaded host)
                )
            except BaseException:
                await let_go(held)
                raise
            now = max(now, r.clock())  # a grant is dated at most this late; a booking is later
            if held is not None and isinstance(decision, Grant) and decision.at <= now and decision.account == likely:
                return _SentOn(decision.account, decision.at, held)
            await let_go(held)  # (its own place back: not one another caller freed)
            mark += 1 if held is not None else 0
            if not (isinstance(decision, Wait) and decision.reason == NO_SESSION):
                return decision, now
            release = None  # given back in that decision's write
            r.stats.session_waits += 1
            await r.smtp.place_given_back(max(0.0, give_up - loop.time()), since=mark)
            sessions_first = loop.time() < give_up


def _busy_but(busy: Callable[[str], bool], mine: str | None) -> Callable[[str], bool]:
    """`busy`, except for the account whose session the caller holds already."""
    return lambda account: account != mine and busy(account)


async def let_go(held: SessionLease | SubmitResult | None) -> None:
    """A session made ready for a slot that will not be sent on goes back to the pool."""
    if isinstance(held, SessionLease):
        async with held:
            pass
