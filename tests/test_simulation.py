"""The governor against the HVE emulator on an accelerated (virtual) clock — a scaled-down run of
bench/simulate.py (the bench runs the issue's full 20 accounts x 10,000 + 10,000)."""

from bench.simulate import START, simulate


def test_preview_mix_is_sent_without_a_single_throttling_reply_near_the_minimum_makespan(azurite):
    # The 20 accounts, a tenth of its volume (the bench runs 10,000 + 10,000).
    result = simulate(accounts=20, external=1000, internal=1000, profile="preview-2024", azurite=azurite)
    assert result.sent == 2000 and set(result.outcomes) <= {"sent", "deferred"}
    assert result.throttle_replies == {}            # no 4.5.104, 4.5.102 or any other 4xx from HVE
    assert result.theoretical_seconds == 240.0      # 50 external per account at 10 per rolling minute
    assert result.makespan_ratio <= 1.03


def test_daily_budget_stops_sending_and_resumes_in_the_next_window(azurite):
    late = START + 13 * 3600  # 23:00 UTC
    result = simulate(accounts=3, external=0, internal=90, profile="ga-2026", budget=60, start=late, azurite=azurite)
    assert result.sent == 90
    assert list(result.sent_per_day.values()) == [60, 30]
