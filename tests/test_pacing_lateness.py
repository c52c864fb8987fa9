"""The governor under real queue timing (pure, property-based): requests come back seconds to
minutes after their booked slot, some sends fail and give their slot back, days roll over at
non-midnight reset times. Checked against an oracle written here that re-counts the raw send log
and uses nothing from shared/governor/pacing.py but its public decisions:

- the windows hold as HVE counts them (actual send moments), and daily caps hold per day;
- a slot is never counted twice and never leaks: at the end each account's daily counts equal
  the oracle's count of what was delivered that day;
- lateness never costs capacity: a late request whose booking nobody decided after is sent the
  moment it comes back; and every request is eventually sent.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import defaultdict
from dataclasses import dataclass

from hypothesis import given, settings, strategies as st

from shared.hve.limits import Limits
from shared.governor.pacing import AccountState, Grant, Impossible, PacingConfig, Release, Shape, TenantState, Wait, decide, release_slot

ACCOUNTS = ["a@contoso.com", "b@contoso.com", "c@contoso.com"]
DAY_SECONDS = 86400
# A reset at 07:00 UTC of 2027-01-15, 10 s before a daily window ends... and others.
BASE_DAY = 1_799_884_800  # 2027-01-15 00:00:00 UTC


def oracle_day(t: float, offset: float) -> int:
    """The daily window a moment falls in, written out here (not pacing's day_of)."""
    return int((t - offset) // DAY_SECONDS)


@dataclass
class Request:
    n: int
    shape: Shape
    booked: tuple[str, float] | None = None
    sent_at: float | None = None


@st.composite
def worlds(draw):
    per_minute = draw(st.integers(1, 5))
    limits = Limits(
        external_allowed=True,
        recipients_per_message=5,
        message_bytes=None,
        external_messages_per_minute=per_minute,
        external_recipients_per_day=draw(st.one_of(st.none(), st.integers(15, 60))),
        recipients_per_day_per_account=draw(st.one_of(st.none(), st.integers(20, 80))),
        messages_per_minute=draw(st.one_of(st.none(), st.integers(per_minute, 8))),
        recipients_per_day_per_tenant=draw(st.one_of(st.none(), st.integers(40, 150))),
    )
    offset = float(draw(st.sampled_from([0, 7 * 3600, 23 * 3600 + 1800, 12 * 3600 + 17])))
    margin = draw(st.sampled_from([1.0, 2.0, 4.0]))
    cfg = PacingConfig(limits=limits, margin_seconds=margin, day_offset_seconds=offset,
                       daily_recipient_budget=draw(st.one_of(st.none(), st.integers(30, 120))),
                       bookings_per_second=draw(st.sampled_from([0, 1, 3])),
                       booking_horizon_seconds=draw(st.sampled_from([300.0, 3600.0])))
    # Start shortly before a daily window ends, so most runs cross into the next day.
    start = BASE_DAY + offset + DAY_SECONDS - draw(st.floats(0, 600))
    arrivals = draw(st.lists(st.tuples(
        st.floats(0, 30),                        # seconds since the previous arrival
        st.integers(0, 2), st.integers(1, 2),    # internal, external recipients (fit every limit)
    ), min_size=1, max_size=40))
    # How late each return from the queue is: on time, within the tolerance, seconds, minutes.
    lateness = draw(st.lists(st.sampled_from([0.0, 0.3, 1.5, 7.0, 45.0, 200.0]), min_size=8, max_size=8))
    failures = draw(st.lists(st.booleans(), min_size=8, max_size=8))  # some sends fail (4xx): refunded
    return cfg, start, arrivals, lateness, failures, draw(st.integers(0, 2 ** 32))


@settings(max_examples=150)
@given(worlds())
def test_late_requests_never_cost_capacity_and_the_windows_hold(world):
    cfg, start, arrivals, lateness, failures, seed = world
    rng = random.Random(seed)
    states = {a: AccountState(a) for a in ACCOUNTS}
    tenant = TenantState() if cfg.tenant_cap is not None else None
    events: list[tuple[float, int, int]] = []  # (time, tiebreak, request number)
    requests: list[Request] = []
    t = start
    for gap, internal, external in arrivals:
        t += gap
        requests.append(Request(len(requests), Shape(internal, external)))
        heapq.heappush(events, (t, len(requests), len(requests) - 1))
    delivered: list[tuple[str, float, Shape]] = []
    decisions = grants = 0
    booking_seen_at: dict[int, int] = {}   # request -> decision counter when it was booked
    tolerance = cfg.margin_seconds / 2
    tick = len(requests)
    failure_i = late_i = 0

    def schedule(at: float, n: int) -> None:
        nonlocal tick
        tick += 1
        heapq.heappush(events, (at, tick, n))

    steps = 0
    while events:
        steps += 1
        assert steps < 20_000, "requests did not settle: a slot leaked or a request starves"
        now, _, n = heapq.heappop(events)
        req = requests[n]
        release = None
        if req.booked is not None:
            account, booked_at = req.booked
            assert now >= booked_at
            req.booked = None
            if now <= booked_at + tolerance:
                slot_account, slot_at = account, booked_at   # honoured: the log keeps its slot
            else:
                release = Release(account, booked_at, req.shape)
                nobody_since = booking_seen_at.pop(n) == decisions
                same_day = oracle_day(now, cfg.day_offset_seconds) == oracle_day(booked_at, cfg.day_offset_seconds)
                decision = decide(list(states.values()), tenant, req.shape, now, cfg, rng, release=release)
                decisions += 1
                if nobody_since and same_day:
                    # Lateness costs nothing: with nothing decided since its booking, it goes now.
                    assert isinstance(decision, Grant) and decision.at == now, (decision, now, booked_at)
                slot = _apply(decision, states, now)
                if slot is None:
                    tenant = tenant if not isinstance(decision, Grant) else (decision.tenant_state or tenant)
                    _requeue(decision, req, n, now, schedule, booking_seen_at, decisions, lateness, late_i)
                    late_i += 1
                    continue
                tenant = decision.tenant_state or tenant
                slot_account, slot_at = slot
        else:
            decision = decide(list(states.values()), tenant, req.shape, now, cfg, rng)
            decisions += 1
            assert not isinstance(decision, Impossible), decision  # every generated shape fits the limits
            slot = _apply(decision, states, now)
            if isinstance(decision, Grant):
                tenant = decision.tenant_state or tenant
            if slot is None:
                _requeue(decision, req, n, now, schedule, booking_seen_at, decisions, lateness, late_i)
                late_i += 1
                continue
            slot_account, slot_at = slot
        grants += 1
        if failures[failure_i % len(failures)] and failure_i < 3 * len(requests):
            # A 4xx: nothing delivered, the charge goes back, the request tries again a bit later.
            failure_i += 1
            states[slot_account] = release_slot(states[slot_account], Release(slot_account, slot_at, req.shape), cfg)
            schedule(now + 5.0, n)
            continue
        failure_i += 1
        req.sent_at = now
        delivered.append((slot_account, now, req.shape))

    assert all(r.sent_at is not None for r in requests)
    check_as_hve_counts(cfg, delivered)
    # Nothing counted twice, nothing leaked: each row's counts for its current day are what the
    # oracle counts as delivered on that day.
    for account, state in states.items():
        day_sends = [s for a, t, s in delivered if a == account and oracle_day(t, cfg.day_offset_seconds) == state.day]
        assert state.external_today == sum(s.external for s in day_sends), account
        assert state.internal_today == sum(s.internal for s in day_sends), account
        assert state.messages_today == len(day_sends), account
    assert grants >= len(requests)


def _apply(decision, states, now):
    if getattr(decision, "released_state", None) is not None:
        states[decision.released_state.account] = decision.released_state
    if isinstance(decision, Grant):
        states[decision.account] = decision.account_state
        if decision.at <= now:
            return decision.account, decision.at
    return None


def _requeue(decision, req, n, now, schedule, booking_seen_at, decisions, lateness, late_i):
    late = lateness[late_i % len(lateness)]
    if isinstance(decision, Grant):   # a booking: the queue brings it back, maybe late
        req.booked = (decision.account, decision.at)
        booking_seen_at[n] = decisions
        schedule(decision.at + late, n)
    else:
        assert isinstance(decision, Wait) and decision.until > now
        schedule(math.ceil(decision.until) + late, n)


def check_as_hve_counts(cfg: PacingConfig, delivered: list[tuple[str, float, Shape]]) -> None:
    """HVE's view, re-counted from the raw send log: no rolling minute of an account holds more
    than its limit (with a lateness tolerance of half the margin, at least 60 s + margin/2 between
    a send and the limit-th one after it), and no daily window holds more than its caps."""
    lim = cfg.limits
    per_account: dict[str, list[tuple[float, Shape]]] = defaultdict(list)
    for account, t, shape in delivered:
        per_account[account].append((t, shape))
    tenant_days: dict[int, int] = defaultdict(int)
    for account, sends in per_account.items():
        sends.sort(key=lambda x: x[0])
        for times, limit in (([t for t, _ in sends], lim.messages_per_minute),
                             ([t for t, s in sends if s.external], lim.external_messages_per_minute)):
            if limit is None:
                continue
            for i in range(limit, len(times)):
                assert times[i] - times[i - limit] >= 60 + cfg.margin_seconds / 2 - 1e-3, (account, times)
        days: dict[int, list[Shape]] = defaultdict(list)
        for t, s in sends:
            days[oracle_day(t, cfg.day_offset_seconds)].append(s)
        for day, shapes in days.items():
            if lim.external_recipients_per_day is not None:
                assert sum(s.external for s in shapes) <= lim.external_recipients_per_day
            if lim.recipients_per_day_per_account is not None:
                assert sum(s.internal + s.external for s in shapes) <= lim.recipients_per_day_per_account
            tenant_days[day] += sum(s.internal + s.external for s in shapes)
    caps = [c for c in (lim.recipients_per_day_per_tenant, cfg.daily_recipient_budget) if c is not None]
    if caps:
        assert max(tenant_days.values()) <= min(caps), tenant_days
