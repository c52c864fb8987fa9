"""Pacing arithmetic at its exact edges (pure, example-based, no hypothesis): the boundaries that
the property tests in test_pacing*.py rarely land on. Every expected value is worked out by hand
here from the documented rules (window = 60 s + margin; a slot fits when every limit+1
consecutive slots span at least the window; daily windows start `day_offset_seconds` after
00:00 UTC), never computed with the code under test.

Times are small (day 0 of the epoch) so that millisecond rounding is exact."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from shared.hve.limits import Limits
from shared.governor.pacing import (
    DAY,
    HISTORY_SECONDS,
    NEAR_SECONDS,
    AccountState,
    Grant,
    Impossible,
    PacingConfig,
    Release,
    Shape,
    TenantState,
    Wait,
    _add,
    _fits,
    _ms_up,
    _remove,
    _rolling_ready,
    _spread,
    after_reply,
    chunk_recipients,
    decide,
    earliest_slot,
    impossible_reason,
    release_slot,
    take_slot,
)
from shared.send.replies import Outcome, Verdict

A, B, C = "a@contoso.com", "b@contoso.com", "c@contoso.com"
NOW = 1000.0          # day 0, far from both ends of the day
END = DAY             # end of day 0 with no offset
W = 62.0              # the default window: 60 s + 2 s margin
NEVER_DUE = -math.inf  # a decision before every slot: none has come due


def limits(**kw: object) -> Limits:
    """No limit at all, except those given."""
    base = Limits(external_allowed=True, recipients_per_message=None, message_bytes=None,
                  external_messages_per_minute=None, external_recipients_per_day=None,
                  recipients_per_day_per_account=None, messages_per_minute=None,
                  recipients_per_day_per_tenant=None)
    return replace(base, **kw)


def cfg(lim: Limits | None = None, **kw: object) -> PacingConfig:
    return PacingConfig(limits=lim or limits(), **kw)


# --- configuration and state helpers ---------------------------------------------------------

def test_defaults_are_a_62_second_window_a_minute_cooldown_and_a_quarter_hour_rest():
    c = cfg()
    assert c.window == 62.0
    assert (c.cooldown_seconds, c.unhealthy_seconds) == (60.0, 900.0)
    assert (c.booking_horizon_seconds, c.bookings_per_second) == (3600.0, 8)
    assert c.day_offset_seconds == 0.0 and c.daily_recipient_budget is None
    assert cfg(margin_seconds=0.5).window == 60.5


def test_the_tenant_cap_is_the_lower_of_the_hve_cap_and_the_budget():
    assert cfg().tenant_cap is None
    assert cfg(limits(recipients_per_day_per_tenant=100)).tenant_cap == 100
    assert cfg(daily_recipient_budget=40).tenant_cap == 40
    assert cfg(limits(recipients_per_day_per_tenant=100), daily_recipient_budget=400).tenant_cap == 100
    assert cfg(limits(recipients_per_day_per_tenant=100), daily_recipient_budget=40).tenant_cap == 40
    assert cfg(daily_recipient_budget=0).tenant_cap == 0


def test_a_daily_window_starts_exactly_at_the_offset():
    c = cfg(day_offset_seconds=3600.0)
    assert c.day_of(3600.0) == 0 and c.day_of(3599.999) == -1
    assert c.day_of(3600.0 + DAY) == 1 and c.day_of(3600.0 + DAY - 0.001) == 0
    assert c.day_end(0) == DAY + 3600.0 and c.day_end(-1) == 3600.0
    assert DAY == 86400.0


def test_a_row_moves_forward_to_a_new_day_with_zero_counts_but_never_backwards():
    row = AccountState(A, day=5, internal_today=3, external_today=2, messages_today=4, allowance=7, slots=(1.0,))
    assert row.on_day(5) is row
    assert row.on_day(4) is row  # a stale decision never resets a later day's counts
    moved = row.on_day(6)
    assert (moved.day, moved.internal_today, moved.external_today, moved.messages_today, moved.allowance) == (6, 0, 0, 0, 0)
    assert moved.slots == (1.0,)  # the rolling log is not a daily count
    assert row.recipients_today == 5
    tenant = TenantState(day=5, claimed=30)
    assert tenant.on_day(5) is tenant and tenant.on_day(4) is tenant
    assert (tenant.on_day(6).day, tenant.on_day(6).claimed) == (6, 0)
    assert AccountState(A).day == -1 and TenantState().day == -1


def test_an_account_is_available_when_both_its_cooldown_and_rest_are_over():
    assert AccountState(A, cooldown_until=10.0, unhealthy_until=20.0).available_at() == 20.0
    assert AccountState(A, cooldown_until=30.0, unhealthy_until=20.0).available_at() == 30.0


def test_a_grant_is_a_booking_only_when_its_slot_is_after_now():
    g = Grant(A, NOW, AccountState(A), None)
    assert not g.is_booking(NOW) and g.is_booking(NOW - 0.001)
    assert g.released_state is None
    assert Wait(NOW, "x").released_state is None and Impossible("x").released_state is None


# --- rolling windows -----------------------------------------------------------------------------

def test_slot_times_are_stored_in_milliseconds_rounded_up_never_down():
    assert _ms_up(1.0) == 1.0
    assert _ms_up(1.001) == 1.001
    assert _ms_up(1.0001) == 1.001
    assert _ms_up(1.0009) == 1.001
    assert _ms_up(2.5) == 2.5


def test_a_slot_fits_exactly_one_window_after_the_previous_one_and_not_a_millisecond_sooner():
    assert _fits([0.0], 62.0, 1, W)
    assert not _fits([0.0], 61.999, 1, W)
    assert _fits([62.0], 0.0, 1, W)          # before the log: the window ahead counts too
    assert not _fits([62.0], 0.001, 1, W)
    assert _fits([0.0], 0.0 + 61.9999999999, 1, W)  # float noise below a nanosecond is forgiven
    assert _fits([0.0], W - 1e-9, 1, W)              # ...up to exactly a nanosecond


def test_a_slot_fits_in_a_gap_only_if_it_is_a_window_from_both_neighbours():
    assert _fits([0.0, 124.0], 62.0, 1, W)
    assert not _fits([0.0, 124.0], 62.001, 1, W)
    assert not _fits([0.0, 124.0], 61.999, 1, W)
    assert not _fits([0.0, 123.0], 62.0, 1, W)


def test_with_a_limit_of_two_every_three_consecutive_slots_must_span_the_window():
    assert _fits([0.0, 30.0], 62.0, 2, W)          # (0, 30, 62) spans 62: the last triple binds
    assert not _fits([0.0, 30.0], 61.9, 2, W)
    assert _fits([100.0, 130.0], 68.0, 2, W)       # (68, 100, 130): the first triple binds
    assert not _fits([100.0, 130.0], 68.1, 2, W)
    assert _fits([0.0, 100.0], 50.0, 2, W)         # (0, 50, 100): the middle
    assert not _fits([0.0, 10.0, 100.0, 110.0], 50.0, 2, W)   # (0, 10, 50) spans only 50
    assert not _fits([0.0, 90.0, 100.0, 200.0], 50.0, 2, W)   # (50, 90, 100) spans only 50
    assert _fits([0.0, 10.0, 200.0, 210.0], 100.0, 2, W)
    assert _fits([0.0, 1.0, 2.0], 62.0, 3, W) and not _fits([0.0, 1.0, 2.0], 61.9, 3, W)  # (0, 1, 2, t)
    assert _fits([10.0], 20.0, 2, W)               # fewer slots than the limit: always fits


def test_no_limit_always_fits_and_a_zero_limit_never_does():
    assert _fits([0.0, 0.0, 0.0], 0.0, None, W)
    assert not _fits([], 0.0, 0, W)


def test_the_earliest_rolling_slot_is_now_a_gap_or_one_window_after_the_limit_th_last_slot():
    # Behind slots still ahead of the decision (none has come due): no room, whatever it is.
    assert _rolling_ready([0.0, 10.0], 20.0, None, W, NEVER_DUE, 2.0) == 20.0
    assert _rolling_ready([0.0, 10.0], 20.0, 3, W, NEVER_DUE, 2.0) == 20.0
    assert _rolling_ready([0.0, 10.0], 20.0, 2, W, NEVER_DUE, 2.0) == 62.0
    assert _rolling_ready([0.0, 10.0], 20.0, 1, W, NEVER_DUE, 2.0) == 72.0
    assert _rolling_ready([0.0, 10.0], 80.0, 1, W, NEVER_DUE, 2.0) == 80.0
    assert _rolling_ready([0.0, 124.0], 62.0, 1, W, NEVER_DUE, 2.0) == 62.0     # the gap a released slot left
    assert _rolling_ready([], 20.0, 0, W, NEVER_DUE, 2.0) == math.inf
    # The candidate is judged as it will be stored (ms rounded up): 61.9991 is stored as 62.0, which fits.
    assert _rolling_ready([0.0], 61.9991, 1, W, NEVER_DUE, 2.0) == 61.9991


def test_behind_a_slot_come_due_the_earliest_rolling_slot_is_the_room_later():
    # The slot it follows (0.0) has come due when it is at or before the decision.
    assert _rolling_ready([0.0, 10.0], 20.0, 2, W, 20.0, 2.0) == 64.0
    assert _rolling_ready([0.0, 10.0], 20.0, 2, W, 0.0, 2.0) == 64.0
    assert _rolling_ready([0.0, 10.0], 20.0, 2, W, -0.001, 2.0) == 62.0
    assert _rolling_ready([0.0, 10.0], 70.0, 2, W, 20.0, 2.0) == 70.0   # past the room already


def test_adding_a_slot_prunes_slots_at_or_before_the_keep_time_and_keeps_the_log_sorted():
    assert _add((1.0, 5.0), 3.0, keep_after=1.0) == (3.0, 5.0)
    assert _add((1.0, 5.0), 3.0, keep_after=0.999) == (1.0, 3.0, 5.0)
    assert _add((), 3.0001, keep_after=0.0) == (3.001,)


def test_removing_a_slot_removes_one_copy_within_half_a_millisecond_and_ignores_unknown_ones():
    assert _remove((1.0, 2.0, 2.0, 3.0), 2.0) == (1.0, 2.0, 3.0)
    assert _remove((1.0, 2.0), 1.5) == (1.0, 2.0)
    assert _remove((1.001,), 1.0004) == ()        # stored as 1.001: the same slot
    assert _remove((1.0,), 1.0004) == (1.0,)      # stored as 1.001: a millisecond away
    assert _remove((), 1.0) == ()
    assert _remove((0.9996, 2.0), 1.0) == (2.0,)  # 0.4 ms away: the same slot
    assert _remove((1.0004, 2.0), 1.0) == (2.0,)


# --- impossible shapes ---------------------------------------------------------------------------

def test_impossible_reasons_name_the_number_the_limit_and_which_limit():
    assert impossible_reason(Shape(0, 1), cfg(limits(external_allowed=False))) == \
        "external recipients are not allowed under this limits profile"
    assert impossible_reason(Shape(1, 0), cfg(limits(external_allowed=False))) is None
    assert impossible_reason(Shape(4, 2), cfg(limits(recipients_per_message=5))) == \
        "6 exceeds the limit of 5 recipients per message"
    assert impossible_reason(Shape(3, 2), cfg(limits(recipients_per_message=5))) is None
    assert impossible_reason(Shape(9, 3), cfg(limits(external_recipients_per_day=2))) == \
        "3 exceeds the limit of 2 external recipients per day per account"
    assert impossible_reason(Shape(9, 2), cfg(limits(external_recipients_per_day=2))) is None
    assert impossible_reason(Shape(8, 3), cfg(limits(recipients_per_day_per_account=10))) == \
        "11 exceeds the limit of 10 recipients per day per account"
    assert impossible_reason(Shape(7, 3), cfg(limits(recipients_per_day_per_account=10))) is None
    assert impossible_reason(Shape(5, 0), cfg(limits(recipients_per_day_per_tenant=9), daily_recipient_budget=4)) == \
        "5 exceeds the limit of 4 recipients per day for the tenant (cap or budget)"
    assert impossible_reason(Shape(4, 0), cfg(daily_recipient_budget=4)) is None


def test_the_first_broken_limit_is_the_one_named():
    c = cfg(limits(recipients_per_message=1, recipients_per_day_per_account=1))
    assert impossible_reason(Shape(2, 0), c) == "2 exceeds the limit of 1 recipients per message"


def test_a_zero_per_minute_limit_is_impossible_only_for_the_messages_it_covers():
    zero_ext = cfg(limits(external_messages_per_minute=0))
    assert impossible_reason(Shape(0, 1), zero_ext) == "a per-minute limit is zero"
    assert impossible_reason(Shape(1, 0), zero_ext) is None
    zero_all = cfg(limits(messages_per_minute=0))
    assert impossible_reason(Shape(1, 0), zero_all) == "a per-minute limit is zero"
    assert isinstance(decide([AccountState(A)], None, Shape(1, 0), NOW, zero_all), Impossible)


# --- earliest_slot -------------------------------------------------------------------------------

def test_a_free_account_can_send_now_and_nothing_binds():
    assert earliest_slot(AccountState(A), TenantState(), Shape(1, 1), NOW, cfg()) == (NOW, "")


def test_resting_accounts_name_what_they_rest_from():
    c = cfg()
    assert earliest_slot(AccountState(A, cooldown_until=NOW + 5), None, Shape(1, 0), NOW, c) == \
        (NOW + 5, "cooling down after throttling")
    assert earliest_slot(AccountState(A, cooldown_until=NOW + 5, last_problem="450 4.5.104"), None, Shape(1, 0), NOW, c) == \
        (NOW + 5, "cooling down after 450 4.5.104")
    assert earliest_slot(AccountState(A, unhealthy_until=NOW + 9), None, Shape(1, 0), NOW, c) == \
        (NOW + 9, "unhealthy (auth)")
    assert earliest_slot(AccountState(A, unhealthy_until=NOW + 9, last_problem="535 5.7.3"), None, Shape(1, 0), NOW, c) == \
        (NOW + 9, "unhealthy (535 5.7.3)")
    # The later rest binds; at a tie the cooldown (checked first) is named.
    assert earliest_slot(AccountState(A, cooldown_until=NOW + 9, unhealthy_until=NOW + 5), None, Shape(1, 0), NOW, c) == \
        (NOW + 9, "cooling down after throttling")
    assert earliest_slot(AccountState(A, cooldown_until=NOW + 5, unhealthy_until=NOW + 5), None, Shape(1, 0), NOW, c) == \
        (NOW + 5, "cooling down after throttling")
    # A rest that is over does not bind.
    assert earliest_slot(AccountState(A, cooldown_until=NOW, unhealthy_until=NOW - 1), None, Shape(1, 0), NOW, c) == (NOW, "")


def test_a_full_minute_names_which_per_minute_limit_binds():
    c = cfg(limits(messages_per_minute=2, external_messages_per_minute=1))
    full = AccountState(A, slots=(NOW - 10, NOW - 5), external_slots=(NOW - 5,))
    assert earliest_slot(full, None, Shape(1, 0), NOW, c) == (NOW - 10 + W, "messages per minute")
    one = AccountState(A, slots=(NOW - 5,), external_slots=(NOW - 5,))
    assert earliest_slot(one, None, Shape(1, 0), NOW, c) == (NOW, "")  # internal: the external log does not bind
    assert earliest_slot(one, None, Shape(0, 1), NOW, c) == (NOW - 5 + W, "external messages per minute")


def test_after_a_cooldown_the_minute_is_still_checked():
    c = cfg(limits(messages_per_minute=1))
    state = AccountState(A, slots=(NOW,), cooldown_until=NOW + 10)
    assert earliest_slot(state, None, Shape(1, 0), NOW, c) == (NOW + W, "messages per minute")


def test_both_per_minute_logs_are_satisfied_together():
    # The external log sends the slot to NOW+52; there the all-messages log (limit 2) has
    # (NOW-8, NOW+20) so a third at NOW+52 is 60 s after NOW-8: too soon, it must wait to NOW+54.
    c = cfg(limits(messages_per_minute=2, external_messages_per_minute=1))
    state = AccountState(A, slots=(NOW - 8, NOW + 20), external_slots=(NOW - 10,))
    assert earliest_slot(state, None, Shape(0, 1), NOW, c) == (NOW - 8 + W, "messages per minute")


def test_a_slot_the_external_minute_moves_out_of_a_gap_is_checked_again_against_all_messages():
    # All messages, 2 a minute: NOW fits between NOW-40 and the bookings at NOW+30, NOW+70.
    # External, 1 a minute: the external message at NOW-40 moves the slot to NOW+22, where
    # (NOW+22, NOW+30, NOW+70) spans only 48 s; so it goes after the bookings: NOW+30+62.
    c = cfg(limits(messages_per_minute=2, external_messages_per_minute=1))
    state = AccountState(A, slots=(NOW - 40, NOW + 30, NOW + 70), external_slots=(NOW - 40,))
    assert earliest_slot(state, None, Shape(0, 1), NOW, c) == (NOW + 30 + W, "messages per minute")
    assert earliest_slot(state, None, Shape(1, 0), NOW, c) == (NOW, "")


def test_a_full_day_sends_the_slot_to_the_next_daily_window_naming_the_limit():
    c = cfg(limits(recipients_per_day_per_account=10, external_recipients_per_day=4), day_offset_seconds=600.0)
    today = c.day_of(NOW)
    assert c.day_end(today) == DAY + 600.0
    nearly = AccountState(A, day=today, internal_today=5, external_today=3)
    assert earliest_slot(nearly, None, Shape(1, 1), NOW, c) == (NOW, "")          # exactly 4 and 10
    assert earliest_slot(nearly, None, Shape(0, 2), NOW, c) == (DAY + 600.0, "external recipients per day")
    assert earliest_slot(nearly, None, Shape(3, 0), NOW, c) == (DAY + 600.0, "recipients per day per account")
    # Yesterday's counts do not bind today.
    assert earliest_slot(replace(nearly, day=today - 1), None, Shape(2, 1), NOW, c) == (NOW, "")


def test_a_row_already_on_tomorrow_and_full_sends_the_slot_to_the_day_after():
    c = cfg(limits(recipients_per_day_per_account=10))
    ahead = AccountState(A, day=1, internal_today=10)
    assert earliest_slot(ahead, None, Shape(1, 0), NOW, c) == (2 * DAY, "recipients per day per account")


def test_the_tenant_cap_binds_only_beyond_the_allowance_the_account_holds():
    c = cfg(limits(recipients_per_day_per_tenant=10))
    tenant = TenantState(day=0, claimed=8)
    assert earliest_slot(AccountState(A, day=0), tenant, Shape(2, 0), NOW, c) == (NOW, "")
    assert earliest_slot(AccountState(A, day=0), tenant, Shape(3, 0), NOW, c) == (END, "recipients per day for the tenant")
    assert earliest_slot(AccountState(A, day=0, allowance=1), tenant, Shape(3, 0), NOW, c) == (NOW, "")
    # The whole message is covered by allowance: a tenant row at its cap does not matter.
    assert earliest_slot(AccountState(A, day=0, allowance=3), TenantState(day=0, claimed=10), Shape(3, 0), NOW, c) == (NOW, "")
    # No tenant row given: the tenant cap is not judged here.
    assert earliest_slot(AccountState(A, day=0), None, Shape(3, 0), NOW, c) == (NOW, "")
    # Yesterday's claims do not bind today.
    assert earliest_slot(AccountState(A, day=0), TenantState(day=-1, claimed=10), Shape(3, 0), NOW, c) == (NOW, "")


def test_a_full_budget_is_named_as_the_budget_and_a_full_hve_cap_as_the_tenant_cap():
    budget = cfg(limits(recipients_per_day_per_tenant=100), daily_recipient_budget=10)
    assert earliest_slot(AccountState(A, day=0), TenantState(day=0, claimed=10), Shape(1, 0), NOW, budget) == \
        (END, "daily recipient budget")
    hve = cfg(limits(recipients_per_day_per_tenant=10), daily_recipient_budget=100)
    assert earliest_slot(AccountState(A, day=0), TenantState(day=0, claimed=10), Shape(1, 0), NOW, hve) == \
        (END, "recipients per day for the tenant")


def test_a_tenant_row_full_tomorrow_too_sends_the_slot_two_days_on():
    c = cfg(daily_recipient_budget=10)
    state = AccountState(A, day=0)
    assert earliest_slot(state, TenantState(day=0, claimed=10), Shape(1, 0), NOW, c) == (END, "daily recipient budget")
    assert earliest_slot(state, TenantState(day=1, claimed=10), Shape(1, 0), NOW, c) == (2 * DAY, "daily recipient budget")


# --- take_slot -----------------------------------------------------------------------------------

def test_taking_a_slot_counts_the_message_and_logs_its_time():
    c = cfg(limits(messages_per_minute=5, external_messages_per_minute=5))
    state, tenant = take_slot(AccountState(A, day=0, internal_today=1, external_today=2, messages_today=3,
                                           last_granted=NOW - 1),
                              None, Shape(2, 3), NOW + 5, NOW, c, accounts=1)
    assert (state.day, state.internal_today, state.external_today, state.messages_today) == (0, 3, 5, 4)
    assert state.slots == (NOW + 5,) and state.external_slots == (NOW + 5,)
    assert state.last_granted == NOW + 5 and tenant is None
    assert state.allowance == 0  # no tenant cap: no allowance is kept
    # A booking taken before a later one does not move last_granted back.
    again, _ = take_slot(state, None, Shape(1, 0), NOW + 2, NOW, c, accounts=1)
    assert again.last_granted == NOW + 5 and again.slots == (NOW + 2, NOW + 5)
    assert again.external_slots == (NOW + 5,)


def test_taking_a_slot_forgets_slots_a_window_and_the_history_old_and_logs_nothing_without_a_limit():
    c = cfg(limits(messages_per_minute=5, external_messages_per_minute=5))
    edge = NOW - W - HISTORY_SECONDS
    old = AccountState(A, slots=(edge, edge + 0.001), external_slots=(edge, edge + 0.001))
    internal, _ = take_slot(old, None, Shape(1, 0), NOW, NOW, c, accounts=1)
    assert internal.slots == (edge + 0.001, NOW)
    assert internal.external_slots == (edge + 0.001,)  # pruned, not added to
    unlimited, _ = take_slot(old, None, Shape(0, 1), NOW, NOW, cfg(), accounts=1)
    assert unlimited.slots == () and unlimited.external_slots == (edge + 0.001,)


def test_a_decision_whose_clock_lags_still_counts_the_slots_a_faster_instance_kept():
    # An instance at NOW+200 s grants a slot; the log keeps NOW's four slots, so an instance whose
    # clock says NOW+9 cannot squeeze a fifth into NOW's minute.
    c = cfg(limits(external_messages_per_minute=4))
    state = AccountState(A, external_slots=(NOW, NOW + 3, NOW + 6, NOW + 6))
    ahead, _ = take_slot(state, None, Shape(0, 1), NOW + 200, NOW + 200, c, accounts=1)
    assert ahead.external_slots[:4] == (NOW, NOW + 3, NOW + 6, NOW + 6)
    lagging = decide([ahead], None, Shape(0, 1), NOW + 9, c, random.Random(1))
    assert not (isinstance(lagging, Grant) and lagging.at < NOW + W)


def test_an_account_takes_a_block_of_500_from_the_tenant_far_from_the_cap():
    c = cfg(limits(recipients_per_day_per_tenant=100_000))
    state, tenant = take_slot(AccountState(A), TenantState(), Shape(2, 1), NOW, NOW, c, accounts=3)
    assert state.allowance == 497 and tenant is not None and (tenant.day, tenant.claimed) == (0, 500)


def test_near_the_cap_the_block_is_the_remainder_shared_over_twice_the_accounts():
    c = cfg(daily_recipient_budget=1000)
    # remaining 100, 2 accounts: 100 // 4 = 25
    state, tenant = take_slot(AccountState(A), TenantState(day=0, claimed=900), Shape(3, 0), NOW, NOW, c, accounts=2)
    assert (state.allowance, tenant.claimed) == (22, 925)
    # A message larger than that block takes just what it needs.
    state, tenant = take_slot(AccountState(A), TenantState(day=0, claimed=900), Shape(30, 0), NOW, NOW, c, accounts=2)
    assert (state.allowance, tenant.claimed) == (0, 930)
    # One account: 100 // 2 = 50.
    state, tenant = take_slot(AccountState(A), TenantState(day=0, claimed=900), Shape(3, 0), NOW, NOW, c, accounts=1)
    assert (state.allowance, tenant.claimed) == (47, 950)
    # Whole recipients only: 101 // 4 = 25.
    state, tenant = take_slot(AccountState(A), TenantState(day=0, claimed=899), Shape(3, 0), NOW, NOW, c, accounts=2)
    assert (state.allowance, tenant.claimed) == (22, 924)
    assert isinstance(state.allowance, int) and isinstance(tenant.claimed, int)
    # No accounts counted is treated as one.
    state, tenant = take_slot(AccountState(A), TenantState(day=0, claimed=900), Shape(3, 0), NOW, NOW, c, accounts=0)
    assert (state.allowance, tenant.claimed) == (47, 950)


def test_the_last_recipients_of_the_day_are_handed_out_exactly_to_the_cap():
    c = cfg(daily_recipient_budget=1000)
    state, tenant = take_slot(AccountState(A), TenantState(day=0, claimed=997), Shape(3, 0), NOW, NOW, c, accounts=1)
    assert (state.allowance, tenant.claimed) == (0, 1000)
    state, tenant = take_slot(AccountState(A), TenantState(day=0, claimed=990), Shape(3, 0), NOW, NOW, c, accounts=1)
    assert (state.allowance, tenant.claimed) == (2, 995)  # 10 // 2 = 5


def test_allowance_already_held_is_spent_without_writing_the_tenant_row():
    c = cfg(daily_recipient_budget=1000)
    state, tenant = take_slot(AccountState(A, day=0, allowance=5), TenantState(day=0, claimed=10), Shape(3, 0),
                              NOW, NOW, c, accounts=1)
    assert (state.allowance, tenant) == (2, None)
    state, tenant = take_slot(AccountState(A, day=0, allowance=3), TenantState(day=0, claimed=10), Shape(3, 0),
                              NOW, NOW, c, accounts=1)
    assert (state.allowance, tenant) == (0, None)
    # Short by one: a new block is claimed, on top of what is held.
    state, tenant = take_slot(AccountState(A, day=0, allowance=2), TenantState(day=0, claimed=10), Shape(3, 0),
                              NOW, NOW, c, accounts=1)
    assert (state.allowance, tenant.claimed) == (2 + 495 - 3, 10 + 495)  # min(500, 990 // 2)


def test_yesterdays_allowance_and_claims_do_not_carry_over():
    c = cfg(daily_recipient_budget=1000)
    state, tenant = take_slot(AccountState(A, day=-1, allowance=50), TenantState(day=-1, claimed=990), Shape(3, 0),
                              NOW, NOW, c, accounts=1)
    assert (state.day, state.allowance, tenant.day, tenant.claimed) == (0, 497, 0, 500)


def test_a_slot_taken_with_a_stale_time_is_charged_to_the_rows_later_day():
    c = cfg(daily_recipient_budget=1000)
    row = AccountState(A, day=1, internal_today=4, messages_today=2)
    state, tenant = take_slot(row, TenantState(day=1, claimed=600), Shape(3, 0), NOW, NOW, c, accounts=1)
    assert (state.day, state.internal_today, state.messages_today) == (1, 7, 3)
    assert (tenant.day, tenant.claimed) == (1, 800)  # 400 // 2 = 200
    # Without a tenant row there is nothing to write.
    assert take_slot(row, None, Shape(3, 0), NOW, NOW, c, accounts=1)[1] is None


# --- release_slot --------------------------------------------------------------------------------

def test_a_release_on_the_same_day_gives_back_the_slot_the_counts_and_the_recipients_as_allowance():
    c = cfg(daily_recipient_budget=1000)
    row = AccountState(A, day=0, internal_today=5, external_today=3, messages_today=4, allowance=10,
                       slots=(NOW, NOW + 7), external_slots=(NOW + 7,))
    back = release_slot(row, Release(A, NOW + 7, Shape(2, 1)), c)
    assert back.slots == (NOW,) and back.external_slots == ()
    assert (back.internal_today, back.external_today, back.messages_today, back.allowance) == (3, 2, 3, 13)


def test_a_release_without_a_tenant_cap_gives_back_no_allowance():
    row = AccountState(A, day=0, internal_today=5, messages_today=4, allowance=10, slots=(NOW,))
    back = release_slot(row, Release(A, NOW, Shape(2, 0)), cfg())
    assert (back.internal_today, back.messages_today, back.allowance, back.slots) == (3, 3, 10, ())


def test_an_internal_release_leaves_the_external_log_alone():
    row = AccountState(A, day=0, messages_today=1, internal_today=1, slots=(NOW,), external_slots=(NOW,))
    back = release_slot(row, Release(A, NOW, Shape(1, 0)), cfg())
    assert back.slots == () and back.external_slots == (NOW,)


def test_a_release_of_a_slot_already_pruned_from_the_log_still_gives_back_the_days_counts():
    row = AccountState(A, day=0, internal_today=2, messages_today=2, slots=(NOW + 100,))
    back = release_slot(row, Release(A, NOW, Shape(1, 0)), cfg())
    assert back.slots == (NOW + 100,)
    assert (back.internal_today, back.messages_today) == (1, 1)


def test_a_release_charged_to_another_day_gives_back_only_the_log_place():
    row = AccountState(A, day=1, internal_today=2, messages_today=2, allowance=4, slots=(NOW, DAY + 5))
    back = release_slot(row, Release(A, NOW, Shape(1, 0)), cfg(daily_recipient_budget=100))
    assert back.slots == (DAY + 5,)
    assert (back.day, back.internal_today, back.messages_today, back.allowance) == (1, 2, 2, 4)


def test_a_release_on_a_day_with_no_messages_changes_no_counts_and_counts_never_go_negative():
    row = AccountState(A, day=0, internal_today=0, messages_today=0, allowance=4)
    back = release_slot(row, Release(A, NOW, Shape(1, 0)), cfg(daily_recipient_budget=100))
    assert (back.internal_today, back.messages_today, back.allowance) == (0, 0, 4)
    thin = AccountState(A, day=0, internal_today=1, external_today=0, messages_today=1)
    back = release_slot(thin, Release(A, NOW, Shape(3, 2)), cfg())
    assert (back.internal_today, back.external_today, back.messages_today) == (0, 0, 0)


# --- decide --------------------------------------------------------------------------------------

def test_no_accounts_is_impossible_and_an_impossible_shape_is_refused_before_looking_at_them():
    assert decide([], None, Shape(1, 0), NOW, cfg()) == Impossible("no HVE accounts configured")
    assert decide([], None, Shape(6, 0), NOW, cfg(limits(recipients_per_message=5))) == \
        Impossible("6 exceeds the limit of 5 recipients per message")


def test_a_free_account_is_granted_now_even_without_booking_and_in_a_crowded_second():
    c = cfg(limits(messages_per_minute=30), bookings_per_second=1)
    crowd = AccountState(B, slots=(NOW, NOW, NOW))
    for allow in (True, False):
        d = decide([AccountState(A), replace(crowd, cooldown_until=NOW + 500)], None, Shape(1, 0), NOW, c,
                   random.Random(1), allow_booking=allow)
        assert isinstance(d, Grant) and (d.account, d.at) == (A, NOW) and not d.is_booking(NOW)


def test_a_free_account_is_granted_without_an_rng_given():
    d = decide([AccountState(A), AccountState(B)], None, Shape(1, 0), NOW, cfg())
    assert isinstance(d, Grant) and d.account in (A, B) and d.at == NOW


def test_the_grant_carries_the_new_states_and_the_tenant_row_only_when_claimed():
    c = cfg(daily_recipient_budget=1000)
    d = decide([AccountState(A)], TenantState(), Shape(2, 0), NOW, c, random.Random(0))
    assert isinstance(d, Grant)
    assert (d.account_state.messages_today, d.account_state.allowance) == (1, 498)
    assert d.tenant_state == TenantState(day=0, claimed=500)
    d2 = decide([d.account_state], d.tenant_state, Shape(2, 0), NOW + 1, c, random.Random(0))
    assert isinstance(d2, Grant) and d2.tenant_state is None and d2.account_state.allowance == 496


def test_without_booking_a_busy_account_says_when_to_come_back_and_why():
    c = cfg(limits(messages_per_minute=1))
    d = decide([AccountState(A, slots=(NOW,))], None, Shape(1, 0), NOW, c, allow_booking=False)
    assert d == Wait(until=NOW + W, reason="messages per minute")


def test_a_slot_exactly_at_the_booking_horizon_is_booked_and_one_beyond_waits_unbooked():
    c = cfg(limits(messages_per_minute=1), booking_horizon_seconds=W)
    d = decide([AccountState(A, slots=(NOW,))], None, Shape(1, 0), NOW, c, random.Random(0))
    assert isinstance(d, Grant) and d.at == NOW + W and d.is_booking(NOW)
    assert d.account_state.slots == (NOW, NOW + W)
    far = cfg(limits(messages_per_minute=1), booking_horizon_seconds=W - 0.5)
    # Come back when the slot is half a horizon away: NOW + 62 - 30.75.
    assert decide([AccountState(A, slots=(NOW,))], None, Shape(1, 0), NOW, far) == \
        Wait(until=NOW + W - (W - 0.5) / 2, reason="messages per minute")


def test_beyond_a_tiny_horizon_the_wait_is_at_least_a_second():
    c = cfg(booking_horizon_seconds=0.5)
    assert decide([AccountState(A, cooldown_until=NOW + 0.6)], None, Shape(1, 0), NOW, c) == \
        Wait(until=NOW + 1.0, reason="cooling down after throttling")


def test_the_default_horizon_is_an_hour():
    c = cfg()
    assert decide([AccountState(A, cooldown_until=NOW + 3601)], None, Shape(1, 0), NOW, c) == \
        Wait(until=NOW + 1801, reason="cooling down after throttling")
    d = decide([AccountState(A, cooldown_until=NOW + 3600)], None, Shape(1, 0), NOW, c, random.Random(0))
    assert isinstance(d, Grant) and d.at == NOW + 3600


def test_bookings_made_at_any_fraction_of_a_second_keep_the_accounts_cadence_without_drift():
    """Each booking is the earliest slot itself. Rounded to a whole number of seconds from the
    moment of deciding, every window's booking came up to a second after the window before, and
    an account's cadence drifted later by about half a second per window (2 s after four)."""
    c = cfg(limits(messages_per_minute=1))
    state = AccountState(A, slots=(NOW,))
    for k in range(1, 11):
        now = NOW + (0.9 if k % 2 else 0.1)       # bookings are decided at all sorts of moments
        d = decide([state], None, Shape(1, 0), now, c, random.Random(0))
        assert isinstance(d, Grant) and d.at == pytest.approx(NOW + k * W, abs=1e-3), (k, d.at - NOW)
        state = d.account_state


