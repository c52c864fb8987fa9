"""The arithmetic of the next-free experiment (bench/next_free.py): a per-account next-free time with
no bookings. It lost to the bookings (docs/governor.md, "Bookings or next-free time") and lives in
bench/ so the comparison can be re-run; these tests keep it honest while it does."""

from __future__ import annotations

import random

from bench.next_free import next_opening, visibility_delay
from shared.governor.pacing import AccountState, PacingConfig, Shape, take_slot
from shared.hve.limits import resolve_limits

NOW = 1_799_920_800.0
CFG = PacingConfig(limits=resolve_limits("preview-2024", {}), margin_seconds=2.0)
EXTERNAL = Shape(0, 1)
INTERNAL = Shape(1, 0)


def _sent(account: str, times: list[float], shape: Shape = EXTERNAL) -> AccountState:
    state = AccountState(account)
    for t in times:
        state, _ = take_slot(state, None, shape, t, t, CFG, 2)
    return state


def test_an_account_with_room_now_means_no_wait():
    assert next_opening([_sent("a", [NOW - 5.0] * 9)], EXTERNAL, NOW, CFG) is None
    assert next_opening([_sent("a", [NOW - 5.0 + i for i in range(10)]), AccountState("b")], EXTERNAL, NOW, CFG) is None


def test_a_full_window_waits_for_its_first_slot_to_leave_the_window_plus_the_margin():
    full = _sent("a", [NOW - 30.0 + i for i in range(10)])  # ten external slots, NOW-30 .. NOW-21
    wait = next_opening([full], EXTERNAL, NOW, CFG)
    assert wait is not None and wait.until == NOW - 30.0 + 62.0
    assert "external messages per minute" in wait.reason
    # The earliest opening of any account: b's first slot leaves before a's.
    other = _sent("b", [NOW - 50.0 + i for i in range(10)])
    assert next_opening([full, other], EXTERNAL, NOW, CFG).until == NOW - 50.0 + 62.0
    # An internal message is not held by the external window (30 a minute of any kind).
    assert next_opening([full], INTERNAL, NOW, CFG) is None


def test_nothing_is_reserved_every_request_deciding_on_the_same_rows_gets_the_same_opening():
    # No bookings: a crowd deciding on the same state is sent to one instant (the jitter spreads it).
    full = [_sent("a", [NOW - 30.0 + i for i in range(10)]), _sent("b", [NOW - 20.0 + i for i in range(10)])]
    assert {next_opening(full, EXTERNAL, NOW, CFG).until for _ in range(50)} == {NOW + 32.0}


def test_the_visibility_delay_is_whole_seconds_never_before_the_opening_and_at_most_the_jitter_after():
    rng = random.Random(5)
    for until in (NOW + 0.2, NOW + 31.4, NOW + 62.0):
        delays = [visibility_delay(until, NOW, 2.0, rng) for _ in range(200)]
        assert all(isinstance(d, int) and NOW + d >= until for d in delays)
        assert max(delays) <= until - NOW + 3.0
        assert len(set(delays)) >= 2  # spread, not one instant
    assert visibility_delay(NOW - 5.0, NOW, 0.0, rng) == 1  # an opening already past: back in a second
    assert visibility_delay(NOW + 10.0, NOW, 0.0, rng) == 10
