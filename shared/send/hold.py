"""A step of the send stage, after prepare: holding a scheduled request (`sendAt` ahead) on the
queue until it is due.

The request goes back on the queue as a copy hidden for the time left (at most the queue's 7
days), through the record step's re-enqueue (`Recorder.requeue`); nothing is sent, no attempt is
counted, no governor slot is asked for or booked, and the ledger row says `deferred` with the time
it is held for (so a row claimed as `sending` a moment ago is never left so for the lost-in-flight
sweep). The row is written under the ledger's one conflict policy (`LedgerGate.write`), but not
counted: a hold is not a deferral of the report's counts (`deferrals`), nothing went wrong.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.ledger import DEFERRED, LedgerEntry
from shared.send.outcome import Handled, utc
from shared.send.send_at import held_reason, hold_seconds

if TYPE_CHECKING:
    from shared.send.stage import Relay


async def hold_until_due(relay: Relay, entry: LedgerEntry, stub: dict) -> Handled | None:
    """The request held back on the queue when it is early (its Handled carries the copy's
    visibility delay, whole seconds); None when it is due (or names no sendAt) and goes on to be sent."""
    now = relay.clock()
    wait = hold_seconds(entry.send_at, now)
    if wait <= 0 or entry.send_at is None:
        return None
    # No jitter: a scheduled request is due at its time, not up to 30 s after it.
    delay = await relay.recorder.requeue(stub, wait, entry.attempts, jitter=False)
    # A final row stays final; a live `sending` lease of another delivery is left to it (its
    # outcome follows); otherwise the row says it is held.
    await relay.gate.write(entry.evolve(state=DEFERRED, reason=held_reason(entry.send_at), updated=utc(now)))
    return Handled(entry.request_id, DEFERRED, "scheduled", "", 0, delay)
