"""Daily windows across day changes and non-midnight resets, checked by an oracle written here.

Only the public surface of shared/governor/pacing.py is used (decide, take_slot, earliest_slot and the
state types). Which daily window a time falls in, and when the next one starts, are computed in
this file from the reset time alone, never with the code under test; the recipients granted in
each window are re-counted from the raw log of granted slots.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import replace
from datetime import datetime, timezone

import pytest

from shared.hve.limits import PROFILES
from shared.governor.pacing import AccountState, Grant, PacingConfig, Shape, TenantState, decide, earliest_slot, take_slot

DAY_SECONDS = 86_400
ACCOUNTS = ("news@contoso.com", "alerts@contoso.com", "billing@contoso.com")
MONDAY = datetime(2026, 3, 9, tzinfo=timezone.utc).timestamp()  # 00:00 UTC


def window_of(t: float, reset_seconds: float) -> int:
    """The oracle: daily windows start every day at `reset_seconds` after 00:00 UTC."""
    return math.floor((t - reset_seconds) / DAY_SECONDS)


def next_reset_after(t: float, reset_seconds: float) -> float:
    midnight = math.floor(t / DAY_SECONDS) * DAY_SECONDS
    reset = midnight + reset_seconds
    while reset <= t:
        reset += DAY_SECONDS
    while reset - DAY_SECONDS > t:
        reset -= DAY_SECONDS
    return reset


def config(budget: int, reset_seconds: float) -> PacingConfig:
    # ga-2026: internal recipients only, no per-minute limits; the daily budget is the binding cap.
    return PacingConfig(limits=PROFILES["ga-2026"], margin_seconds=2.0, day_offset_seconds=reset_seconds,
                        daily_recipient_budget=budget)


def saturate(cfg: PacingConfig, start: float, end: float, recipients: int, seed: int):
    """Offer messages back to back from `start` to `end` (a busy queue), applying each grant the
    way the governor writes it. Returns the raw log (slot time, account, recipients) and the waits."""
    rng = random.Random(seed)
    states = {a: AccountState(a) for a in ACCOUNTS}
    tenant = TenantState()
    granted: list[tuple[float, str, int]] = []
    waits: list[tuple[float, float, str]] = []
    now = start
    while now < end:
        decision = decide(list(states.values()), tenant, Shape(recipients, 0), now, cfg, rng)
        if isinstance(decision, Grant):
            granted.append((decision.at, decision.account, recipients))
            states[decision.account] = decision.account_state
            if decision.tenant_state is not None:
                tenant = decision.tenant_state
            now = max(now, decision.at) + rng.uniform(1, 120)
        else:
            assert hasattr(decision, "until"), decision  # never impossible: the shape always fits a day
            waits.append((now, decision.until, decision.reason))
            assert decision.until > now
            now = decision.until
    return granted, waits


def per_window(granted, reset_seconds):
    totals: dict[int, int] = defaultdict(int)
    for at, _, recipients in granted:
        totals[window_of(at, reset_seconds)] += recipients
    return totals


@pytest.mark.parametrize("reset_hhmm", ["00:00", "06:00", "17:30", "23:45"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_daily_budget_holds_in_every_window_across_day_changes(reset_hhmm, seed):
    hours, minutes = map(int, reset_hhmm.split(":"))
    reset = hours * 3600 + minutes * 60
    budget, recipients = 1200, 7
    cfg = config(budget, reset)
    # Four days of back-to-back traffic, starting at an odd hour so every run crosses resets mid-stream.
    granted, waits = saturate(cfg, MONDAY + 5 * 3600 + 17, MONDAY + 4 * DAY_SECONDS, recipients, seed)
    totals = per_window(granted, reset)
    assert totals and max(totals.values()) <= budget, dict(totals)
    # The budget is used, not stranded: each full window in the middle sends nearly all of it
    # (what is left is less than one message per account).
    middle = sorted(totals)[1:-1]
    assert middle, dict(totals)
    for window in middle:
        assert totals[window] > budget - recipients * len(ACCOUNTS), (window, dict(totals))
    # Most decisions are grants, and each wait for the budget ends exactly at the next reset.
    assert len(granted) > 10 * len(waits)
    budget_waits = [(now, until) for now, until, why in waits if "budget" in why]
    assert budget_waits
    for now, until in budget_waits:
        assert until == next_reset_after(now, reset), (now, until)


def test_unused_allowance_of_yesterday_is_not_spent_today():
    """Allowance an account took from the tenant row yesterday and did not use must not count
    today: today's tenant row starts from zero, so carrying it over would pass the budget."""
    reset = 6 * 3600
    budget, recipients = 1000, 10
    cfg = config(budget, reset)
    rng = random.Random(5)
    states = {a: AccountState(a) for a in ACCOUNTS}
    tenant = TenantState()
    granted = []
    # Yesterday (the window before 06:00 on Tuesday): one message per account, so each holds
    # a block of allowance it never uses.
    t = MONDAY + DAY_SECONDS + 3600
    for account in ACCOUNTS:
        decision = decide(list(states.values()), tenant, Shape(recipients, 0, account), t, cfg, rng)
        assert isinstance(decision, Grant) and decision.account == account
        states[account], tenant = decision.account_state, decision.tenant_state or tenant
        granted.append((decision.at, account, recipients))
        t += 60
    # Today (from 06:00): as much as will be granted before the next reset.
    t = MONDAY + DAY_SECONDS + reset + 60
    end = MONDAY + 2 * DAY_SECONDS + reset
    while t < end:
        decision = decide(list(states.values()), tenant, Shape(recipients, 0), t, cfg, rng)
        if not isinstance(decision, Grant):
            assert decision.until >= end
            break
        states[decision.account] = decision.account_state
        tenant = decision.tenant_state or tenant
        granted.append((decision.at, decision.account, recipients))
        t = max(t, decision.at) + 30
    totals = per_window(granted, reset)
    today = window_of(MONDAY + DAY_SECONDS + reset + 60, reset)
    assert totals[today - 1] == recipients * len(ACCOUNTS)
    assert budget - recipients * len(ACCOUNTS) < totals[today] <= budget