def test_a_slot_at_or_after_the_days_end_is_a_wait_not_a_booking():
    c = cfg(limits(messages_per_minute=1), booking_horizon_seconds=DAY)
    late = END - 10
    d = decide([AccountState(A, slots=(late,))], None, Shape(1, 0), late, c)
    assert d == Wait(until=late + W, reason="messages per minute")
    # Free 0.2 s before the day ends: booked then, on this day.
    now = END - 10.5
    d = decide([AccountState(A, slots=(END - W - 0.2,))], None, Shape(1, 0), now, c, random.Random(0))
    assert isinstance(d, Grant) and d.at == pytest.approx(END - 0.2)


def test_a_booking_claims_tenant_allowance_like_a_grant_now():
    c = cfg(limits(messages_per_minute=1), daily_recipient_budget=1000)
    d = decide([AccountState(A, day=0, slots=(NOW,))], TenantState(day=0, claimed=0), Shape(3, 0), NOW, c,
               random.Random(0))
    assert isinstance(d, Grant) and d.is_booking(NOW)
    assert d.tenant_state == TenantState(day=0, claimed=500)
    assert d.account_state.allowance == 497


def test_a_booking_goes_to_an_account_within_near_seconds_of_the_best_preferring_the_preferred():
    c = cfg(limits(messages_per_minute=1))
    states = [AccountState(A, slots=(NOW,)), AccountState(B, slots=(NOW + NEAR_SECONDS,)),
              AccountState(C, slots=(NOW + NEAR_SECONDS + 0.001,))]
    # B is free exactly NEAR_SECONDS after A: it may take the booking, and does when preferred.
    for seed in range(20):
        d = decide(states, None, Shape(1, 0, B), NOW, c, random.Random(seed))
        assert isinstance(d, Grant) and d.account == B and d.at == NOW + NEAR_SECONDS + W
    # C is free a millisecond too late: preferring it does not make it eligible.
    chosen = {decide(states, None, Shape(1, 0, C), NOW, c, random.Random(seed)).account for seed in range(20)}
    assert chosen == {A, B}


