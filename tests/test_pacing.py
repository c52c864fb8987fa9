"""Governor arithmetic (pure): no limit is exceeded in any window, and every deferral names a time
at which the grant succeeds if nothing else arrives. Property-based with hypothesis."""

from __future__ import annotations

import random
from collections import defaultdict

from hypothesis import given, strategies as st

from shared.hve.limits import PROFILES, Limits
from shared.governor.pacing import (
    DAY,
    AccountState,
    Grant,
    Impossible,
    PacingConfig,
    Shape,
    TenantState,
    Wait,
    after_reply,
    chunk_recipients,
    decide,
)
from shared.send.replies import classify_reply

ACCOUNTS = ["a@contoso.com", "b@contoso.com", "c@contoso.com"]
START = 1_800_000_000.0  # a fixed epoch, mid-day UTC


def small_limits(draw) -> Limits:
    return Limits(
        external_allowed=True,
        recipients_per_message=draw(st.integers(1, 5)),
        message_bytes=None,
        external_messages_per_minute=draw(st.one_of(st.none(), st.integers(1, 4))),
        external_recipients_per_day=draw(st.one_of(st.none(), st.integers(5, 30))),
        recipients_per_day_per_account=draw(st.one_of(st.none(), st.integers(5, 40))),
        messages_per_minute=draw(st.one_of(st.none(), st.integers(1, 6))),
        recipients_per_day_per_tenant=draw(st.one_of(st.none(), st.integers(5, 60))),
    )


@st.composite
def scenarios(draw):
    limits = small_limits(draw)
    cfg = PacingConfig(limits=limits, margin_seconds=draw(st.sampled_from([0.0, 0.5, 2.0])),
                       day_offset_seconds=draw(st.sampled_from([0.0, 3600.0 * 7])),
                       daily_recipient_budget=draw(st.one_of(st.none(), st.integers(5, 50))),
                       lapse_room_seconds=draw(st.sampled_from([0.0, 2.0])))
    events = draw(st.lists(st.tuples(
        st.floats(0, 40),                                 # seconds since the previous arrival
        st.integers(0, 5), st.integers(0, 5),             # internal, external recipients
        st.sampled_from([None] + ACCOUNTS),               # preferred account
        st.sampled_from([None, None, None, "throttle", "auth", "daily"]),  # server feedback on the grant
    ), min_size=1, max_size=60))
    return cfg, events, draw(st.integers(0, 2 ** 32))


def check_windows(cfg: PacingConfig, sent: list[tuple[str, float, Shape]]) -> None:
    lim = cfg.limits
    by_account: dict[str, list[tuple[float, Shape]]] = defaultdict(list)
    for account, at, shape in sent:
        by_account[account].append((at, shape))
    tenant_day: dict[int, int] = defaultdict(int)
    for account, slots in by_account.items():
        slots.sort(key=lambda x: x[0])
        times = [t for t, _ in slots]
        ext_times = [t for t, s in slots if s.external]
        for series, limit in ((times, lim.messages_per_minute), (ext_times, lim.external_messages_per_minute)):
            if limit is None:
                continue
            for i in range(limit, len(series)):
                # HVE's rolling minute: limit+1 arrivals must span more than 60 s (plus the margin).
                assert series[i] - series[i - limit] >= 60 + cfg.margin_seconds - 1e-6, (account, series)
        per_day: dict[int, list[Shape]] = defaultdict(list)
        for t, s in slots:
            per_day[cfg.day_of(t)].append(s)
        for day, shapes in per_day.items():
            if lim.external_recipients_per_day is not None:
                assert sum(s.external for s in shapes) <= lim.external_recipients_per_day
            if lim.recipients_per_day_per_account is not None:
                assert sum(s.recipients for s in shapes) <= lim.recipients_per_day_per_account
            tenant_day[day] += sum(s.recipients for s in shapes)
    if cfg.tenant_cap is not None:
        assert all(total <= cfg.tenant_cap for total in tenant_day.values()), tenant_day


@given(scenarios())
def test_no_window_is_exceeded_and_every_wait_is_honest(scenario):
    cfg, events, seed = scenario
    rng = random.Random(seed)
    states = {a: AccountState(a) for a in ACCOUNTS}
    tenant = TenantState() if cfg.tenant_cap is not None else None
    now = START
    sent: list[tuple[str, float, Shape]] = []
    for gap, internal, external, preferred, feedback in events:
        now += gap
        shape = Shape(internal, external, preferred)
        if shape.recipients == 0:
            continue
        decision = decide(list(states.values()), tenant, shape, now, cfg, rng)
        if isinstance(decision, Impossible):
            assert shape.recipients > (cfg.limits.recipients_per_message or 10 ** 9) or any(
                cap is not None and need > cap for need, cap in (
                    (shape.external, cfg.limits.external_recipients_per_day),
                    (shape.recipients, cfg.limits.recipients_per_day_per_account),
                    (shape.recipients, cfg.tenant_cap)))
            continue
        if isinstance(decision, Wait):
            assert decision.until > now
            # Liveness: at the named time, with nothing else arriving, the grant succeeds.
            later = decide(list(states.values()), tenant, shape, decision.until, cfg, rng, allow_booking=False)
            assert isinstance(later, Grant) and later.at == decision.until, (decision, later)
            continue
        assert decision.at >= now and cfg.day_of(decision.at) == cfg.day_of(now) or decision.at == now
        states[decision.account] = decision.account_state
        if decision.tenant_state is not None:
            tenant = decision.tenant_state
        sent.append((decision.account, decision.at, shape))
        if feedback:
            verdict = {"throttle": classify_reply(450, "4.5.104 rate"), "auth": classify_reply(535, "5.7.3 Authentication unsuccessful"),
                       "daily": classify_reply(450, "4.5.102 quota")}[feedback]
            states[decision.account] = after_reply(states[decision.account], verdict, decision.at, cfg)
    check_windows(cfg, sent)


