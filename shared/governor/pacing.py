"""Governor arithmetic: given the shared state of the HVE accounts and a message's shape, grant a
send slot now, book one later today, or say when to come back. Pure: no I/O, no clock.

Windows (from docs/hve-facts.md, values from `Limits`):
- rolling minute per account: messages with external recipients; messages of any kind;
- daily per account: external recipients; all recipients;
- daily per tenant: all recipients, and the cost guard (daily recipient budget).

Rolling windows keep a log of slot times per account. A slot is counted from the time it was
granted, plus a safety margin, because HVE counts a message when it arrives by its own clock.
Future slots (bookings) go in the same log, so a backlog is spread over the coming minutes
instead of waking all at once. A slot may be placed anywhere it fits (`_fits`: every limit+1
consecutive slots of the log span at least the window), not only after the last one, so a slot
given back leaves a gap that the next request can use.

Invariants (tests/test_pacing.py proves them with hypothesis):
- Windows hold: in every account's log, any limit+1 consecutive slots span at least the window.
- A slot is charged once: a booking that is released (its request came back late, or was never
  delivered) leaves the log and the daily counts in the same write that takes its next slot.
- Lateness never costs capacity: a request that comes back after its booked slot, however late,
  is judged like a new request at the moment it came back, on the state without its own stale
  booking. So it waits no longer than an on-time request would have plus its lateness (and when
  nothing was decided after it, it goes at once), and it is never behind its own ghost.
- Days never go backwards: a row already on day D+1 keeps its counts when a stale decision (or
  an instance whose clock is behind) touches it with a time on day D; the slot is charged to D+1.

Tenant-wide daily counts would make one Table row every instance writes on every message. So an
account takes a block of the tenant's daily allowance at a time (one write of the tenant row per
block), and spends it from its own row. The tenant row only ever hands out what the cap allows,
so the cap holds; at most a little allowance per account goes unused at the end of a day.

Bookings are spread over seconds (at most `bookings_per_second` tenant-wide in one second): a
queue whose messages become visible every second or so keeps the Functions host polling at its
shortest interval, while a wave of bookings all due at one second lets the host's poll back off
towards `maxPollingInterval` in between, and every wave then comes back late.
"""

from __future__ import annotations

import bisect
import math
import random
from collections import Counter
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from shared.hve.limits import Limits
from shared.send.replies import Outcome, Verdict

DAY = 86400.0
MINUTE = 60.0
# Recipients an account takes from the tenant allowance at once when far from the cap.
ALLOWANCE_BLOCK = 500
# How far a booking may be moved to a less crowded second before it just takes the crowded one.
SPREAD_SEARCH_SECONDS = 120
# How long slots stay in the log after they leave the rolling window (see take_slot).
HISTORY_SECONDS = 300.0
# Bookings pick at random among accounts whose next slot is this close to the earliest one, so
# instances deciding from the same state rarely race for the same row.
NEAR_SECONDS = 5.0
# How soon after an account's window opens a backlog's fresh messages are taken to fill it.
OPENING_SLACK_SECONDS = 5.0
# The reason of a Wait given because the caller has no SMTP session free on any account free now
# (`decide`'s `busy`): it waits for one in the process, not on the queue.
NO_SESSION = "no SMTP session free in this process"


_T = TypeVar("_T")