def test_when_all_are_free_the_preferred_account_is_granted_and_otherwise_one_at_random():
    states = [AccountState(A), AccountState(B), AccountState(C)]
    assert {decide(states, None, Shape(1, 0, B), NOW, cfg(), random.Random(s)).account for s in range(20)} == {B}
    assert {decide(states, None, Shape(1, 0), NOW, cfg(), random.Random(s)).account for s in range(40)} == {A, B, C}


# --- spreading bookings over seconds ---------------------------------------------------------------

def test_a_crowded_second_moves_the_booking_to_the_next_second_with_room():
    c = cfg(bookings_per_second=2)
    others = AccountState(B, slots=(NOW, NOW + 0.5, NOW + 1, NOW + 1.9))
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), others], c) == NOW + 2
    assert _spread(AccountState(A), Shape(1, 0), NOW + 0.5, [AccountState(A), others], c) == NOW + 2.5
    one = AccountState(B, slots=(NOW,))
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), one], c) == NOW  # room for a second
    # Bookings just before `at` in the same second count; those in the second before do not.
    early = AccountState(B, slots=(NOW + 0.1, NOW + 0.2))
    assert _spread(AccountState(A), Shape(1, 0), NOW + 0.5, [AccountState(A), early], c) == NOW + 1.5
    before = AccountState(B, slots=(NOW - 0.2, NOW - 0.1))
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), before], c) == NOW


