"""Slot blocks: a process that wins the write of an account row for a message no rolling minute
counts (the preview's internal mail: only daily counts and the tenant allowance) books up to a few
slots for the same shape of message in that one write, keeps the extra ones (its spares), and
hands them to its next decisions without a Table call while they are still good. Pure: no I/O,
no clock.

A spare is counted in the row from the moment it is written (the daily counts, the tenant
allowance), exactly like a slot granted to a message, so no other process can be given
it and a spare never causes an over-grant: at worst it is capacity held for a moment and unused.
An unused spare is given back in the next write this process makes to that row anyway.

Rules, each in one function below:
- how many: one more than the decisions this process made for the same shape in the last
  BLOCK_SECONDS, at most BLOCK_MAX (a process deciding now and then books one slot, as before);
- which: grants now only, the ones the process would have been given one after the other on that
  account with nothing else happening;
- how long good: BLOCK_SECONDS after the write (no older than the view a decision may be made
  from), on the day it was charged to.

Not for mail a rolling minute counts, nor for bookings: a spare there that went unused held a
place in the minute until the process wrote that row again, and the others' messages went a
window later (with spare bookings, the simulation with four instances took 318 s instead of 273;
with spare grants under the minute, the real-host test booked 22 of 40 external requests where
20 fit, and took two windows instead of one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from shared.governor.pacing import (
    AccountState,
    Grant,
    PacingConfig,
    Release,
    Shape,
    TenantState,
    earliest_slot,
    release_slot,
    take_slot,
)

# At most this many slots per write.
BLOCK_MAX = 4
# A spare is handed out at most this long after the write that booked it; decisions this process
# made this recently for the same shape size its next block.
BLOCK_SECONDS = 2.0


@dataclass(frozen=True)
class Spare:
    """A slot booked in the row for a message of `shape` (its preferred account ignored) that no
    message holds yet. `taken`: when it was booked."""

    account: str
    at: float
    shape: Shape
    taken: float

    @property
    def release(self) -> Release:
        return Release(self.account, self.at, self.shape)


def shape_key(shape: Shape) -> tuple[int, int]:
    return shape.internal, shape.external


def block_size(recent: int) -> int:
    """Slots to book in one write after `recent` decisions for the same shape in BLOCK_SECONDS."""
    return max(1, min(BLOCK_MAX, recent + 1))


def windowed(shape: Shape, cfg: PacingConfig) -> bool:
    """Whether a rolling minute counts this message (its slot time matters, not only its day)."""
    lim = cfg.limits
    return lim.messages_per_minute is not None or bool(shape.external and lim.external_messages_per_minute is not None)


def take_block(
    first: Grant,
    states: Sequence[AccountState],
    tenant: TenantState | None,
    shape: Shape,
    now: float,
    cfg: PacingConfig,
    size: int,
) -> tuple[Grant, tuple[float, ...]]:
    """`first` (the decision for this message) with up to size-1 further slots now on its account
    added to the state it writes: the grant to write, and the extra slots' times. A booking (a
    slot later), or a message a rolling minute counts, takes none."""
    if size <= 1 or first.at > now or windowed(shape, cfg):
        return first, ()
    acct = first.account_state
    tenant_after = first.tenant_state
    extra: list[float] = []
    for _ in range(size - 1):
        current_tenant = tenant_after if tenant_after is not None else tenant
        t, _why = earliest_slot(acct, current_tenant, shape, now, cfg)
        if t > now:
            break
        acct, new_tenant = take_slot(acct, current_tenant, shape, now, now, cfg, len(states))
        if new_tenant is not None:
            tenant_after = new_tenant
        extra.append(now)
    return replace(first, account_state=acct, tenant_state=tenant_after), tuple(extra)


def spare_slot(spare: Spare, now: float, cfg: PacingConfig) -> float | None:
    """The slot time to hand a message now from `spare`, or None when the spare is no longer good
    (this process then gives it back). Such a message is counted by its day only (no rolling
    minute), so it goes now."""
    if not spare.taken <= now <= spare.taken + BLOCK_SECONDS or cfg.day_of(now) != cfg.day_of(spare.at):
        return None
    return now


def give_back(state: AccountState, spares: Sequence[Spare], cfg: PacingConfig) -> AccountState:
    """The account's state with the unused spares given back (written with this process's next
    write of the row)."""
    for spare in spares:
        if spare.account == state.account:
            state = release_slot(state, spare.release, cfg)
    return state