def test_preview_backlog_is_booked_back_to_back_across_accounts_and_spread_over_seconds():
    cfg = PacingConfig(limits=PROFILES["preview-2024"], margin_seconds=1.0, bookings_per_second=4)
    states = {a: AccountState(a) for a in ACCOUNTS}
    tenant = TenantState()
    rng = random.Random(7)
    slots = []
    for _ in range(90):  # 90 external messages, 3 accounts x 10 per minute -> 3 minutes of slots
        decision = decide(list(states.values()), tenant, Shape(0, 1), START, cfg, rng)
        assert isinstance(decision, Grant)
        states[decision.account], tenant = decision.account_state, decision.tenant_state or tenant
        slots.append(decision.at)
    assert slots.count(START) == 30  # a full minute's worth at once
    booked = [t for t in slots if t > START]
    # No second gets more than 4 bookings, so the queue hands the host a few messages at a time...
    assert max(booked.count(t) for t in booked) == 4
    # ...at the cost of a few seconds once: the third minute starts 2 windows (plus margins) later.
    assert min(booked) == START + 61 and max(slots) - START <= 2 * 61 + 30 / 4 + 1


def test_budget_stops_sending_until_the_next_daily_window():
    cfg = PacingConfig(limits=PROFILES["ga-2026"], daily_recipient_budget=10)
    states = {a: AccountState(a) for a in ACCOUNTS}
    tenant = TenantState()
    granted = 0
    for i in range(15):
        decision = decide(list(states.values()), tenant, Shape(1, 0), START + i, cfg, random.Random(i))
        if isinstance(decision, Grant):
            states[decision.account], tenant = decision.account_state, decision.tenant_state or tenant
            granted += 1
        else:
            assert isinstance(decision, Wait) and decision.until == cfg.day_end(cfg.day_of(START))
            assert "budget" in decision.reason
    assert granted == 10
    next_day = decide(list(states.values()), tenant, Shape(1, 0), cfg.day_end(cfg.day_of(START)), cfg)
    assert isinstance(next_day, Grant)


def test_preferred_account_is_honoured_when_it_has_capacity():
    cfg = PacingConfig(limits=PROFILES["preview-2024"])
    states = [AccountState(a) for a in ACCOUNTS]
    decision = decide(states, TenantState(), Shape(1, 1, "c@contoso.com"), START, cfg)
    assert isinstance(decision, Grant) and decision.account == "c@contoso.com"


def test_unhealthy_and_cooling_accounts_are_skipped():
    cfg = PacingConfig(limits=PROFILES["ga-2026"])
    states = [AccountState("a@contoso.com", unhealthy_until=START + 100),
              AccountState("b@contoso.com", cooldown_until=START + 50), AccountState("c@contoso.com")]
    for seed in range(10):
        decision = decide(states, None, Shape(1, 0), START, cfg, random.Random(seed))
        assert isinstance(decision, Grant) and decision.account == "c@contoso.com"


def test_external_under_ga_is_impossible_not_deferred():
    decision = decide([AccountState("a@contoso.com")], None, Shape(0, 1), START, PacingConfig(limits=PROFILES["ga-2026"]))
    assert isinstance(decision, Impossible)


def test_daily_quota_reply_rests_the_account_until_its_window_resets():
    cfg = PacingConfig(limits=PROFILES["preview-2024"], day_offset_seconds=3600)
    state = after_reply(AccountState("a@contoso.com"), classify_reply(450, "4.5.102 quota"), START, cfg)
    assert state.cooldown_until == cfg.day_end(cfg.day_of(START))
    assert (state.cooldown_until - 3600) % DAY == 0


def test_chunks_keep_order_and_size():
    rcpts = [f"u{i}@contoso.com" for i in range(120)]
    chunks = chunk_recipients(rcpts, 50)
    assert [len(c) for c in chunks] == [50, 50, 20] and sum(chunks, []) == rcpts
    assert chunk_recipients(rcpts[:3], None) == [rcpts[:3]]


# --- busy: accounts the caller has no SMTP session free for -----------------------------------