def test_the_external_log_is_what_counts_for_a_rows_bookings_when_it_has_one():
    c = cfg(bookings_per_second=1)
    row = AccountState(B, slots=(NOW + 5,), external_slots=(NOW,))
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), row], c) == NOW + 1
    assert _spread(AccountState(A), Shape(1, 0), NOW + 5, [AccountState(A), row], c) == NOW + 5


def test_spreading_off_keeps_the_crowded_second_whatever_the_accounts_rate():
    # With per-minute limits the combined-rate floor would be ceil(30 * 2 / 62) = 1 a second;
    # switched off, no floor applies either.
    c = cfg(limits(messages_per_minute=30), bookings_per_second=0)
    crowd = AccountState(B, slots=(NOW,) * 5)
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), crowd], c) == NOW


def test_spreading_off_keeps_the_crowded_second():
    c = cfg(bookings_per_second=0)
    crowd = AccountState(B, slots=(NOW,) * 20)
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), crowd], c) == NOW
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), crowd], cfg(bookings_per_second=-1)) == NOW


def test_the_spread_is_never_below_the_accounts_combined_rate():
    # 30 a minute on each of 3 accounts over a 62 s window: ceil(90 / 62) = 2 a second, above the setting of 1.
    c = cfg(limits(messages_per_minute=30), bookings_per_second=1)
    states = [AccountState(A), AccountState(B, slots=(NOW,)), AccountState(C)]
    assert _spread(states[0], Shape(1, 0), NOW, states, c) == NOW
    crowd = [AccountState(A), AccountState(B, slots=(NOW, NOW + 0.5)), AccountState(C)]
    assert _spread(crowd[0], Shape(1, 0), NOW, crowd, c) == NOW + 1
    # 31 a minute: ceil(93 / 62) = 2 as well; 32 a minute: ceil(96 / 62) = 2; 42: ceil(126 / 62) = 3.
    c42 = cfg(limits(messages_per_minute=42), bookings_per_second=1)
    assert _spread(crowd[0], Shape(1, 0), NOW, crowd, c42) == NOW
    # Two accounts at 31 a minute: ceil(62 / 62) = 1 exactly, so a second booking moves on.
    pair = [AccountState(A), AccountState(B, slots=(NOW,))]
    assert _spread(pair[0], Shape(1, 0), NOW, pair, cfg(limits(messages_per_minute=31), bookings_per_second=1)) == NOW + 1
    assert _spread(pair[0], Shape(1, 0), NOW, pair, cfg(limits(messages_per_minute=32), bookings_per_second=1)) == NOW


