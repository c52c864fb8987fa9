"""An experiment kept for comparison (docs/governor.md): the 2024 preview paced by a per-account next-free time,
with no bookings, measured against the bookings (docs/governor.md, "Bookings or next-free time").

In the spirit of Postfix's `default_destination_rate_delay`: the governor rows keep the rolling-minute
log of slots granted *now* only (no future reservations). A request that does not fit now is put
back on the queue with a visibility delay to the next opening of any account's window, plus a
random jitter of up to `jitter_seconds` to spread the crowd that wakes there; when it comes back it
is judged again like a new request. Nothing else: no bookings, no late release, no spread over
seconds, no pacer chain, no backlog readings, no early wake.

A deferral is decided from this process's view of the rows when that view is at most
`SNAPSHOT_SECONDS` old (no Table call): a view that old can only miss other instances' newer grants
(the request then comes back a moment too early and is deferred again) or a slot given back (it
waits a little longer than it had to); neither can send past a window, which the ETag'd write of a
grant alone guarantees.

It lives in bench/ because it lost (see the doc): it is installed on a Relay from outside, by the
simulation (`python -m bench.simulate --scheduler next-free`) and by the real-host test, through
`bench/next_free_app.py` (the function app with every Relay switched to it).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from shared.governor.blocks import give_back
from shared.governor.pacing import AccountState, Impossible, PacingConfig, Shape, Wait, decide
from shared.governor.table import SNAPSHOT_SECONDS, Grant
from shared.ledger import DEAD, DEFERRED, REFUSED, LedgerEntry
from shared.send.outcome import Handled, utc
from shared.send.schedule import Slots

# The reason a request deferred here carries in the ledger: a request that comes back with it and
# must wait again is a re-deferral (the counterpart of a late re-booking).
WAITING = "waiting for the next opening: "
JITTER_SECONDS = 2.0


def next_opening(states: Sequence[AccountState], shape: Shape, now: float, cfg: PacingConfig) -> Wait | None:
    """None when some account can take the message now; else when the first window opens (and
    why it is closed until then). Pure: the governor's own arithmetic with bookings off."""
    if not states:
        return None
    decision = decide(states, None, shape, now, cfg, random.Random(0), allow_booking=False)
    return decision if isinstance(decision, Wait) else None


def visibility_delay(until: float, now: float, jitter_seconds: float, rng: random.Random) -> int:
    """Whole seconds to hide the request: to the opening (rounded up: never before it), plus a random
    share of the jitter; at least 1."""
    return max(1, math.ceil(max(0.0, until - now) + rng.uniform(0.0, max(0.0, jitter_seconds)) - 1e-9))


class NextFreeSlots(Slots):
    """The schedule step with `_paced` replaced: grant now, or defer to the next opening."""

    def __init__(self, relay, jitter_seconds: float = JITTER_SECONDS) -> None:
        super().__init__(relay)
        self.jitter_seconds = jitter_seconds
        self.deferrals = 0  # every deferral to an opening
        self.redeferrals = 0  # ...of a request that had been deferred to an opening before

    async def _paced(
        self, entry: LedgerEntry, stub: dict, shape: Shape, index: int, now: float
    ) -> tuple[str, float, LedgerEntry, None] | Handled:
        r = self.relay
        governor = r.governor
        decision: Grant | Wait | Impossible | None = None
        if governor.snapshot_age() <= SNAPSHOT_SECONDS:
            # The view with the slots this process holds unused (a block's spares) free: acquire
            # hands one out without a Table call.
            view = [give_back(s, governor.spares_held(), governor.config) for s in governor.known_states()]
            decision = next_opening(view, shape, now, governor.config)
        if decision is None:
            decision = await governor.acquire(shape, now, allow_booking=False)
        if isinstance(decision, Impossible):
            return await r.recorder.finish(entry, REFUSED, f"over-limit: {decision.reason}")
        if isinstance(decision, Wait):
            if decision.until - entry.first_received.timestamp() > r.settings.max_age_seconds:
                return await r.recorder.finish(entry, DEAD, f"no send slot before the age limit ({decision.reason})")
            self.deferrals += 1
            if entry.reason.startswith(WAITING):
                self.redeferrals += 1
                r.stats.late_rebooked += 1  # the simulation's "re-bookings" column
            waiting = entry.evolve(state=DEFERRED, reason=WAITING + decision.reason, updated=utc(now))
            seconds = visibility_delay(decision.until, now, self.jitter_seconds, r.rng)
            delay = await r.recorder.defer(stub, seconds, waiting, jitter=False)
            return Handled(entry.request_id, DEFERRED, decision.reason, "", 0, delay)
        assert decision.at <= now  # bookings are off: a grant is for now
        return decision.account, decision.at, entry, None  # no session taken ahead: nothing is booked


def install(relay, jitter_seconds: float = JITTER_SECONDS) -> NextFreeSlots:
    """Switch a paced Relay to next-free: its schedule step, and no backlog readings (bookings never
    happen, so the pacer never starts)."""
    assert relay.scheduler is None, "next-free replaces the paced path (preview-2024), not the plain one"
    slots = NextFreeSlots(relay, jitter_seconds)
    relay.slots = slots
    relay.backlog.sample_seconds = 0.0
    return slots
