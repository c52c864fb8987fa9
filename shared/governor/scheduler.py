"""Which account sends a message, when there are no per-minute windows to pace against.

(With a tenant cap — HVE_DAILY_RECIPIENT_BUDGET — `BudgetedScheduler` also takes today's
recipients from the tenant row in blocks held by this process: one write per block.)

Under HVE's 2026 limits (`ga-2026`, or any profile whose per-minute limits are null) and with
nothing counted per day (no daily budget, no daily cap), pacing has nothing to enforce. What is
left is account health: an account resting after a throttling reply (cooldown) or an
authentication failure HVE answered (unhealthy) is not used, and this process keeps off an
account for a moment after a local failure. The state comes from the governor's rows, read at
most every `refresh_seconds` per process; nothing is written per message. (The 2024 preview's
machinery — bookings, the pacer, backlog readings — is the governor's `acquire`, used only when
the limits have per-minute windows or something is counted per day.)

`plain_decision` is the pure policy; `PlainScheduler` feeds it the rows.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.governor.pacing import AccountState, Shape

# How old this process's view of the accounts' health may get before it reads the rows again.
HEALTH_REFRESH_SECONDS = 10.0
# When every account rests, requests come back spread over this many seconds after the first
# account is free again, not all at the same instant (they would crowd it, and the account
# would be throttled again).
RELEASE_SPREAD_SECONDS = 30.0


@dataclass(frozen=True)
class Go:
    """Send now, on this account."""

    account: str
    at: float


@dataclass(frozen=True)
class Refuse:
    """The message can never go (more recipients than a whole day's cap)."""

    reason: str


@dataclass(frozen=True)
class Later:
    """Nothing can go now: try again after `delay` seconds."""

    delay: float
    reason: str


def plain_decision(
    states: Iterable[AccountState],
    held: Iterable[str],
    shape: Shape,
    now: float,
    rng: random.Random,
    spread_seconds: float = RELEASE_SPREAD_SECONDS,
) -> Go | Later:
    """The preferred account when it is usable, else one usable account at random (instances
    reading the same rows spread out); when none is usable, a delay to the first one free again
    plus a random share of `spread_seconds`."""
    states = list(states)
    held = set(held)
    usable = [s.account for s in states if s.available_at() <= now and s.account not in held]
    if shape.preferred_account and shape.preferred_account in usable:
        return Go(shape.preferred_account, now)
    if usable:
        return Go(rng.choice(usable), now)
    resting = [s.available_at() for s in states if s.available_at() > now]
    first_free = min(resting) if resting else now
    delay = max(first_free - now, 0.0) + rng.uniform(0.0, spread_seconds)
    why = (
        "every account is resting (throttled or unhealthy)"
        if resting
        else "every account is held after a local failure"
    )
    return Later(max(delay, 1.0), why)


# The schedulers below await the governor (its Table rows), so tools/mutation.sh leaves them out;
# their tests run against Azurite (tests/test_plain_path.py).
# pragma: no mutate block
class PlainScheduler:
    """`plain_decision` on the governor's rows, read at most every `refresh_seconds`."""

    def __init__(
        self,
        governor: Any,
        rng: random.Random | None = None,
        *,
        refresh_seconds: float = HEALTH_REFRESH_SECONDS,
        spread_seconds: float = RELEASE_SPREAD_SECONDS,
    ) -> None:
        self.governor = governor
        self.rng = rng or random.Random()
        self.refresh_seconds = refresh_seconds
        self.spread_seconds = spread_seconds

    async def decide(self, shape: Shape, now: float) -> Go | Later:
        await self.governor.refresh(older_than=self.refresh_seconds)
        return plain_decision(
            self.governor.known_states(), self.governor.held(), shape, now, self.rng, self.spread_seconds
        )

    def give_back(self, recipients: int) -> None:
        """Recipients of a message that was definitely not delivered (nothing to give back here)."""


# Recipients a process takes from the tenant's daily cap at once (near the cap, less: see
# `TableGovernor.claim_allowance`), so little is stranded in idle processes at the end of a day.
BUDGET_BLOCK = 100


class BudgetedScheduler(PlainScheduler):
    """`PlainScheduler` under a daily tenant cap: recipients are taken from the tenant row in
    blocks (`TableGovernor.claim_allowance`) and spent from memory, so about one write per
    BUDGET_BLOCK recipients instead of one per message. A block not spent by the end of its day
    is not used (the cap errs on the safe side by at most a block per process)."""

    def __init__(self, governor: Any, rng: random.Random | None = None, **kwargs: Any) -> None:
        super().__init__(governor, rng, **kwargs)
        self._day = -1
        self._left = 0
        self._spent = False  # the cap was found spent today (claims are never handed back)
        self._claiming = asyncio.Lock()

    async def decide(self, shape: Shape, now: float) -> Go | Later | Refuse:  # type: ignore[override]
        cfg = self.governor.config
        cap = cfg.tenant_cap
        if cap is not None and shape.recipients > cap:
            return Refuse(f"{shape.recipients} exceeds the limit of {cap} recipients a day (daily recipient budget)")
        decision = await super().decide(shape, now)
        if isinstance(decision, Later) or cap is None:
            return decision
        day = cfg.day_of(now)
        if day != self._day:
            self._day, self._left, self._spent = day, 0, False
        if self._left < shape.recipients:
            async with self._claiming:  # messages handled together wait for one claim, not race
                if self._left < shape.recipients and not self._spent:
                    taken = await self.governor.claim_allowance(shape.recipients - self._left, BUDGET_BLOCK, now)
                    if taken is None:
                        # Other instances won every race for the tenant row: the cap is not known
                        # to be spent (taking it for spent deferred this process to the day's end).
                        return Later(1.0 + self.rng.uniform(0.0, 1.0), "governor contention")
                    self._left += taken
                    self._spent = taken == 0
            if self._left < shape.recipients:
                until = cfg.day_end(day)
                return Later(
                    until - now + self.rng.uniform(0.0, self.spread_seconds), "daily recipient budget spent for today"
                )
        self._left -= shape.recipients
        return decision

    def give_back(self, recipients: int) -> None:
        self._left += recipients