def test_an_external_booking_is_spread_at_the_external_rate():
    # External: 10 a minute on 2 accounts -> ceil(20 / 62) = 1; the 60-a-minute all-messages
    # rate (ceil(120 / 62) = 2) does not apply to it, but does to an internal booking.
    c = cfg(limits(messages_per_minute=60, external_messages_per_minute=10), bookings_per_second=1)
    states = [AccountState(A), AccountState(B, slots=(NOW,), external_slots=(NOW,))]
    assert _spread(states[0], Shape(0, 1), NOW, states, c) == NOW + 1
    assert _spread(states[0], Shape(1, 0), NOW, states, c) == NOW


def test_a_booking_in_a_gap_stays_in_its_crowded_second_rather_than_break_the_window():
    # A has slots at NOW-62 and NOW+62: NOW is the only place that fits for the next two minutes.
    c = cfg(limits(messages_per_minute=1), bookings_per_second=8)
    a = AccountState(A, slots=(NOW - W, NOW + W))
    crowd = AccountState(B, slots=(NOW,) * 10)
    assert _spread(a, Shape(1, 0), NOW, [a, crowd], c) == NOW
    # Where a later second does fit the account, the booking moves there.
    b = AccountState(A, slots=(NOW - W,))
    assert _spread(b, Shape(1, 0), NOW, [b, crowd], c) == NOW + 1