@dataclass(frozen=True)
class PacingConfig:
    limits: Limits
    margin_seconds: float = 2.0
    day_offset_seconds: float = 0.0  # daily windows start this long after 00:00 UTC
    daily_recipient_budget: int | None = None
    cooldown_seconds: float = 60.0
    unhealthy_seconds: float = 900.0
    # Bookings go at most this far ahead; a request whose slot is further away waits unbooked.
    booking_horizon_seconds: float = 3600.0
    # At most this many bookings (tenant-wide) fall due in one second; 0 turns spreading off.
    bookings_per_second: int = 8
    # A slot booked right behind one that has come due (its message may still be on its way to
    # HVE) goes this much later, so that slot can still be taken again a little late (see
    # `_rolling_ready`). The send stage sets the margin; 0 packs bookings tight.
    lapse_room_seconds: float = 0.0

    @property
    def window(self) -> float:
        """The rolling minute as the governor counts it: HVE's minute plus the safety margin."""
        return MINUTE + self.margin_seconds

    @property
    def tenant_cap(self) -> int | None:
        caps = [c for c in (self.limits.recipients_per_day_per_tenant, self.daily_recipient_budget) if c is not None]
        return min(caps) if caps else None

    @property
    def plain(self) -> bool:
        """No per-minute window and no per-account daily limit (`ga-2026`): only account health
        decides which account sends, and no account row is written per message
        (shared/governor/scheduler.py). A tenant cap (HVE_DAILY_RECIPIENT_BUDGET) is then taken
        from the tenant row in blocks."""
        lim = self.limits
        return all(
            v is None
            for v in (
                lim.external_messages_per_minute,
                lim.messages_per_minute,
                lim.external_recipients_per_day,
                lim.recipients_per_day_per_account,
            )
        )

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
    allowance: int = 0  # tenant allowance held for `day`
    slots: tuple[float, ...] = ()  # slot times of recent and booked messages (rolling minute)
    external_slots: tuple[float, ...] = ()  # the same, for messages with external recipients
    last_granted: float = 0.0
    cooldown_until: float = 0.0
    unhealthy_until: float = 0.0
    last_problem: str = ""
    etag: str | None = field(default=None, compare=False)

    def on_day(self, day: int) -> AccountState:
        """The counts of daily window `day`. Never backwards: a row already on a later day keeps
        its counts (a stale decision is charged to the row's day, which is the safe side)."""
        if self.day >= day:
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
    claimed: int = 0  # allowance handed to accounts on `day`
    etag: str | None = field(default=None, compare=False)

    def on_day(self, day: int) -> TenantState:
        return self if self.day >= day else replace(self, day=day, claimed=0)


@dataclass(frozen=True)
class Release:
    """A slot charged to `account` at `at` for a message of `shape` that will not be used there:
    its request came back after the booked time, or the message was not delivered."""

    account: str
    at: float
    shape: Shape


@dataclass(frozen=True)
class Grant:
    account: str
    at: float  # slot time: now for a grant, later today for a booking
    account_state: AccountState
    tenant_state: TenantState | None  # None: the tenant row is not written
    # The state of the account a Release gave a slot back to, when that is another account
    # (written in the same transaction); None when there was no release or it is `account`.
    released_state: AccountState | None = None

    def is_booking(self, now: float) -> bool:
        return self.at > now


@dataclass(frozen=True)
class Wait:
    until: float
    reason: str
    # With a Release: the released account's state, to be written although nothing is granted.
    released_state: AccountState | None = None


@dataclass(frozen=True)
class Impossible:
    reason: str
    released_state: AccountState | None = None


Decision = Grant | Wait | Impossible


# --- rolling windows ----------------------------------------------------------------------------


def _ms_up(t: float) -> float:
    """A slot time as stored (milliseconds), never earlier than the real one: rounding down would
    let the next slot in the window come a fraction too soon."""
    return math.ceil(t * 1000.0 - 1e-6) / 1000.0


def _fits(log: Sequence[float], t: float, limit: int | None, window: float) -> bool:
    """Whether a slot at `t` can join the sorted `log` with every limit+1 consecutive slots still
    spanning at least `window` (so no rolling window holds more than `limit`)."""
    if limit is None:
        return True
    if limit == 0:
        return False
    p = bisect.bisect_right(log, t)
    around = list(log[max(0, p - limit) : p]) + [t] + list(log[p : p + limit])
    q = min(p, limit)  # where t stands in `around`
    for i in range(max(0, q - limit), q + 1):
        j = i + limit
        if j < len(around) and around[j] - around[i] < window - 1e-9:
            return False
    return True


def _rolling_ready(log: Sequence[float], t: float, limit: int | None, window: float, now: float, room: float) -> float:
    """Earliest time >= t a slot fits in the log: t itself (maybe in a gap a released slot left),
    else after the last `limit` slots, where a slot always fits.

    When the slot it follows has come due (at or before `now`), it goes `room` later: that slot's
    message may still be on its way to MAIL FROM (a grant now on a CPU-starved host). If it gets
    there more than half the margin late, its slot is taken again where the message really goes
    (`TableGovernor.recheck`), which fits only while nothing is packed right behind it; without
    the room it lapsed and its request waited a whole window. A slot still ahead (a booking) gets
    none: its request takes its session before the slot."""
    if limit is None or _fits(log, _ms_up(t), limit, window):
        return t
    if limit == 0:
        return math.inf
    base = log[-limit]
    return max(t, base + window + (room if base <= now else 0.0))


