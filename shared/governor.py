"""The rate governor: which HVE account sends next, and when.

The send path only sees `Governor.acquire` (a Grant or a Wait) and `Governor.report`.
State lives in Table storage, one row per account, updated with optimistic concurrency
(ETag If-Match) so any number of function instances share one truth, like a Durable entity.

The policy (`choose_account`, `after_reply`) is pure and tested on its own.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable, Protocol

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from .replies import Outcome, Verdict

_PARTITION = "account"
MAX_CONFLICT_RETRIES = 8


@dataclass(frozen=True)
class SendShape:
    internal: int
    external: int
    preferred_account: str | None = None


@dataclass(frozen=True)
class Grant:
    account: str


@dataclass(frozen=True)
class Wait:
    until: float          # epoch seconds at which a grant is expected to succeed
    reason: str


@dataclass(frozen=True)
class AccountState:
    account: str
    last_granted: float = 0.0
    cooldown_until: float = 0.0
    unhealthy_until: float = 0.0
    last_problem: str = ""
    etag: str | None = None

    def available_at(self) -> float:
        return max(self.cooldown_until, self.unhealthy_until)


class Governor(Protocol):
    async def acquire(self, shape: SendShape, now: float) -> Grant | Wait: ...

    async def report(self, account: str, verdict: Verdict, now: float) -> None: ...


# --- pure policy --------------------------------------------------------------------------------

def choose_account(states: Iterable[AccountState], shape: SendShape, now: float) -> Grant | Wait:
    """Least recently used account that is neither cooling down nor unhealthy; the preferred
    account when it is available. With none available: wait until the first one is."""
    states = list(states)
    if not states:
        return Wait(until=now + 60, reason="no HVE accounts configured")
    ready = [s for s in states if s.available_at() <= now]
    if ready:
        for s in ready:
            if s.account == shape.preferred_account:
                return Grant(s.account)
        return Grant(min(ready, key=lambda s: (s.last_granted, s.account)).account)
    soonest = min(states, key=lambda s: s.available_at())
    return Wait(until=soonest.available_at(), reason=f"every account is resting ({soonest.last_problem or 'cooldown'})")


def next_daily_reset(now: float) -> float:
    day = datetime.fromtimestamp(now, timezone.utc).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp()


def after_reply(state: AccountState, verdict: Verdict, now: float, cooldown: float, unhealthy: float) -> AccountState:
    """What a server reply teaches about the account that sent it."""
    if verdict.outcome is Outcome.ACCOUNT:
        return replace(state, unhealthy_until=now + unhealthy, last_problem=f"{verdict.code} {verdict.enhanced}".strip())
    if verdict.throttled:
        until = next_daily_reset(now) if verdict.daily_quota else now + cooldown
        return replace(state, cooldown_until=max(state.cooldown_until, until),
                       last_problem=f"{verdict.code} {verdict.enhanced}".strip())
    return state


# --- Table storage adapter ---------------------------------------------------------------------

def _from_row(row: Any) -> AccountState:
    return AccountState(
        account=row["RowKey"],
        last_granted=float(row.get("LastGranted", 0.0)),
        cooldown_until=float(row.get("CooldownUntil", 0.0)),
        unhealthy_until=float(row.get("UnhealthyUntil", 0.0)),
        last_problem=row.get("LastProblem", ""),
        etag=row.metadata.get("etag"),
    )


def _to_row(state: AccountState) -> dict[str, Any]:
    return {
        "PartitionKey": _PARTITION,
        "RowKey": state.account,
        "LastGranted": float(state.last_granted),
        "CooldownUntil": float(state.cooldown_until),
        "UnhealthyUntil": float(state.unhealthy_until),
        "LastProblem": state.last_problem,
    }


class TableGovernor:
    def __init__(self, table: Any, accounts: Iterable[str], *, cooldown_seconds: float,
                 unhealthy_seconds: float, rng: random.Random | None = None) -> None:
        self._table = table
        self._accounts = tuple(accounts)
        self._cooldown = cooldown_seconds
        self._unhealthy = unhealthy_seconds
        self._rng = rng or random.Random()
        self.round_trips = 0  # Table calls made, for benchmarks

    async def states(self) -> list[AccountState]:
        self.round_trips += 1
        found = {}
        async for row in self._table.query_entities("PartitionKey eq @pk", parameters={"pk": _PARTITION}):
            found[row["RowKey"]] = _from_row(row)
        # Accounts no longer configured are ignored; new ones start fresh.
        return [found.get(a, AccountState(account=a)) for a in self._accounts]

    async def _write(self, state: AccountState) -> None:
        self.round_trips += 1
        try:
            if state.etag is None:
                await self._table.create_entity(_to_row(state))
            else:
                await self._table.update_entity(_to_row(state), mode="replace", etag=state.etag,
                                                match_condition=MatchConditions.IfNotModified)
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError) as exc:
            raise _Conflict from exc

    async def _backoff(self, attempt: int) -> None:
        # A lost ETag race: re-read after a few milliseconds so racing instances spread out.
        await asyncio.sleep(self._rng.uniform(0, 0.005 * (2 ** attempt)))

    async def acquire(self, shape: SendShape, now: float) -> Grant | Wait:
        for attempt in range(MAX_CONFLICT_RETRIES):
            states = await self.states()
            decision = choose_account(states, shape, now)
            if isinstance(decision, Wait):
                return decision
            chosen = next(s for s in states if s.account == decision.account)
            try:
                await self._write(replace(chosen, last_granted=max(now, chosen.last_granted + 1e-6)))
                return decision
            except _Conflict:
                await self._backoff(attempt)
        # Heavy contention: tell the caller to come back shortly rather than spin.
        return Wait(until=now + 1.0, reason="governor contention")

    async def report(self, account: str, verdict: Verdict, now: float) -> None:
        if verdict.outcome is not Outcome.ACCOUNT and not verdict.throttled:
            return
        for attempt in range(MAX_CONFLICT_RETRIES):
            state = next((s for s in await self.states() if s.account == account), None)
            if state is None:
                return
            try:
                await self._write(after_reply(state, verdict, now, self._cooldown, self._unhealthy))
                return
            except _Conflict:
                await self._backoff(attempt)


class _Conflict(Exception):
    pass