def test_an_external_booking_in_a_gap_of_the_external_minute_stays_in_its_crowded_second():
    # Only the external log limits A (1 a minute) and NOW is its only free place for two minutes.
    c = cfg(limits(external_messages_per_minute=1), bookings_per_second=8)
    a = AccountState(A, external_slots=(NOW - W, NOW + W))
    crowd = AccountState(B, slots=(NOW,) * 10)
    assert _spread(a, Shape(0, 1), NOW, [a, crowd], c) == NOW
    # An internal booking is not held by the external log.
    assert _spread(a, Shape(1, 0), NOW, [a, crowd], c) == NOW + 1


def test_the_spread_looks_at_most_120_seconds_ahead():
    c = cfg(bookings_per_second=1)
    busy = AccountState(B, slots=tuple(NOW + k for k in range(120)))
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), busy], c) == NOW
    busier = AccountState(B, slots=tuple(NOW + k for k in range(119)))
    assert _spread(AccountState(A), Shape(1, 0), NOW, [AccountState(A), busier], c) == NOW + 119


def test_decide_spreads_a_booking_away_from_a_crowded_second():
    c = cfg(limits(messages_per_minute=1), bookings_per_second=1)
    # B rests, but holds a booking at NOW+62, the second A would book.
    states = [AccountState(A, slots=(NOW,)), AccountState(B, slots=(NOW + W,), cooldown_until=NOW + 500)]
    d = decide(states, None, Shape(1, 0), NOW, c, random.Random(0))
    assert isinstance(d, Grant) and d.account == A and d.at == NOW + W + 1