def _add(log: tuple[float, ...], at: float, keep_after: float) -> tuple[float, ...]:
    kept = [s for s in log if s > keep_after]
    bisect.insort(kept, _ms_up(at))
    return tuple(kept)


def _remove(log: tuple[float, ...], at: float) -> tuple[float, ...]:
    stored = _ms_up(at)
    for i, s in enumerate(log):
        if abs(s - stored) < 5e-4:
            return log[:i] + log[i + 1 :]
    return log


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


def _slot_fits(state: AccountState, shape: Shape, t: float, cfg: PacingConfig) -> bool:
    lim, at = cfg.limits, _ms_up(t)
    return _fits(state.slots, at, lim.messages_per_minute, cfg.window) and (
        not shape.external or _fits(state.external_slots, at, lim.external_messages_per_minute, cfg.window)
    )


def earliest_slot(
    state: AccountState,
    tenant: TenantState | None,
    shape: Shape,
    now: float,
    cfg: PacingConfig,
    *,
    due_by: float | None = None,
) -> tuple[float, str]:
    """Earliest time from `now` this account can take the message if nothing else arrives, and what
    binds. `due_by`: the real present when `now` is a later floor (slots up to it have come due)."""
    lim = cfg.limits
    due = now if due_by is None else due_by
    t, why = now, ""
    for candidate, reason in (
        (state.cooldown_until, f"cooling down after {state.last_problem or 'throttling'}"),
        (state.unhealthy_until, f"unhealthy ({state.last_problem or 'auth'})"),
    ):
        if candidate > t:
            t, why = candidate, reason
    for _ in range(4):
        moved = False
        for log, limit, reason in (
            (state.slots, lim.messages_per_minute, "messages per minute"),
            (
                state.external_slots,
                lim.external_messages_per_minute if shape.external else None,
                "external messages per minute",
            ),
        ):
            ready = _rolling_ready(log, t, limit, cfg.window, due, cfg.lapse_room_seconds)
            if ready > t:
                t, why, moved = ready, reason, True
        if not moved or _slot_fits(state, shape, t, cfg):
            break
    # Daily windows: judged on the day the slot falls in; a full day sends it to the next one.
    for _ in range(3):
        day = cfg.day_of(t)
        acct = state.on_day(day)
        full = _daily_full(acct, tenant.on_day(day) if tenant is not None else None, shape, cfg)
        if not full:
            return t, why
        t, why = max(t, cfg.day_end(max(day, acct.day))), full
    return t, why


def _daily_full(acct: AccountState, tenant: TenantState | None, shape: Shape, cfg: PacingConfig) -> str:
    lim = cfg.limits
    if (
        lim.external_recipients_per_day is not None
        and acct.external_today + shape.external > lim.external_recipients_per_day
    ):
        return "external recipients per day"
    if (
        lim.recipients_per_day_per_account is not None
        and acct.recipients_today + shape.recipients > lim.recipients_per_day_per_account
    ):
        return "recipients per day per account"
    cap = cfg.tenant_cap
    if cap is not None and tenant is not None:
        need = shape.recipients - acct.allowance
        if need > 0 and tenant.claimed + need > cap:
            return (
                "daily recipient budget" if cfg.daily_recipient_budget == cap else "recipients per day for the tenant"
            )
    return ""


def take_slot(
    state: AccountState,
    tenant: TenantState | None,
    shape: Shape,
    at: float,
    now: float,
    cfg: PacingConfig,
    accounts: int,
) -> tuple[AccountState, TenantState | None]:
    """The states after the message takes the slot at `at` (>= now, on the same day)."""
    day = cfg.day_of(at)
    acct = state.on_day(day)
    day = acct.day  # never backwards: a row already on a later day is charged on that day
    # Slots are kept a while past the window: an instance whose clock (or decision) lags another's
    # by up to HISTORY_SECONDS still sees every slot it must count.
    keep_after = now - cfg.window - HISTORY_SECONDS

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
    lim = cfg.limits
    new_state = replace(
        acct,
        internal_today=acct.internal_today + shape.internal,
        external_today=acct.external_today + shape.external,
        messages_today=acct.messages_today + 1,
        allowance=allowance,
        slots=_add(acct.slots, at, keep_after) if lim.messages_per_minute is not None else (),
        external_slots=(
            _add(acct.external_slots, at, keep_after)
            if shape.external and lim.external_messages_per_minute is not None
            else tuple(s for s in acct.external_slots if s > keep_after)
        ),
        last_granted=max(acct.last_granted, at),
    )
    return new_state, new_tenant


