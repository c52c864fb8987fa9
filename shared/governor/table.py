"""The rate governor kept in Table storage, like a Durable entity: one row per HVE account plus one
tenant row, all in one partition. A decision reads the partition (one query) and writes the
chosen account's row with If-Match on its ETag (one write; the tenant row joins the same entity
group transaction only when the account takes a new block of tenant allowance). A lost race
re-reads and decides again, a bounded number of times with jitter. No in-process state counts.

Each process keeps to the account row it wrote last while that account is free and not ahead of
the least used by more than STICKY_LEAD messages: its ETag is one this process knows is current
unless another instance wrote the row since, whereas any row another instance wrote since this
process's last read fails the If-Match. (Picking uniformly from a snapshot up to SNAPSHOT_SECONDS
old made most writes of eight busy instances lose that race: about 2 round trips per decision.)

The arithmetic is in `shared.governor.pacing`; this module only moves state in and out of the table.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from shared.governor.blocks import (
    BLOCK_SECONDS,
    Spare,
    block_size,
    give_back,
    shape_key,
    spare_slot,
    take_block,
)
from shared.governor.pacing import (
    DAY,
    NEAR_SECONDS,
    NO_SESSION,
    AccountState,
    Decision,
    Grant,
    Impossible,
    PacingConfig,
    Release,
    Shape,
    TenantState,
    Wait,
    after_reply,
    decide,
    earliest_slot,
    release_slot,
)
from shared.send.replies import Outcome, Verdict

PARTITION = "governor"
TENANT_ROW = "tenant"
_ACCOUNT_PREFIX = "account|"
MAX_CONFLICT_RETRIES = 10
# How long this process decides from the state it last read or wrote before reading again.
SNAPSHOT_SECONDS = 2.0
# How many messages today the account a process keeps to may be ahead of the least used free
# account before the process picks again (uniformly among the free ones): the load stays even.
STICKY_LEAD = 20

__all__ = ["TableGovernor", "Grant", "Wait", "Impossible", "Release", "Shape", "AccountState", "TenantState"]


def _slots_to_text(slots: tuple[float, ...]) -> str:
    """Slot times in milliseconds, each as the difference from the one before (a backlog booked an
    hour ahead is hundreds of slots: this keeps the property far below Table's 32K-character limit)."""
    if not slots:
        return ""
    ms = [round(s * 1000) for s in slots]
    return "d:" + ",".join([str(ms[0])] + [str(b - a) for a, b in zip(ms, ms[1:], strict=False)])


def _slots_from_text(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    if not text.startswith("d:"):  # rows written before the delta form: seconds with 3 decimals
        return tuple(float(x) for x in text.split(","))
    total, out = 0, []
    for part in text[2:].split(","):
        total += int(part)
        out.append(total / 1000.0)
    return tuple(out)


def account_from_row(row: Any) -> AccountState:
    return AccountState(
        account=row["RowKey"][len(_ACCOUNT_PREFIX) :],
        day=int(row.get("Day", -1)),
        internal_today=int(row.get("InternalToday", 0)),
        external_today=int(row.get("ExternalToday", 0)),
        messages_today=int(row.get("MessagesToday", 0)),
        allowance=int(row.get("Allowance", 0)),
        slots=_slots_from_text(row.get("Slots")),
        external_slots=_slots_from_text(row.get("ExternalSlots")),
        last_granted=float(row.get("LastGranted", 0.0)),
        cooldown_until=float(row.get("CooldownUntil", 0.0)),
        unhealthy_until=float(row.get("UnhealthyUntil", 0.0)),
        last_problem=row.get("LastProblem", ""),
        etag=row.metadata.get("etag"),
    )


def account_to_row(state: AccountState) -> dict[str, Any]:
    return {
        "PartitionKey": PARTITION,
        "RowKey": _ACCOUNT_PREFIX + state.account,
        "Day": state.day,
        "InternalToday": state.internal_today,
        "ExternalToday": state.external_today,
        "MessagesToday": state.messages_today,
        "Allowance": state.allowance,
        "Slots": _slots_to_text(state.slots),
        "ExternalSlots": _slots_to_text(state.external_slots),
        "LastGranted": float(state.last_granted),
        "CooldownUntil": float(state.cooldown_until),
        "UnhealthyUntil": float(state.unhealthy_until),
        "LastProblem": state.last_problem,
    }


def _tenant_to_row(state: TenantState) -> dict[str, Any]:
    return {"PartitionKey": PARTITION, "RowKey": TENANT_ROW, "Day": state.day, "Claimed": state.claimed}


def _operation(row: dict[str, Any], etag: str | None) -> tuple:
    if etag is None:
        return ("create", row)
    return ("update", row, {"mode": "replace", "etag": etag, "match_condition": MatchConditions.IfNotModified})


class _Conflict(Exception):
    pass


class TableGovernor:
    def __init__(
        self,
        table: Any,
        accounts: Iterable[str],
        config: PacingConfig,
        rng: random.Random | None = None,
        clock: Any = time.monotonic,
    ) -> None:
        self._table = table
        self._accounts = tuple(accounts)
        self.config = config
        self._rng = rng or random.Random()
        self._monotonic = clock
        self.round_trips = 0  # Table calls, for the benchmark
        self.conflicts = 0
        self._lock = asyncio.Lock()
        self._snapshot: tuple[list[AccountState], TenantState | None] | None = None
        self._snapshot_at = 0.0
        self._stale: set[str] = set()
        # Accounts this process keeps away from for a moment after a local failure (a credential
        # read): never shared, because it says nothing about the account itself.
        self._held: dict[str, float] = {}
        # The account row this process wrote last (a grant), whose ETag it most likely holds current.
        self._own: str | None = None
        # Slots this process booked in the rows beyond the one a decision needed (slot blocks,
        # shared/governor/blocks.py): handed to its next decisions without a Table call; and those
        # no longer good, given back in its next write of their row.
        self._spares: list[Spare] = []
        self._returns: list[Spare] = []
        self._recent: deque[tuple[float, tuple[int, int]]] = deque()
        self.spares_used = 0  # decisions served from a spare, for the benchmark

    async def read(self) -> tuple[list[AccountState], TenantState | None]:
        """All accounts' rows and the tenant row: one query of one partition."""
        self.round_trips += 1
        found: dict[str, AccountState] = {}
        tenant = TenantState()
        async for row in self._table.query_entities("PartitionKey eq @pk", parameters={"pk": PARTITION}):
            if row["RowKey"] == TENANT_ROW:
                tenant = TenantState(
                    day=int(row.get("Day", -1)), claimed=int(row.get("Claimed", 0)), etag=row.metadata.get("etag")
                )
            elif row["RowKey"].startswith(_ACCOUNT_PREFIX):
                state = account_from_row(row)
                found[state.account] = state
        # Accounts no longer configured are ignored; new ones start fresh.
        states = [found.get(a, AccountState(account=a)) for a in self._accounts]
        return states, (tenant if self.config.tenant_cap is not None else None)

    async def _refresh(self) -> None:
        self._snapshot = await self.read()
        self._snapshot_at = self._monotonic()
        self._stale.clear()

    async def _write(
        self, rows: list[tuple[AccountState, str | None]], tenant: TenantState | None, old_tenant_etag: str | None
    ) -> tuple[list[str | None], str | None]:
        """Write account rows (each If-Match its old ETag) and maybe the tenant row, all in one
        transaction when there is more than one; returns the new ETags."""
        self.round_trips += 1
        try:
            if tenant is None and len(rows) == 1:
                account, old_etag = rows[0]
                row = account_to_row(account)
                if old_etag is None:
                    meta = await self._table.create_entity(row)
                else:
                    meta = await self._table.update_entity(
                        row, mode="replace", etag=old_etag, match_condition=MatchConditions.IfNotModified
                    )
                return [meta.get("etag")], None
            operations = [_operation(account_to_row(a), etag) for a, etag in rows]
            if tenant is not None:
                operations.append(_operation(_tenant_to_row(tenant), old_tenant_etag))
            metas = await self._table.submit_transaction(operations)
            etags = [m.get("etag") for m in metas]
            return etags[: len(rows)], (etags[-1] if tenant is not None else None)
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError) as exc:
            raise _Conflict from exc
        except HttpResponseError as exc:  # TableTransactionError: 409/412 inside the batch
            if exc.status_code in (409, 412):
                raise _Conflict from exc
            raise

    async def _backoff(self, attempt: int) -> None:
        # A lost ETag race: retry after a few jittered milliseconds so racing instances spread out.
        self.conflicts += 1
        await asyncio.sleep(self._rng.uniform(0, 0.01 * (2 ** min(attempt, 4))))

    def known_resting(self, account: str, now: float) -> bool:
        """Whether this process last saw the account cooling down or unhealthy, or holds it after a
        local failure (no Table call)."""
        if self._held.get(account, 0.0) > self._monotonic():
            return True
        if self._snapshot is None:
            return False
        state = next((s for s in self._snapshot[0] if s.account == account), None)
        return state is not None and state.available_at() > now

    async def refresh(self, older_than: float = 0.0) -> None:
        """Read the rows again, unless the state this process holds is at most `older_than`
        seconds old by the time it is its turn (callers asking together read once)."""
        async with self._lock:
            if older_than <= 0 or self.snapshot_age() > older_than:
                await self._refresh()

    def snapshot_age(self) -> float:
        return self._monotonic() - self._snapshot_at if self._snapshot is not None else float("inf")

    def latest_slot(self) -> float:
        """The last slot (usually a booking) this process knows of, any account; 0 when none."""
        if self._snapshot is None:
            return 0.0
        return max((log[-1] for s in self._snapshot[0] for log in (s.slots, s.external_slots) if log), default=0.0)

    def booked_ahead(self, now: float) -> int:
        """Slots after `now` this process knows of (bookings whose messages wait invisible on the
        queue), all accounts; no Table call."""
        if self._snapshot is None:
            return 0
        return sum(
            max(
                len(s.slots) - bisect.bisect_right(s.slots, now),
                len(s.external_slots) - bisect.bisect_right(s.external_slots, now),
            )
            for s in self._snapshot[0]
        )

    def likely_account(self, shape: Shape, now: float, busy: Callable[[str], bool]) -> str | None:
        """The account a decision for `shape` now would most likely grant a slot now on, from the
        state this process holds (no Table call): one with a slot free now that is not `busy`, the
        one this process keeps to first; None when none is known. (The send stage makes that
        account's SMTP session ready before it asks, so a slot granted now does not wait for a new
        session: TCP, STARTTLS and AUTH take seconds on a loaded host.)"""
        if self._snapshot is None:
            return None
        found = self._spare_for(shape, now, busy)  # a good spare is handed out first (`acquire`)
        if found is not None:
            return found[1].account
        states, tenant = self._snapshot
        ready = [
            s
            for s in self._usable(states, None, None)
            if not busy(s.account) and earliest_slot(s, tenant, shape, now, self.config)[0] <= now
        ]
        if not ready:
            return None
        kept = self._keep_to_own(shape, ready, now).preferred_account
        if kept is not None and any(s.account == kept for s in ready):
            return kept
        return self._rng.choice(ready).account

    def known_states(self) -> list[AccountState]:
        """The account rows as this process last read or wrote them (no Table call)."""
        return list(self._snapshot[0]) if self._snapshot is not None else []

    def held(self) -> set[str]:
        """Accounts this process keeps off after a local failure, right now."""
        now = self._monotonic()
        return {account for account, until in self._held.items() if until > now}

    def hold_locally(self, account: str, seconds: float) -> None:
        """Keep this process off `account` for `seconds` (other instances are not told)."""
        self._held[account] = max(self._held.get(account, 0.0), self._monotonic() + seconds)

    def _remember(self, accounts: list[AccountState], tenant: TenantState | None) -> None:
        if self._snapshot is None:
            return
        states, old_tenant = self._snapshot
        by_name = {a.account: a for a in accounts}
        states = [by_name.get(s.account, s) for s in states]
        self._snapshot = (states, tenant if tenant is not None else old_tenant)

    async def acquire(
        self,
        shape: Shape,
        now: float,
        *,
        allow_booking: bool = True,
        release: Release | None = None,
        only: str | None = None,
        book_not_before: float = 0.0,
        backlog_until: float | None = None,
        busy: Callable[[str], bool] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Decision:
        """Grant (maybe a booking later today), Wait, or Impossible.

        `release`: the request's earlier slot, given back in the same write that takes the new one
        (a late booking, a lapsed grant). `only`: decide for that account alone. `busy`: whether
        the caller has no SMTP session free for an account, asked at the moment of deciding: no
        slot now is granted there (see `decide`; a `Wait` with reason `NO_SESSION` when every
        account free now is busy, which still writes a `release`). `clock`: the decision is made
        at `clock()` read when it is this call's turn (and again on each retry after a lost race),
        not at `now`: decisions in one process take turns, and under load a grant dated when the
        caller started waiting for its turn was over a second old before its session was asked for.

        Decisions in one process take turns (they would only race each other) and start from
        the state this process last read or wrote; the ETag on the write is what makes the
        decision safe against every other instance. A Wait is only ever given on fresh state, and
        so is a booking once a lost race left a row out."""
        async with self._lock:
            if clock is not None:
                now = max(now, clock())
            self._remember_decision(shape, now)
            if release is None and only is None:
                spare = self._from_spares(shape, now, busy)
                if spare is not None:
                    return spare
            fresh = False
            for attempt in range(MAX_CONFLICT_RETRIES):
                if self._snapshot is None or self._monotonic() - self._snapshot_at > SNAPSHOT_SECONDS:
                    await self._refresh()
                    fresh = True
                if clock is not None:
                    now = max(now, clock())
                assert self._snapshot is not None
                states, tenant = self._snapshot
                # Spares no longer good are given back in whichever row this decision writes.
                states = [give_back(s, self._returns, self.config) for s in states] if self._returns else states
                usable = self._usable(states, release, only)
                taken = frozenset(s.account for s in usable if busy(s.account)) if busy is not None else frozenset()
                decision = decide(
                    usable,
                    tenant,
                    self._keep_to_own(shape, usable, now) if only is None else shape,
                    now,
                    self.config,
                    self._rng,
                    allow_booking=allow_booking,
                    release=release,
                    book_not_before=book_not_before,
                    backlog_until=backlog_until,
                    busy=taken,
                )
                local = isinstance(decision, Wait) and decision.reason == NO_SESSION
                if (
                    not fresh
                    and not local
                    and (
                        isinstance(decision, Wait)
                        or (
                            isinstance(decision, Grant)
                            and decision.at > now
                            and not self._near_stale_rows(decision.at, states, tenant, shape, now)
                        )
                    )
                ):
                    # A wait, or a booking made while a row left out as stale may have a slot
                    # clearly earlier: only ever on fresh state.
                    await self._refresh()
                    fresh = True
                    continue
                extra: tuple[float, ...] = ()
                if isinstance(decision, Grant) and only is None:
                    size = self._block_size(shape, now)
                    decision, extra = take_block(decision, usable, tenant, shape, now, self.config, size)
                rows: list[AccountState] = []
                if isinstance(decision, Grant):
                    rows.append(decision.account_state)
                if decision.released_state is not None:
                    rows.append(decision.released_state)
                if not rows:
                    return decision
                new_tenant = decision.tenant_state if isinstance(decision, Grant) else None
                old = {s.account: s for s in states}
                try:
                    etags, tenant_etag = await self._write(
                        [(r, old[r.account].etag) for r in rows],
                        new_tenant,
                        tenant.etag if tenant is not None else None,
                    )
                except _Conflict:
                    # Only those rows (or the tenant row) are known stale: try another account from
                    # the same read, and read again once nothing fresh is left.
                    self._stale.update(r.account for r in rows)
                    if self._own in self._stale:
                        self._own = None
                    fresh = False
                    if (
                        new_tenant is not None
                        or release is not None
                        or only is not None
                        or len(self._stale) >= len(states)
                    ):
                        self._snapshot = None
                    await self._backoff(attempt)
                    continue
                except Exception:
                    # Maybe applied, the answer lost: the spares given back in it are not given
                    # back again (twice would count a slot fewer than were granted).
                    written = {r.account for r in rows}
                    self._returns = [r for r in self._returns if r.account not in written]
                    raise
                self._remember(
                    [replace(r, etag=e) for r, e in zip(rows, etags, strict=False)],
                    replace(new_tenant, etag=tenant_etag) if new_tenant is not None else None,
                )
                written = {r.account for r in rows}
                self._returns = [r for r in self._returns if r.account not in written]
                if isinstance(decision, Grant):
                    self._own = decision.account
                    plain = replace(shape, preferred_account=None)
                    self._spares += [Spare(decision.account, at, plain, now) for at in extra]
                return decision
        # Heavy contention: come back shortly rather than spin here. A release not written is
        # not lost: the caller gives it back with `refund` or the booking stays counted.
        return Wait(until=now + 1.0 + self._rng.uniform(0, 1.0), reason="governor contention")

    def spares_held(self, account: str | None = None) -> list[Spare]:
        """Slots this process booked ahead of its messages and holds unused (or has yet to give
        back): counted in their rows like slots granted to messages."""
        return [s for s in self._spares + self._returns if account in (None, s.account)]

    def _remember_decision(self, shape: Shape, now: float) -> None:
        while self._recent and self._recent[0][0] < now - BLOCK_SECONDS:
            self._recent.popleft()
        self._recent.append((now, shape_key(shape)))

    def _block_size(self, shape: Shape, now: float) -> int:
        """How many slots a write for this shape books: one more than the decisions this process
        made for it in the last BLOCK_SECONDS before this one (as long as its spares are good)."""
        key = shape_key(shape)
        recent = sum(1 for t, k in self._recent if k == key and now - BLOCK_SECONDS <= t <= now)
        return block_size(recent - 1)  # (this decision is remembered already)

    def _from_spares(self, shape: Shape, now: float, busy: Callable[[str], bool] | None = None) -> Grant | None:
        """The earliest good spare for this shape (no Table call), or None. Spares no longer good
        move to the ones to give back."""
        good: list[tuple[float, Spare]] = []
        for spare in self._spares:
            at = spare_slot(spare, now, self.config)
            if at is None or self.known_resting(spare.account, now):
                self._returns.append(spare)
            else:
                good.append((at, spare))
        self._spares = [spare for _, spare in good]
        # Given back after a day at the latest: the row has moved on by then.
        self._returns = [r for r in self._returns if r.at > now - DAY]
        found = self._spare_for(shape, now, busy)
        if found is None or self._snapshot is None:
            return None
        at, spare = found
        self._spares.remove(spare)
        state = next((s for s in self._snapshot[0] if s.account == spare.account), AccountState(spare.account))
        self.spares_used += 1
        return Grant(spare.account, at, state, None)

    def _spare_for(self, shape: Shape, now: float, busy: Callable[[str], bool] | None) -> tuple[float, Spare] | None:
        """The earliest good spare this process holds for `shape` (its slot time, and the spare),
        on an account not `busy`; nothing is changed. Good: `spare_slot` still gives it a time,
        and the account is not seen resting. (`_from_spares` hands it out, `likely_account`
        only looks.)"""
        key = shape_key(shape)
        fit: list[tuple[float, Spare]] = []
        for spare in self._spares:
            if shape_key(spare.shape) != key or shape.preferred_account not in (None, spare.account):
                continue
            if busy is not None and busy(spare.account):
                continue
            at = spare_slot(spare, now, self.config)
            if at is not None and not self.known_resting(spare.account, now):
                fit.append((at, spare))
        return min(fit, key=lambda item: item[0], default=None)

    def _keep_to_own(self, shape: Shape, usable: list[AccountState], now: float) -> Shape:
        """`shape` preferring the account this process wrote last, while it is free and at most
        STICKY_LEAD messages ahead of the least used free account (a producer's choice of account
        stands). `decide` still takes it only when the message fits there now, or for a booking
        when its slot is near the earliest."""
        if shape.preferred_account is not None or self._own is None:
            return shape
        day = self.config.day_of(now)
        free = {s.account: s.on_day(day).messages_today for s in usable if s.available_at() <= now}
        if self._own not in free or free[self._own] > min(free.values()) + STICKY_LEAD:
            return shape
        return replace(shape, preferred_account=self._own)

    def _near_stale_rows(
        self, at: float, states: list[AccountState], tenant: TenantState | None, shape: Shape, now: float
    ) -> bool:
        """Whether a booking at `at` is as good as one on the rows left out as stale (known changed
        by another instance since this process read them) could be: within NEAR_SECONDS of their
        earliest slot as last read, which is what `decide` spreads bookings over anyway. (What
        changed them is mostly a slot taken, which only moves their earliest slot later; a lost
        race then costs a write on another row, not a read as well.)"""
        stale = [s for s in states if s.account in self._stale]
        if not stale:
            return True
        best = min(earliest_slot(s, tenant, shape, now, self.config)[0] for s in stale)
        return at <= best + NEAR_SECONDS

    def _usable(self, states: list[AccountState], release: Release | None, only: str | None) -> list[AccountState]:
        if only is not None:
            return [s for s in states if s.account == only]
        # Rows another instance changed under us are left out until the next read, and so are
        # accounts this process holds after a local failure (unless nothing else is left).
        held = {a for a, until in self._held.items() if until > self._monotonic()}
        usable = (
            [s for s in states if s.account not in self._stale and s.account not in held]
            or [s for s in states if s.account not in self._stale]
            or states
        )
        if release is not None and all(s.account != release.account for s in usable):
            usable = usable + [s for s in states if s.account == release.account]
        return usable

    async def recheck(self, account: str, at: float, shape: Shape, now: float) -> float | None:
        """A grant at `at` that got old before its message could go (a slow session): give the slot
        back and take one now on the same account if it still fits. Returns the new slot time, or
        None when it does not fit now (the old slot is given back either way)."""
        decision = await self.acquire(
            shape, now, allow_booking=False, release=Release(account, at, shape), only=account
        )
        if isinstance(decision, Grant) and decision.at <= now:
            return decision.at
        if decision.released_state is None and not isinstance(decision, Grant):
            await self.refund(Release(account, at, shape))  # contention: give it back on its own
        return None

    async def refund(self, release: Release) -> None:
        """Give back a slot whose message was definitely not delivered (a 4xx, a connection lost
        before DATA, a refusal, a lost ledger race): its place in the rolling minute and its daily
        counts. When it is unknown whether HVE accepted, callers keep the charge."""
        await self._update(release.account, lambda state: release_slot(state, release, self.config))

    async def report(self, account: str, verdict: Verdict, now: float) -> None:
        """Throttling puts the account in cooldown; an authentication failure HVE answered marks it
        unhealthy. A local failure (code 0) changes nothing shared."""
        if not verdict.throttled and not (verdict.outcome is Outcome.ACCOUNT and verdict.code):
            return
        await self._update(account, lambda state: after_reply(state, verdict, now, self.config))

    async def _update(self, account: str, change: Callable[[AccountState], AccountState]) -> None:
        """Read one account's row, change it, write it If-Match; again on a lost race."""
        for attempt in range(MAX_CONFLICT_RETRIES):
            state = await self._get(account)
            updated = change(state)
            if updated == state:
                return
            try:
                (etag,), _ = await self._write([(updated, state.etag)], None, None)
            except _Conflict:
                await self._backoff(attempt)
                continue
            async with self._lock:
                self._remember([replace(updated, etag=etag)], None)
            return

    async def _get(self, account: str) -> AccountState:
        try:
            self.round_trips += 1
            return account_from_row(await self._table.get_entity(PARTITION, _ACCOUNT_PREFIX + account))
        except ResourceNotFoundError:
            return AccountState(account=account)

    async def states(self) -> list[AccountState]:
        return (await self.read())[0]

    async def claim_allowance(self, need: int, block: int, now: float) -> int | None:
        """Take up to `block` recipients (at least `need` when that much is left) of today's tenant
        cap from the tenant row, If-Match its ETag; how many were taken (0: the cap is spent, or
        less than `need` is left; None: every attempt lost the race for the row to other instances,
        so nothing was taken but the cap is not known to be spent). The plain path's budget: one
        write per block, not per message."""
        cap = self.config.tenant_cap
        if cap is None:
            return block
        day = self.config.day_of(now)
        for attempt in range(MAX_CONFLICT_RETRIES):
            self.round_trips += 1
            try:
                row = await self._table.get_entity(PARTITION, TENANT_ROW)
                tenant = TenantState(
                    day=int(row.get("Day", -1)), claimed=int(row.get("Claimed", 0)), etag=row.metadata.get("etag")
                )
            except ResourceNotFoundError:
                tenant = TenantState()
            today = tenant.on_day(day)
            left = cap - today.claimed
            if left < need or left <= 0:
                return 0
            # Near the cap, smaller blocks (a sixteenth of what is left): little is stranded.
            take = min(left, max(need, min(block, max(1, left // 16))))
            updated = replace(today, claimed=today.claimed + take)
            try:
                await self._write([], updated, tenant.etag)
            except _Conflict:
                await self._backoff(attempt)
                continue
            return take
        return None