# --- decide with a release -----------------------------------------------------------------------

def test_a_release_on_the_granted_account_is_in_its_own_state_and_not_repeated():
    c = cfg(limits(messages_per_minute=1))
    row = AccountState(A, day=0, internal_today=1, messages_today=1, slots=(NOW - 5,))
    d = decide([row], None, Shape(1, 0), NOW, c, release=Release(A, NOW - 5, Shape(1, 0)))
    assert isinstance(d, Grant) and d.account == A and d.at == NOW and d.released_state is None
    assert d.account_state.slots == (NOW,) and d.account_state.messages_today == 1


def test_a_release_on_another_account_is_returned_for_the_same_write():
    c = cfg(limits(messages_per_minute=1))
    old = AccountState(A, day=0, internal_today=1, messages_today=1, slots=(NOW - 5,), cooldown_until=NOW + 100)
    d = decide([old, AccountState(B)], None, Shape(1, 0), NOW, c, random.Random(0),
               release=Release(A, NOW - 5, Shape(1, 0)))
    assert isinstance(d, Grant) and d.account == B
    assert d.released_state == replace(old, internal_today=0, messages_today=0, slots=())


def test_a_release_touches_only_its_own_account_even_when_another_holds_a_slot_at_that_time():
    # Two accounts booked at the same moment: giving back A's slot must not give back B's.
    c = cfg(limits(messages_per_minute=2))
    a = AccountState(A, day=0, internal_today=1, messages_today=1, slots=(NOW - 5,), cooldown_until=NOW + 100)
    b = AccountState(B, day=0, internal_today=1, messages_today=1, slots=(NOW - 5,))
    d = decide([a, b], None, Shape(1, 0), NOW, c, random.Random(0), release=Release(A, NOW - 5, Shape(1, 0)))
    assert isinstance(d, Grant) and d.account == B
    assert d.account_state.slots == (NOW - 5, NOW)
    assert (d.account_state.internal_today, d.account_state.messages_today) == (2, 2)
    assert d.released_state is not None and d.released_state.slots == ()


