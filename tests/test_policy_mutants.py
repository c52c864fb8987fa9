"""Pure rules the mutation run (tools/mutation.sh) found untested: which account the plain path
picks and how long it defers, what a lone surrogate's refusal may name, the ledger's reason for a
scheduled request. Fast and pure, like the rest of setup.cfg's [mutmut] selection."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from shared.governor.pacing import AccountState, Shape
from shared.governor.scheduler import Go, Later, plain_decision
from shared.send.contract import MAX_JSON_DEPTH, RequestRefused, _check_tree, _safe_path
from shared.send.send_at import held_reason

NOW = 1_796_000_000.0
A, B = "a@contoso.com", "b@contoso.com"
RESTING = "every account is resting (throttled or unhealthy)"
HELD = "every account is held after a local failure"


# --- the plain path's choice -------------------------------------------------------------------


def test_an_account_whose_rest_ends_now_is_usable_and_sends_now():
    rng = random.Random(1)
    assert plain_decision([AccountState(A, cooldown_until=NOW)], (), Shape(1, 0), NOW, rng) == Go(A, NOW)
    assert plain_decision([AccountState(A, unhealthy_until=NOW)], (), Shape(1, 0), NOW, rng) == Go(A, NOW)


def test_an_account_held_locally_whose_rest_ends_now_is_held_not_resting():
    # Nothing rests past now: the wait is only the spread, at least a second, for the local hold.
    rng = random.Random(2)
    states = [AccountState(A, cooldown_until=NOW)]
    later = [plain_decision(states, {A}, Shape(1, 0), NOW, rng, spread_seconds=2.0) for _ in range(60)]
    assert {d.reason for d in later} == {HELD}
    delays = [d.delay for d in later]
    assert all(1.0 <= d <= 2.0 for d in delays) and delays.count(1.0) >= 10
    assert plain_decision(states, {A}, Shape(1, 0), NOW, rng, spread_seconds=0.0) == Later(1.0, HELD)


def test_while_every_account_rests_the_wait_runs_to_the_first_free_plus_a_share_of_the_spread():
    rng = random.Random(3)
    states = [AccountState(A, cooldown_until=NOW + 10), AccountState(B, unhealthy_until=NOW + 20)]
    later = [plain_decision(states, {B}, Shape(1, 0), NOW, rng, spread_seconds=2.0) for _ in range(40)]
    assert {d.reason for d in later} == {RESTING}
    delays = [d.delay for d in later]
    assert all(10.0 <= d <= 12.0 for d in delays) and min(delays) < 10.5 and max(delays) > 11.5
    assert plain_decision(states, (), Shape(1, 0), NOW, rng, spread_seconds=0.0) == Later(10.0, RESTING)


# --- what a refusal for a lone surrogate may name ----------------------------------------------


@pytest.mark.parametrize(("path", "named"), [
    ("subject", "subject"),
    ("attachments[2].name", "attachments[2].name"),
    ("attachments[0].claimCheck.blobUrl", "attachments[0].claimCheck.blobUrl"),
    ("headers.X-Campaign-Id", "headers.X-Campaign-Id"),
    ("headers.Carol.Private", "headers.?.?"),
    ("carol@contoso.com[3]", "?.?[3]"),
    ("headers.X-", "headers.?"),
    ("", "the request"),
])
def test_a_refusals_path_names_the_contracts_fields_and_masks_every_other_name(path, named):
    assert _safe_path(path) == named


def test_a_lone_surrogate_is_refused_by_where_it_is_never_by_what_it_says():
    with pytest.raises(RequestRefused) as refused:
        _check_tree({"to": ["ann@contoso.com"], "attachments": [{"name": "a"}, {"name": "b\ud800"}]})
    assert refused.value.reason == "bad-encoding"
    assert refused.value.detail.startswith("attachments[1].name is not valid Unicode text")
    with pytest.raises(RequestRefused) as refused:
        _check_tree({"carol.private": "x\udfff"})
    assert "?" in refused.value.detail and "carol" not in refused.value.detail
    with pytest.raises(RequestRefused) as refused:
        _check_tree({"headers": {"X-\ud800": "v"}})
    assert "a field name under headers is not valid Unicode text" in refused.value.detail
    with pytest.raises(RequestRefused) as refused:
        _check_tree({"\ud800": "v"})
    assert "a field name under the request" in refused.value.detail


def test_json_nested_as_deep_as_allowed_passes_and_one_level_more_is_refused():
    def nested(levels):
        doc: object = "x"
        for _ in range(levels - 1):
            doc = [doc]
        return doc
    _check_tree(nested(MAX_JSON_DEPTH))
    with pytest.raises(RequestRefused) as refused:
        _check_tree(nested(MAX_JSON_DEPTH + 1))
    assert refused.value.reason == "malformed" and f"deeper than {MAX_JSON_DEPTH} levels" in refused.value.detail


# --- the ledger's reason for a scheduled request -------------------------------------------------


def test_a_held_requests_reason_is_its_send_at_in_utc_to_the_second():
    at = datetime(2026, 3, 10, 8, 5, 9, 750000, tzinfo=UTC).timestamp()
    assert held_reason(at) == "scheduled: not before 2026-03-10T08:05:09Z"
