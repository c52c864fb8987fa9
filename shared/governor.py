"""The rate governor kept in Table storage, like a Durable entity: one row per HVE account plus one
tenant row, all in one partition. A decision reads the partition (one query) and writes the
chosen account's row with If-Match on its ETag (one write; the tenant row joins the same entity
group transaction only when the account takes a new block of tenant allowance). A lost race
re-reads and decides again, a bounded number of times with jitter. No in-process state counts.

The arithmetic is in `shared.pacing`; this module only moves state in and out of the table.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from typing import Any, Iterable

from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError

from .pacing import AccountState, Decision, Grant, Impossible, PacingConfig, Shape, TenantState, Wait, after_reply, decide
from .replies import Outcome, Verdict

PARTITION = "governor"
TENANT_ROW = "tenant"
_ACCOUNT_PREFIX = "account|"
MAX_CONFLICT_RETRIES = 10
# How long this process decides from the state it last read or wrote before reading again.
SNAPSHOT_SECONDS = 2.0

__all__ = ["TableGovernor", "Grant", "Wait", "Impossible", "Shape", "AccountState", "TenantState"]


def _slots_to_text(slots: tuple[float, ...]) -> str:
    return ",".join(f"{s:.3f}" for s in slots)


def _slots_from_text(text: str | None) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",")) if text else ()


def account_from_row(row: Any) -> AccountState:
    return AccountState(
        account=row["RowKey"][len(_ACCOUNT_PREFIX):],
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
    def __init__(self, table: Any, accounts: Iterable[str], config: PacingConfig,
                 rng: random.Random | None = None) -> None:
        self._table = table
        self._accounts = tuple(accounts)
        self.config = config
        self._rng = rng or random.Random()
        self.round_trips = 0   # Table calls, for the benchmark
        self.conflicts = 0
        self._lock = asyncio.Lock()
        self._snapshot: tuple[list[AccountState], TenantState | None] | None = None
        self._snapshot_at = 0.0
        self._stale: set[str] = set()

    async def read(self) -> tuple[list[AccountState], TenantState | None]:
        """All accounts' rows and the tenant row: one query of one partition."""
        self.round_trips += 1
        found: dict[str, AccountState] = {}
        tenant = TenantState()
        async for row in self._table.query_entities("PartitionKey eq @pk", parameters={"pk": PARTITION}):
            if row["RowKey"] == TENANT_ROW:
                tenant = TenantState(day=int(row.get("Day", -1)), claimed=int(row.get("Claimed", 0)),
                                     etag=row.metadata.get("etag"))
            elif row["RowKey"].startswith(_ACCOUNT_PREFIX):
                state = account_from_row(row)
                found[state.account] = state
        # Accounts no longer configured are ignored; new ones start fresh.
        states = [found.get(a, AccountState(account=a)) for a in self._accounts]
        return states, (tenant if self.config.tenant_cap is not None else None)

    async def _refresh(self) -> None:
        self._snapshot = await self.read()
        self._snapshot_at = time.monotonic()
        self._stale.clear()

    async def _write(self, account: AccountState, tenant: TenantState | None, old_account_etag: str | None,
                     old_tenant_etag: str | None) -> tuple[str | None, str | None]:
        """Write the account row (and the tenant row in the same transaction); returns new ETags."""
        self.round_trips += 1
        try:
            if tenant is None:
                row = account_to_row(account)
                if old_account_etag is None:
                    meta = await self._table.create_entity(row)
                else:
                    meta = await self._table.update_entity(row, mode="replace", etag=old_account_etag,
                                                           match_condition=MatchConditions.IfNotModified)
                return meta.get("etag"), None
            metas = await self._table.submit_transaction([
                _operation(account_to_row(account), old_account_etag),
                _operation(_tenant_to_row(tenant), old_tenant_etag),
            ])
            return metas[0].get("etag"), metas[1].get("etag")
        except (ResourceExistsError, ResourceModifiedError, ResourceNotFoundError) as exc:
            raise _Conflict from exc
        except HttpResponseError as exc:  # TableTransactionError: 409/412 inside the batch
            if exc.status_code in (409, 412):
                raise _Conflict from exc
            raise

    async def _backoff(self, attempt: int) -> None:
        # A lost ETag race: retry after a few jittered milliseconds so racing instances spread out.
        self.conflicts += 1
        await asyncio.sleep(self._rng.uniform(0, 0.004 * (2 ** min(attempt, 5))))

    def known_resting(self, account: str, now: float) -> bool:
        """Whether this process last saw the account cooling down or unhealthy (no Table call)."""
        if self._snapshot is None:
            return False
        state = next((s for s in self._snapshot[0] if s.account == account), None)
        return state is not None and state.available_at() > now

    def _remember(self, account: AccountState, tenant: TenantState | None) -> None:
        if self._snapshot is None:
            return
        states, old_tenant = self._snapshot
        states = [account if s.account == account.account else s for s in states]
        self._snapshot = (states, tenant if tenant is not None else old_tenant)

    async def acquire(self, shape: Shape, now: float, *, allow_booking: bool = True) -> Decision:
        """Grant (maybe a booking later today), Wait, or Impossible.

        Decisions in one process take turns (they would only race each other) and start from
        the state this process last read or wrote; the ETag on the write is what makes the
        decision safe against every other instance. A Wait is only ever given on fresh state."""
        async with self._lock:
            fresh = False
            for attempt in range(MAX_CONFLICT_RETRIES):
                if self._snapshot is None or time.monotonic() - self._snapshot_at > SNAPSHOT_SECONDS:
                    await self._refresh()
                    fresh = True
                states, tenant = self._snapshot
                # Rows another instance changed under us are left out until the next read.
                usable = [s for s in states if s.account not in self._stale] or states
                decision = decide(usable, tenant, shape, now, self.config, self._rng, allow_booking=allow_booking)
                if isinstance(decision, Wait) and not fresh:
                    await self._refresh()
                    fresh = True
                    continue
                if not isinstance(decision, Grant):
                    return decision
                old = next(s for s in states if s.account == decision.account)
                try:
                    account_etag, tenant_etag = await self._write(
                        decision.account_state, decision.tenant_state, old.etag, tenant.etag if tenant is not None else None)
                except _Conflict:
                    # Only that row (or the tenant row) is known stale: try another account from
                    # the same read, and read again once nothing fresh is left.
                    self._stale.add(decision.account)
                    fresh = False
                    if decision.tenant_state is not None or len(self._stale) >= len(states):
                        self._snapshot = None
                    await self._backoff(attempt)
                    continue
                self._remember(replace(decision.account_state, etag=account_etag),
                               replace(decision.tenant_state, etag=tenant_etag) if decision.tenant_state else None)
                return decision
        # Heavy contention: come back shortly rather than spin here.
        return Wait(until=now + 1.0 + self._rng.uniform(0, 1.0), reason="governor contention")

    async def report(self, account: str, verdict: Verdict, now: float) -> None:
        """Throttling puts the account in cooldown; an authentication failure marks it unhealthy."""
        if verdict.outcome is not Outcome.ACCOUNT and not verdict.throttled:
            return
        for attempt in range(MAX_CONFLICT_RETRIES):
            try:
                self.round_trips += 1
                row = await self._table.get_entity(PARTITION, _ACCOUNT_PREFIX + account)
                state = account_from_row(row)
            except ResourceNotFoundError:
                state = AccountState(account=account)
            updated = after_reply(state, verdict, now, self.config)
            try:
                etag, _ = await self._write(updated, None, state.etag, None)
            except _Conflict:
                await self._backoff(attempt)
                continue
            async with self._lock:
                self._remember(replace(updated, etag=etag), None)
            return

    async def states(self) -> list[AccountState]:
        return (await self.read())[0]