def release_slot(state: AccountState, release: Release, cfg: PacingConfig) -> AccountState:
    """Give a charged slot back: its place in the rolling logs and, if the row is still on the day
    it was charged to, its daily counts and recipients (as allowance the account keeps)."""
    shape = release.shape
    state = replace(
        state,
        slots=_remove(state.slots, release.at),
        external_slots=_remove(state.external_slots, release.at) if shape.external else state.external_slots,
    )
    if state.day != cfg.day_of(release.at) or state.messages_today == 0:
        return state
    return replace(
        state,
        internal_today=max(0, state.internal_today - shape.internal),
        external_today=max(0, state.external_today - shape.external),
        messages_today=state.messages_today - 1,
        allowance=state.allowance + shape.recipients if cfg.tenant_cap is not None else state.allowance,
    )


# --- the decision -------------------------------------------------------------------------------


def decide(
    states: Sequence[AccountState],
    tenant: TenantState | None,
    shape: Shape,
    now: float,
    cfg: PacingConfig,
    rng: random.Random | None = None,
    *,
    allow_booking: bool = True,
    release: Release | None = None,
    book_not_before: float = 0.0,
    backlog_until: float | None = None,
    busy: Collection[str] = frozenset(),
) -> Decision:
    """Grant now, book a slot later today, wait until a stated time, or refuse as impossible.

    With `release`, the request's own earlier slot is given back first (it came back late, or was
    not delivered), so the decision and the release are one write.

    `book_not_before`: a booking goes no earlier than this (the moment the queue's visible backlog
    is expected to be drained, see `BacklogEstimator` in shared/governor/preview/queue_timing.py): a booked message becomes visible behind
    that backlog and would come back late, leaving its slot unused, while the fresh messages of
    the backlog could have taken it at once. A grant now is not affected.

    `busy`: accounts the caller has no SMTP session free for at the moment. A slot now is granted
    only on an account not busy; when every account free now is busy, the answer is a
    `Wait(until=now, reason=NO_SESSION)` (nothing taken): the caller waits for a session of its
    own and asks again. (A grant now on a busy account would wait for a session and could get too
    old to be sent on.)

    Picks the account with the earliest slot; among accounts free now, the preferred one, else
    one at random (so instances reading the same state spread out)."""
    rng = rng or random.Random()
    released: AccountState | None = None
    if release is not None:
        states = [release_slot(s, release, cfg) if s.account == release.account else s for s in states]
        released = next((s for s in states if s.account == release.account), None)
    decision = _decide(states, tenant, shape, now, cfg, rng, allow_booking, book_not_before, backlog_until, busy)
    if released is None:
        return decision
    if isinstance(decision, Grant):
        return decision if decision.account == released.account else replace(decision, released_state=released)
    return replace(decision, released_state=released)


def _decide(
    states: Sequence[AccountState],
    tenant: TenantState | None,
    shape: Shape,
    now: float,
    cfg: PacingConfig,
    rng: random.Random,
    allow_booking: bool,
    book_not_before: float = 0.0,
    backlog_until: float | None = None,
    busy: Collection[str] = frozenset(),
) -> Decision:
    impossible = impossible_reason(shape, cfg)
    if impossible:
        return Impossible(impossible)
    if not states:
        return Impossible("no HVE accounts configured")
    slots = [(earliest_slot(s, tenant, shape, now, cfg), s) for s in states]
    ready = [s for (t, _), s in slots if t <= now]
    if ready:
        ready = [s for s in ready if s.account not in busy]
        if not ready:
            return Wait(until=now, reason=NO_SESSION)
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
    if book_not_before > best_t:
        # Slots from the end of the backlog on; the capacity before it is left to the backlog.
        floor = min(book_not_before, today_end)
        until = floor if backlog_until is None else min(backlog_until, floor)
        slots = [
            (earliest_slot(s, tenant, shape, _after_backlog(t, floor, until, cfg), cfg, due_by=now), s)
            for (t, _), s in slots
        ]
        (best_t, best_why), _ = min(slots, key=lambda item: item[0][0])
        if best_t >= today_end:
            return Wait(until=best_t, reason=best_why)
    if best_t - now > cfg.booking_horizon_seconds:
        # Too far ahead to hold a place in the log: come back when the slot is within the horizon.
        return Wait(until=max(now + 1.0, best_t - cfg.booking_horizon_seconds / 2), reason=best_why)
    # Book: spread over accounts whose slot is within NEAR_SECONDS of the best one.
    near = [(t, s) for (t, _), s in slots if t <= best_t + NEAR_SECONDS]
    pref = [(t, s) for t, s in near if s.account == shape.preferred_account]
    t, chosen = pref[0] if pref else rng.choice(near)
    # The earliest slot itself, not rounded to a whole number of seconds from now: the queue's
    # visibility delay is whole seconds, so the message wakes up to a second early and waits the
    # rest in the process. (Rounding up put each window's bookings up to a second after the last
    # window's, and an account's cadence drifted later by half a second a window on average.)
    at = _spread(chosen, shape, t, states, cfg)
    if at >= today_end:
        return Wait(until=best_t, reason=best_why)
    return _grant(chosen, tenant, shape, at, now, cfg, len(states))