@pytest.mark.parametrize("reset_hhmm,now_hhmm,expected_hhmm", [
    ("06:00", "05:30", "06:00"),       # just before today's reset: the window ends at 06:00 today
    ("06:00", "07:00", "06:00+1"),     # just after it: the window ends at 06:00 tomorrow
    ("18:00", "19:00", "18:00+1"),
    ("18:00", "17:00", "18:00"),
    ("00:00", "23:00", "00:00+1"),
])
def test_a_full_budget_waits_until_the_reset_time_in_utc(reset_hhmm, now_hhmm, expected_hhmm):
    def at(hhmm: str) -> float:
        clock, _, plus = hhmm.partition("+")
        hours, minutes = map(int, clock.split(":"))
        return MONDAY + DAY_SECONDS + int(plus or 0) * DAY_SECONDS + hours * 3600 + minutes * 60

    reset = at(reset_hhmm) - (MONDAY + DAY_SECONDS)
    now = at(now_hhmm)
    cfg = config(10, reset)
    state, tenant = AccountState(ACCOUNTS[0]), TenantState()
    state, tenant_after = take_slot(state, tenant, Shape(10, 0), now, now, cfg, 1)
    tenant = tenant_after or tenant
    slot, why = earliest_slot(state, tenant, Shape(1, 0), now + 1, cfg)
    assert slot == at(expected_hhmm) and "budget" in why
    decision = decide([state], tenant, Shape(1, 0), now + 1, cfg, random.Random(1))
    assert not isinstance(decision, Grant) and decision.until == at(expected_hhmm)
    # At the reset the budget is whole again.
    later = decide([state], tenant, Shape(10, 0), at(expected_hhmm), cfg, random.Random(1))
    assert isinstance(later, Grant) and later.at == at(expected_hhmm)


def test_an_account_limit_is_judged_on_the_window_the_slot_falls_in():
    """A per-account daily limit spent yesterday (by the oracle's window) is free again after the
    reset, and still spent one second before it."""
    reset = 6 * 3600
    limits = replace(PROFILES["ga-2026"], recipients_per_day_per_account=20)
    cfg = PacingConfig(limits=limits, margin_seconds=2.0, day_offset_seconds=reset)
    state = AccountState(ACCOUNTS[0])
    before_reset = MONDAY + DAY_SECONDS + reset - 3600       # 05:00 Tuesday
    state, _ = take_slot(state, None, Shape(20, 0), before_reset, before_reset, cfg, 1)
    still_full = decide([state], None, Shape(1, 0), before_reset + 3599, cfg, random.Random(1))
    assert not isinstance(still_full, Grant) and still_full.until == before_reset + 3600
    fresh = decide([state], None, Shape(20, 0), before_reset + 3600, cfg, random.Random(1))
    assert isinstance(fresh, Grant)
    assert window_of(fresh.at, reset) == window_of(before_reset, reset) + 1