def test_a_release_is_returned_with_a_wait_and_with_a_refusal():
    c = cfg(limits(messages_per_minute=1, recipients_per_message=2))
    old = AccountState(A, day=0, internal_today=1, messages_today=1, slots=(NOW - 5,), cooldown_until=NOW + 100)
    freed = replace(old, internal_today=0, messages_today=0, slots=())
    wait = decide([old], None, Shape(1, 0), NOW, c, allow_booking=False, release=Release(A, NOW - 5, Shape(1, 0)))
    assert wait == Wait(until=NOW + 100, reason="cooling down after throttling", released_state=freed)
    refused = decide([old], None, Shape(3, 0), NOW, c, release=Release(A, NOW - 5, Shape(1, 0)))
    assert refused == Impossible("3 exceeds the limit of 2 recipients per message", released_state=freed)


def test_a_release_for_an_unknown_account_changes_nothing():
    d = decide([AccountState(A)], None, Shape(1, 0), NOW, cfg(), release=Release(C, NOW - 5, Shape(1, 0)))
    assert isinstance(d, Grant) and d.released_state is None and d.account == A


def test_the_released_slot_is_free_for_this_very_decision():
    # A single account with limit 1: its own booking at NOW+3 would push a new slot to NOW+65;
    # released, the request goes now.
    c = cfg(limits(messages_per_minute=1))
    row = AccountState(A, day=0, internal_today=1, messages_today=1, slots=(NOW + 3,))
    assert decide([row], None, Shape(1, 0), NOW, c, allow_booking=False) == Wait(NOW + 3 + W, "messages per minute")
    d = decide([row], None, Shape(1, 0), NOW, c, release=Release(A, NOW + 3, Shape(1, 0)))
    assert isinstance(d, Grant) and d.at == NOW and d.account_state.slots == (NOW,)


# --- server feedback -----------------------------------------------------------------------------

def verdict(outcome: Outcome, code: int, enhanced: str, *, throttled: bool = False, daily: bool = False) -> Verdict:
    return Verdict(outcome, code, enhanced, "text", throttled=throttled, daily_quota=daily)


def test_an_account_failure_rests_the_account_for_the_unhealthy_period():
    c = cfg()
    s = after_reply(AccountState(A, cooldown_until=NOW + 5), verdict(Outcome.ACCOUNT, 535, "5.7.3"), NOW, c)
    assert (s.unhealthy_until, s.cooldown_until, s.last_problem) == (NOW + 900, NOW + 5, "535 5.7.3")


def test_a_throttle_cools_the_account_for_a_minute_but_never_shortens_a_longer_cooldown():
    c = cfg()
    s = after_reply(AccountState(A), verdict(Outcome.DEFER, 451, "", throttled=True), NOW, c)
    assert (s.cooldown_until, s.unhealthy_until, s.last_problem) == (NOW + 60, 0.0, "451")
    longer = after_reply(AccountState(A, cooldown_until=NOW + 500), verdict(Outcome.DEFER, 450, "4.5.104", throttled=True),
                         NOW, c)
    assert (longer.cooldown_until, longer.last_problem) == (NOW + 500, "450 4.5.104")


def test_a_daily_quota_cools_the_account_until_its_window_resets():
    c = cfg(day_offset_seconds=7200.0)
    s = after_reply(AccountState(A), verdict(Outcome.DEFER, 450, "4.5.102", throttled=True, daily=True), NOW, c)
    assert s.cooldown_until == 7200.0  # NOW (1000 s) is still in the window that began the day before
    s = after_reply(AccountState(A), verdict(Outcome.DEFER, 450, "4.5.102", throttled=True, daily=True), 8000.0, c)
    assert s.cooldown_until == DAY + 7200.0
    # A daily-quota flag without a throttle is not a throttle.
    same = AccountState(A)
    assert after_reply(same, verdict(Outcome.DEFER, 450, "4.5.102", daily=True), NOW, c) is same


def test_a_plain_deferral_or_success_teaches_nothing():
    s = AccountState(A, cooldown_until=3.0)
    assert after_reply(s, verdict(Outcome.DEFER, 421, "4.4.2"), NOW, cfg()) is s
    assert after_reply(s, verdict(Outcome.SENT, 250, "2.0.0"), NOW, cfg()) is s


# --- chunks --------------------------------------------------------------------------------------

def test_chunks_split_only_above_the_per_message_limit():
    r = [f"u{i}@contoso.com" for i in range(4)]
    assert chunk_recipients(r, 4) == [r]
    assert chunk_recipients(r, 3) == [r[:3], r[3:]]
    assert chunk_recipients(r, 0) == [r]
    assert chunk_recipients(iter(r), 2) == [r[:2], r[2:]]
    assert chunk_recipients([], 2) == [[]]
