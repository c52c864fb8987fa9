"""Governor arithmetic: given the shared state of the HVE accounts and a message's shape, grant a
send slot now, book one later today, or say when to come back. Pure: no I/O, no clock.

Windows (from ../shared/docs/hve-facts.md, values from `Limits`):
- rolling minute per account: messages with external recipients; messages of any kind;
- daily per account: external recipients; all recipients;
- daily per tenant: all recipients, and the cost guard (daily recipient budget).

Rolling windows keep a log of slot times per account. A slot is counted from the time it was
granted, plus a safety margin, because HVE counts a message when it arrives by its own clock.
Future slots (bookings) go in the same log, so a backlog is spread over the coming minutes
instead of waking all at once.

Tenant-wide daily counts would make one Table row every instance writes on every message. So an
account takes a block of the tenant's daily allowance at a time (one write of the tenant row per
block), and spends it from its own row. The tenant row only ever hands out what the cap allows,
so the cap holds; at most a little allowance per account goes unused at the end of a day.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from .limits import Limits
from .replies import Outcome, Verdict

DAY = 86400.0
MINUTE = 60.0
# Recipients an account takes from the tenant allowance at once when far from the cap.
ALLOWANCE_BLOCK = 500


@dataclass(frozen=True)
class PacingConfig:
    limits: Limits
    margin_seconds: float = 2.0
    day_offset_seconds: float = 0.0      # daily windows start this long after 00:00 UTC
    daily_recipient_budget: int | None = None
    cooldown_seconds: float = 60.0
    unhealthy_seconds: float = 900.0

    @property
    def tenant_cap(self) -> int | None:
        caps = [c for c in (self.limits.recipients_per_day_per_tenant, self.daily_recipient_budget) if c is not None]
        return min(caps) if caps else None

    def day_of(self, t: float) -> int:
        return math.floor((t - self.day_offset_seconds) / DAY)

    def day_end(self, day: int) -> float:
        return (day + 1) * DAY + self.day_offset_seconds


@dataclass(frozen=True)
class Shape:
    internal: int
    external: int
    preferred_account: str | None = None

    @property
    def recipients(self) -> int:
        return self.internal + self.external


@dataclass(frozen=True)
class AccountState:
    account: str
    day: int = -1
    internal_today: int = 0
    external_today: int = 0
    messages_today: int = 0
    allowance: int = 0                       # tenant allowance held for `day`
    slots: tuple[float, ...] = ()            # slot times of recent messages (rolling minute)
    external_slots: tuple[float, ...] = ()   # slot times of recent messages with external recipients
    last_granted: float = 0.0
    cooldown_until: float = 0.0
    unhealthy_until: float = 0.0
    last_problem: str = ""
    etag: str | None = field(default=None, compare=False)

    def on_day(self, day: int) -> "AccountState":
        if self.day == day:
            return self
        return replace(self, day=day, internal_today=0, external_today=0, messages_today=0, allowance=0)

    @property
    def recipients_today(self) -> int:
        return self.internal_today + self.external_today

    def available_at(self) -> float:
        """When the account stops resting (cooldown after throttling, or unhealthy)."""
        return max(self.cooldown_until, self.unhealthy_until)


@dataclass(frozen=True)
class TenantState:
    day: int = -1
    claimed: int = 0                         # allowance handed to accounts on `day`
    etag: str | None = field(default=None, compare=False)

    def on_day(self, day: int) -> "TenantState":
        return self if self.day == day else replace(self, day=day, claimed=0)


@dataclass(frozen=True)
class Grant:
    account: str
    at: float                 # slot time: now for a grant, later today for a booking
    account_state: AccountState
    tenant_state: TenantState | None   # None: the tenant row is not written

    def is_booking(self, now: float) -> bool:
        return self.at > now


@dataclass(frozen=True)
class Wait:
    until: float
    reason: str


@dataclass(frozen=True)
class Impossible:
    reason: str


Decision = Grant | Wait | Impossible


# --- per-account arithmetic ---------------------------------------------------------------------

def _rolling_ready(slots: Sequence[float], limit: int | None, margin: float) -> float:
    """Earliest time another slot fits in a rolling minute holding at most `limit` slots."""
    if limit is None or len(slots) < limit:
        return -math.inf
    if limit == 0:
        return math.inf
    return slots[-limit] + MINUTE + margin


def _ms_up(t: float) -> float:
    """A slot time as stored (milliseconds), never earlier than the real one: rounding down would
    let the next slot in the window come a fraction too soon."""
    return math.ceil(t * 1000.0) / 1000.0


def impossible_reason(shape: Shape, cfg: PacingConfig) -> str | None:
    lim = cfg.limits
    if shape.external and not lim.external_allowed:
        return "external recipients are not allowed under this limits profile"
    checks = [
        (shape.recipients, lim.recipients_per_message, "recipients per message"),
        (shape.external, lim.external_recipients_per_day, "external recipients per day per account"),
        (shape.recipients, lim.recipients_per_day_per_account, "recipients per day per account"),
        (shape.recipients, cfg.tenant_cap, "recipients per day for the tenant (cap or budget)"),
    ]
    for need, cap, what in checks:
        if cap is not None and need > cap:
            return f"{need} exceeds the limit of {cap} {what}"
    if shape.external and lim.external_messages_per_minute == 0 or lim.messages_per_minute == 0:
        return "a per-minute limit is zero"
    return None


def earliest_slot(state: AccountState, tenant: TenantState | None, shape: Shape, now: float,
                  cfg: PacingConfig) -> tuple[float, str]:
    """Earliest time this account can take the message if nothing else arrives, and what binds."""
    lim = cfg.limits
    t, why = now, ""
    for candidate, reason in (
        (state.cooldown_until, f"cooling down after {state.last_problem or 'throttling'}"),
        (state.unhealthy_until, f"unhealthy ({state.last_problem or 'auth'})"),
        (_rolling_ready(state.slots, lim.messages_per_minute, cfg.margin_seconds), "messages per minute"),
        (_rolling_ready(state.external_slots, lim.external_messages_per_minute if shape.external else None,
                        cfg.margin_seconds), "external messages per minute"),
    ):
        if candidate > t:
            t, why = candidate, reason
    # Daily windows: judged on the day the slot falls in; a full day sends it to the next one.
    for _ in range(3):
        day = cfg.day_of(t)
        acct = state.on_day(day)
        full = _daily_full(acct, tenant.on_day(day) if tenant is not None else None, shape, cfg)
        if not full:
            return t, why
        t, why = cfg.day_end(day), full
    return t, why


def _daily_full(acct: AccountState, tenant: TenantState | None, shape: Shape, cfg: PacingConfig) -> str:
    lim = cfg.limits
    if lim.external_recipients_per_day is not None and acct.external_today + shape.external > lim.external_recipients_per_day:
        return "external recipients per day"
    if lim.recipients_per_day_per_account is not None and acct.recipients_today + shape.recipients > lim.recipients_per_day_per_account:
        return "recipients per day per account"
    cap = cfg.tenant_cap
    if cap is not None and tenant is not None:
        need = shape.recipients - acct.allowance
        if need > 0 and tenant.claimed + need > cap:
            return "daily recipient budget" if cfg.daily_recipient_budget == cap else "recipients per day for the tenant"
    return ""


def take_slot(state: AccountState, tenant: TenantState | None, shape: Shape, at: float, now: float,
              cfg: PacingConfig, accounts: int) -> tuple[AccountState, TenantState | None]:
    """The states after the message takes the slot at `at` (>= now, on the same day)."""
    day = cfg.day_of(at)
    acct = state.on_day(day)
    keep_after = now - MINUTE - cfg.margin_seconds
    depth = max(cfg.limits.messages_per_minute or 0, cfg.limits.external_messages_per_minute or 0)

    def log(slots: tuple[float, ...], add: bool) -> tuple[float, ...]:
        if depth == 0:
            return ()
        kept = [s for s in slots if s > keep_after] + ([_ms_up(at)] if add else [])
        return tuple(sorted(kept)[-depth:])

    new_tenant = None
    allowance = acct.allowance
    if cfg.tenant_cap is not None and tenant is not None:
        tenant_today = tenant.on_day(day)
        need = shape.recipients - allowance
        if need > 0:
            remaining = cfg.tenant_cap - tenant_today.claimed
            # Smaller blocks near the cap, so little allowance is stranded on idle accounts.
            block = min(remaining, max(need, min(ALLOWANCE_BLOCK, remaining // (2 * max(1, accounts)))))
            allowance += block
            new_tenant = replace(tenant_today, claimed=tenant_today.claimed + block)
        allowance -= shape.recipients
    new_state = replace(
        acct,
        internal_today=acct.internal_today + shape.internal,
        external_today=acct.external_today + shape.external,
        messages_today=acct.messages_today + 1,
        allowance=allowance,
        slots=log(acct.slots, cfg.limits.messages_per_minute is not None),
        external_slots=log(acct.external_slots, shape.external > 0 and cfg.limits.external_messages_per_minute is not None),
        last_granted=max(acct.last_granted, at),
    )
    return new_state, new_tenant


# --- the decision -------------------------------------------------------------------------------

def decide(states: Sequence[AccountState], tenant: TenantState | None, shape: Shape, now: float,
           cfg: PacingConfig, rng: random.Random | None = None, *, allow_booking: bool = True) -> Decision:
    """Grant now, book a slot later today, wait until a stated time, or refuse as impossible.

    Picks the account with the earliest slot; among accounts free now, the preferred one, else
    one at random (so instances reading the same state spread out)."""
    rng = rng or random.Random()
    impossible = impossible_reason(shape, cfg)
    if impossible:
        return Impossible(impossible)
    if not states:
        return Impossible("no HVE accounts configured")
    slots = [(earliest_slot(s, tenant, shape, now, cfg), s) for s in states]
    ready = [s for (t, _), s in slots if t <= now]
    if ready:
        preferred = [s for s in ready if s.account == shape.preferred_account]
        if preferred:
            chosen = preferred[0]
        else:
            # Uniform among the free accounts: spreads load evenly, and instances deciding from the
            # same state rarely pick the same row (each such collision costs an ETag retry).
            chosen = rng.choice(ready)
        return _grant(chosen, tenant, shape, now, now, cfg, len(states))
    (best_t, best_why), _ = min(slots, key=lambda item: item[0][0])
    today_end = cfg.day_end(cfg.day_of(now))
    if not allow_booking or best_t >= today_end:
        return Wait(until=best_t, reason=best_why)
    # Book: spread over accounts whose slot is within a second of the best one.
    near = [s for (t, _), s in slots if t <= best_t + 1.0]
    pref = [s for s in near if s.account == shape.preferred_account]
    chosen = pref[0] if pref else rng.choice(near)
    at = math.ceil(max(t for (t, _), s in slots if s is chosen))
    if at >= today_end:
        return Wait(until=best_t, reason=best_why)
    return _grant(chosen, tenant, shape, at, now, cfg, len(states))


def _grant(state: AccountState, tenant: TenantState | None, shape: Shape, at: float, now: float,
           cfg: PacingConfig, accounts: int) -> Grant:
    new_state, new_tenant = take_slot(state, tenant, shape, at, now, cfg, accounts)
    return Grant(state.account, at, new_state, new_tenant)


def after_reply(state: AccountState, verdict: Verdict, now: float, cfg: PacingConfig) -> AccountState:
    """What a server reply teaches about the account that sent it."""
    problem = f"{verdict.code} {verdict.enhanced}".strip()
    if verdict.outcome is Outcome.ACCOUNT:
        return replace(state, unhealthy_until=now + cfg.unhealthy_seconds, last_problem=problem)
    if verdict.throttled:
        until = cfg.day_end(cfg.day_of(now)) if verdict.daily_quota else now + cfg.cooldown_seconds
        return replace(state, cooldown_until=max(state.cooldown_until, until), last_problem=problem)
    return state


def chunk_recipients(recipients: Iterable[str], per_message: int | None) -> list[list[str]]:
    """Envelope chunks of at most `per_message` recipients, in order."""
    items = list(recipients)
    if not per_message or len(items) <= per_message:
        return [items]
    return [items[i:i + per_message] for i in range(0, len(items), per_message)]
