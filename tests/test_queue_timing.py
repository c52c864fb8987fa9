"""The queue's timing as a worker sees it (shared/governor/preview/queue_timing.py), and how the governor uses it:
bookings stay behind the visible backlog, and booked messages wake early by what they come back late."""

import random

import pytest

from shared.hve.limits import PROFILES
from shared.governor.pacing import AccountState, Grant, PacingConfig, Shape, decide
from shared.governor.preview.queue_timing import LEAD_SAFETY_FRACTION, LEAD_SAFETY_SECONDS, BacklogEstimator, ReturnLatency

START = 1_799_920_800.0
CFG = PacingConfig(limits=PROFILES["preview-2024"])


def erring_long(drain_seconds: float) -> float:
    return drain_seconds * (1 + LEAD_SAFETY_FRACTION) + LEAD_SAFETY_SECONDS


def estimator() -> BacklogEstimator:
    return BacklogEstimator(sample_seconds=5, min_messages=64, max_lead_seconds=1800)


def test_a_backlog_draining_at_100_per_second_is_empty_in_its_size_over_the_rate():
    e = estimator()
    e.observe(START, queued=20_000, booked_ahead=0)
    e.observe(START + 10, queued=19_500, booked_ahead=500)   # 1,000 handled: 500 sent, 500 booked
    assert e.drain_rate(START + 10) == pytest.approx(100)
    assert e.lead(START + 10) == pytest.approx(erring_long(190))
    # The estimate ages with the clock between samples.
    assert e.lead(START + 40) == pytest.approx(erring_long(190) - 30)


def test_with_a_single_reading_of_a_backlog_the_drain_is_unknown_and_nothing_is_booked_yet():
    """Four instances drain a backlog four times faster than this worker handles messages: its
    own rate alone would put the first bookings four times too far out (and leave the nearer
    windows empty once the backlog is gone). So one reading says 'not known yet'."""
    e = estimator()
    for i in range(300):
        e.note_handled(START + i / 100)
    e.observe(START + 3, queued=20_000, booked_ahead=100)
    assert e.lead(START + 3) is None
    # The second reading gives the rate of all instances together.
    e.observe(START + 4, queued=19_600, booked_ahead=100)
    assert e.lead(START + 4) == pytest.approx(erring_long(19_500 / 400))


def test_a_rate_from_readings_is_never_below_this_workers_own_handling_rate():
    e = estimator()
    for i in range(300):
        e.note_handled(START + i / 100)
    e.observe(START + 2, queued=20_000, booked_ahead=0)
    e.observe(START + 3, queued=20_000, booked_ahead=0)   # arrivals kept pace with handling
    assert e.lead(START + 3) == pytest.approx(erring_long(20_000 / 100), rel=0.02)


def test_a_small_backlog_is_not_congestion():
    e = estimator()
    e.observe(START, queued=70, booked_ahead=10)
    e.observe(START + 5, queued=60, booked_ahead=10)
    assert e.lead(START + 5) == 0.0


def test_a_backlog_that_is_not_draining_and_no_handling_seen_says_nothing():
    e = estimator()
    e.observe(START, queued=5000, booked_ahead=0)
    e.observe(START + 5, queued=5200, booked_ahead=0)
    assert e.lead(START + 5) == 0.0


def test_the_lead_never_exceeds_its_cap():
    e = BacklogEstimator(sample_seconds=5, min_messages=0, max_lead_seconds=600)
    e.observe(START, queued=1_000_000, booked_ahead=0)
    e.observe(START + 10, queued=999_990, booked_ahead=0)
    assert e.lead(START + 10) == 600


def test_sampling_is_due_once_per_interval_and_never_when_off():
    e = estimator()
    assert e.sample_due(START)
    e.observe(START, 100, 0)
    assert not e.sample_due(START + 4.9) and e.sample_due(START + 5)
    off = BacklogEstimator(sample_seconds=0, min_messages=0, max_lead_seconds=600)
    assert not off.sample_due(START) and off.lead(START) == 0.0


def test_booked_messages_wake_early_by_the_95th_percentile_of_their_lateness_capped():
    r = ReturnLatency(max_seconds=3)
    assert r.early_wake() == 3.0  # nothing seen yet: as early as it may wait
    for x in [0.2] * 90 + [1.5] * 10:
        r.observe(x)
    assert r.early_wake() == pytest.approx(1.5)
    for x in [9.0] * 64:
        r.observe(x)
    assert r.early_wake() == 3.0