def _after_backlog(ready: float, floor: float, until: float, cfg: PacingConfig) -> float:
    """Where an account's bookings may start when the queue's backlog is expected to last until
    `until` (the floor errs long). The backlog's own fresh messages take the account at once
    whenever its window opens (at `ready`, then every window), so a booking goes after the last
    opening before `until`: one put at the floor itself would close the window that opening needs,
    and the account would idle from there to the floor. An opening between `until` and the floor
    is not skipped (the backlog is probably gone by then: skipping it would leave a whole window
    empty); the booking then only waits for the floor. (Fresh messages take an opening within a
    few seconds of it, hence the slack.)"""
    if ready >= floor:
        return ready
    skipped = math.ceil((until - ready) / cfg.window - 1e-9) if until > ready else 0
    return max(floor, ready + skipped * cfg.window + (OPENING_SLACK_SECONDS if skipped else 0.0))


def _spread(state: AccountState, shape: Shape, at: float, states: Sequence[AccountState], cfg: PacingConfig) -> float:
    """The first of at, at+1, at+2 ... whose second has room for another booking tenant-wide, where
    the slot still fits this account's windows (a later slot at the end of the log always does).

    A wave of bookings all due at one second would come back as one crowd that the host takes
    in batches of 16, the last ones late; spread at `bookings_per_second`, each second's share is
    picked up at once."""
    per_second = cfg.bookings_per_second
    if per_second <= 0:
        return at
    # Never below the accounts' combined rate, or the spread itself would slow a backlog down.
    limit = (cfg.limits.external_messages_per_minute if shape.external else None) or cfg.limits.messages_per_minute
    if limit:
        per_second = max(per_second, math.ceil(limit * len(states) / cfg.window))

    due: Counter[int] = Counter()
    for s in states:
        log = s.external_slots or s.slots
        for x in log[bisect.bisect_left(log, at - 1) : bisect.bisect_left(log, at + SPREAD_SEARCH_SECONDS + 1)]:
            due[int(x)] += 1
    for k in range(SPREAD_SEARCH_SECONDS):
        t = at + k
        if due[int(t)] < per_second and _slot_fits(state, shape, t, cfg):
            return t
    return at


def _grant(
    state: AccountState,
    tenant: TenantState | None,
    shape: Shape,
    at: float,
    now: float,
    cfg: PacingConfig,
    accounts: int,
) -> Grant:
    new_state, new_tenant = take_slot(state, tenant, shape, at, now, cfg, accounts)
    return Grant(state.account, at, new_state, new_tenant)


def after_reply(state: AccountState, verdict: Verdict, now: float, cfg: PacingConfig) -> AccountState:
    """What a server reply teaches about the account that sent it. (Local failures, code 0, never
    get here: `TableGovernor.report` keeps them out of the shared state.)"""
    problem = f"{verdict.code} {verdict.enhanced}".strip()
    if verdict.outcome is Outcome.ACCOUNT:
        return replace(state, unhealthy_until=now + cfg.unhealthy_seconds, last_problem=problem)
    if verdict.throttled:
        until = cfg.day_end(cfg.day_of(now)) if verdict.daily_quota else now + cfg.cooldown_seconds
        return replace(state, cooldown_until=max(state.cooldown_until, until), last_problem=problem)
    return state


def chunk_recipients(recipients: Iterable[_T], per_message: int | None) -> list[list[_T]]:
    """Envelope chunks of at most `per_message` recipients, in order."""
    items = list(recipients)
    if not per_message or len(items) <= per_message:
        return [items]
    return [items[i : i + per_message] for i in range(0, len(items), per_message)]