def test_a_slot_now_goes_only_to_an_account_the_caller_has_a_session_free_for():
    from shared.governor.pacing import NO_SESSION

    cfg = PacingConfig(limits=PROFILES["preview-2024"])
    states = [AccountState(a) for a in ACCOUNTS]
    for seed in range(40):
        rng = random.Random(seed)
        got = decide(states, None, Shape(0, 1, preferred_account=ACCOUNTS[0]), START, cfg, rng, busy={ACCOUNTS[0]})
        assert isinstance(got, Grant) and got.account != ACCOUNTS[0] and got.at == START
    every = decide(states, None, Shape(0, 1), START, cfg, random.Random(1), busy=set(ACCOUNTS))
    assert every == Wait(until=START, reason=NO_SESSION)


def test_busy_accounts_do_not_change_a_booking_their_session_is_taken_at_the_slot():
    cfg = PacingConfig(limits=PROFILES["preview-2024"])
    full = AccountState(ACCOUNTS[0], external_slots=tuple(START - 30 + i for i in range(10)),
                        slots=tuple(START - 30 + i for i in range(10)))
    plain = decide([full], None, Shape(0, 1), START, cfg, random.Random(3))
    busy = decide([full], None, Shape(0, 1), START, cfg, random.Random(3), busy={ACCOUNTS[0]})
    assert isinstance(plain, Grant) and plain.at > START
    assert busy == plain


# --- room behind slots that have come due ---------------------------------------------------

def _first_window_granted() -> AccountState:
    """One account whose ten external slots of this minute were granted now, a moment ago."""
    granted = tuple(START + i / 10 for i in range(10))
    return AccountState(ACCOUNTS[0], slots=granted, external_slots=granted)


def _book_then_retake(cfg: PacingConfig, late_by: float) -> tuple[Grant, Grant | Wait]:
    """The next window booked right behind the first grant, then that grant taken again `late_by`
    after its slot (its message reached MAIL FROM that late), as the stage's recheck does."""
    from shared.governor.pacing import Release

    booked = decide([_first_window_granted()], None, Shape(0, 1), START + 1, cfg, random.Random(1))
    assert isinstance(booked, Grant) and booked.at > START + 1
    retaken = decide([booked.account_state], None, Shape(0, 1), START + late_by, cfg, random.Random(1),
                     allow_booking=False, release=Release(ACCOUNTS[0], START, Shape(0, 1)))
    assert isinstance(retaken, (Grant, Wait))
    return booked, retaken


def test_a_booking_behind_a_slot_come_due_leaves_room_for_that_slot_to_be_taken_again_late():
    cfg = PacingConfig(limits=PROFILES["preview-2024"], lapse_room_seconds=2.0)
    booked, retaken = _book_then_retake(cfg, late_by=1.8)
    assert booked.at == START + cfg.window + 2.0
    assert isinstance(retaken, Grant) and retaken.at == START + 1.8


def test_without_room_a_grant_that_reached_mail_from_late_cannot_be_taken_again():
    # What the room is for: packed tight, the late grant has no place left in its window.
    cfg = PacingConfig(limits=PROFILES["preview-2024"], lapse_room_seconds=0.0)
    booked, retaken = _book_then_retake(cfg, late_by=1.8)
    assert booked.at == START + cfg.window
    assert isinstance(retaken, Wait) and retaken.until > START + 1.8


def test_a_slot_that_comes_due_at_the_very_moment_of_the_decision_has_come_due():
    # "At or before the decision": the window's first grant is dated exactly now.
    cfg = PacingConfig(limits=PROFILES["preview-2024"], lapse_room_seconds=2.0)
    booked = decide([_first_window_granted()], None, Shape(0, 1), START, cfg, random.Random(1))
    assert isinstance(booked, Grant) and booked.at == START + cfg.window + 2.0


def test_behind_the_queue_backlog_a_booking_behind_a_slot_still_ahead_gets_no_room():
    # The backlog floor puts the search later than a booking still ahead of the decision; that
    # booking has not come due (its request takes its session first), so no room behind it.
    cfg = PacingConfig(limits=PROFILES["preview-2024"], lapse_room_seconds=2.0)
    ahead = (START + 50,) + (START + 50 + cfg.window - 1,) * 9
    state = AccountState(ACCOUNTS[0], slots=ahead, external_slots=ahead, cooldown_until=START + 30)
    booked = decide([state], None, Shape(0, 1), START, cfg, random.Random(1), book_not_before=START + 60)
    # From the cooling-down account's opening (+30) the backlog's own mail takes the window, so the
    # search starts one window and the slack later (+97), inside the window of the ten bookings.
    assert isinstance(booked, Grant) and booked.at == START + 50 + cfg.window


def test_a_booking_behind_a_slot_still_ahead_gets_no_room():
    # Booked requests take their session before the slot; a window of bookings stays packed.
    cfg = PacingConfig(limits=PROFILES["preview-2024"], lapse_room_seconds=2.0)
    ahead = tuple(START + 30 + i / 10 for i in range(10))
    state = AccountState(ACCOUNTS[0], slots=ahead, external_slots=ahead)
    booked = decide([state], None, Shape(0, 1), START, cfg, random.Random(1))
    assert isinstance(booked, Grant) and booked.at == START + 30 + cfg.window