def test_a_redelivery_minutes_late_or_a_negative_latency_does_not_move_the_wake():
    r = ReturnLatency(max_seconds=3)
    r.observe(0.4)
    r.observe(600.0)
    r.observe(-2.0)
    assert r.early_wake() == pytest.approx(0.4)
    assert ReturnLatency(max_seconds=0).early_wake() == 0.0


def _full_minute(account: str, at: float) -> AccountState:
    # Ten external messages this minute: the next external slot is a minute away.
    slots = tuple(at + i * 0.1 for i in range(10))
    return AccountState(account=account, slots=(), external_slots=slots, day=CFG.day_of(at), external_today=10,
                        messages_today=10)


def test_a_booking_is_never_earlier_than_the_end_of_the_backlog():
    states = [_full_minute("a@contoso.com", START), _full_minute("b@contoso.com", START)]
    plain = decide(states, None, Shape(0, 1), START + 1, CFG, random.Random(1))
    floored = decide(states, None, Shape(0, 1), START + 1, CFG, random.Random(1), book_not_before=START + 200)
    assert isinstance(plain, Grant) and plain.at < START + 70
    assert isinstance(floored, Grant) and floored.at >= START + 200
    # The capacity before the floor is left free: the minute after START is still open for the
    # fresh messages the backlog holds.
    assert all(s < START + 62 for s in floored.account_state.external_slots[:-1])


def test_the_backlog_floor_never_delays_a_message_that_can_go_now():
    states = [AccountState(account="a@contoso.com")]
    decision = decide(states, None, Shape(0, 1), START, CFG, random.Random(1), book_not_before=START + 500)
    assert isinstance(decision, Grant) and decision.at == START


def test_a_booking_behind_a_backlog_leaves_room_for_every_window_the_backlog_can_still_fill():
    """The backlog lasts 200 s and the account's window opens again at +62: its fresh messages
    take it at +62, +124 and +186 (within a few seconds of each). A booking at the floor (+200)
    would close the window the opening at +186 needs (the account would idle 186-200 and that
    wave be lost); it goes after that opening's window instead, at +248 and a few seconds."""
    states = [_full_minute("a@contoso.com", START)]
    floored = decide(states, None, Shape(0, 1), START + 1, CFG, random.Random(1), book_not_before=START + 200)
    assert isinstance(floored, Grant)
    assert START + 4 * CFG.window <= floored.at <= START + 4 * CFG.window + 6
    # Each opening before the floor still takes a whole wave of fresh messages at once.
    state = floored.account_state
    for k in (1, 2, 3):
        for i in range(10):
            now = START + k * CFG.window + 1 + 0.1 * i
            grant = decide([state], None, Shape(0, 1), now, CFG, random.Random(1), allow_booking=False)
            assert isinstance(grant, Grant) and grant.at == now, (k, i, grant)
            state = grant.account_state


def test_an_opening_after_the_plain_estimate_of_the_backlogs_end_is_booked_not_left_empty():
    """Four instances drain 20,000 messages in about 55 s; the floor errs long (to ~66 s), just
    past the account's opening at +62. Skipping that opening (booking at +129) left it empty, as
    no fresh message was left to take it: 87 slots of the second minute unused, a whole extra
    minute at the end of the run. The opening after the plain estimate is booked at the floor."""
    states = [_full_minute("a@contoso.com", START)]
    d = decide(states, None, Shape(0, 1), START + 3, CFG, random.Random(1),
               book_not_before=START + 66, backlog_until=START + 57)
    assert isinstance(d, Grant) and START + 66 <= d.at < START + 70
    # With the backlog really lasting past the opening, the opening is left to it.
    d = decide(states, None, Shape(0, 1), START + 3, CFG, random.Random(1),
               book_not_before=START + 72, backlog_until=START + 64)
    assert isinstance(d, Grant) and d.at >= START + 2 * CFG.window
    # Plain and padded estimates of the same reading.
    e = estimator()
    e.observe(START, queued=20_000, booked_ahead=0)
    e.observe(START + 1, queued=19_600, booked_ahead=0)
    assert e.lead(START + 1, padded=False) == pytest.approx(49)
    assert e.lead(START + 1) == pytest.approx(erring_long(49))
