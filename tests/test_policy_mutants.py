"""Pure rules the mutation run (tools/mutation.sh) found untested: which account the plain path
picks and how long it defers, what a lone surrogate's refusal may name, the ledger's reason for a
scheduled request. Fast and pure, like the rest of setup.cfg's [mutmut] selection."""

from __future__ import annotations

import random
import re
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.delivery.policy import (
    TraceConfig,
    _ceil_seconds,
    count_delta,
    delivery_rates,
    graph_time,
    is_open,
    retry_at,
    row_problem,
)
from shared.governor.pacing import (
    OPENING_SLACK_SECONDS,
    AccountState,
    Grant,
    PacingConfig,
    Shape,
    Wait,
    _after_backlog,
    decide,
)
from shared.hve.limits import PROFILES
from shared.governor.scheduler import Go, Later, plain_decision
from shared.send.contract import (
    MAX_JSON_DEPTH,
    QUEUE_MESSAGE_BUDGET,
    RequestRefused,
    _check_tree,
    _safe_path,
    ValidationPolicy,
    check_blob_url,
    check_id_claim,
    check_send_at,
    claim_check_of,
    content_digest,
    decode_queue_body,
    fits_on_queue,
    id_proof,
    queue_text,
    validate_request,
)
from shared.send.send_at import BadSendAt, held_reason, parse_send_at
from shared.welcome.policy import (
    GraphUser,
    Template,
    TemplateError,
    Templates,
    needs_group_check,
    parse_graph_time,
    span,
)
from shared.welcome.policy import decide as welcome_decide

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


# --- the contract's keyed digests and its refusal codes -----------------------------------------


def test_the_content_digest_is_the_same_across_releases_and_key_orders():
    # Ledger rows keep it: a redelivery after an upgrade must still match its row (`duplicate`,
    # not `id-conflict`), so the canonical text and the key's context string are fixed.
    doc = {"to": ["ann@contoso.com"], "subject": "Привет", "text": "x", "id": "r1"}
    assert content_digest(b"k", doc) == "11a614300e74aa663d3c8deae7134df1"
    assert content_digest(b"k", dict(reversed(list(doc.items())))) == "11a614300e74aa663d3c8deae7134df1"


def test_an_id_proof_is_the_same_across_releases():
    # Copies the relay re-enqueued before an upgrade carry proofs made by the release before.
    assert id_proof(b"k", "r-1") == "589986a8a24ad44c4fcd760e7375405e"


@pytest.mark.parametrize("url", ["https://a.blob.core.windows.net/c/x\\y", "https://a.blob.core.windows.net/c/x%5Cy"])
def test_a_blob_url_with_a_backslash_is_refused_with_the_callers_field_and_reason(url):
    with pytest.raises(RequestRefused) as refused:
        check_blob_url("attachments[0].blobUrl", url, "bad-attachment")
    assert (refused.value.reason, refused.value.detail) == (
        "bad-attachment", "attachments[0].blobUrl must not contain a backslash")
    with pytest.raises(RequestRefused) as refused:
        claim_check_of({"claimCheck": {"blobUrl": url}, "id": "r-1"})
    assert (refused.value.reason, refused.value.detail) == (
        "claim-check", "claimCheck.blobUrl must not contain a backslash")


def test_a_claim_check_stub_may_carry_the_relays_id_proof():
    stub = {"claimCheck": {"blobUrl": "https://a.blob.core.windows.net/c/requests/p/r-1/request.json"},
            "id": "r-1", "attempt": 2, "idProof": "0" * 32}
    assert claim_check_of(stub).id == "r-1"


def test_json_too_deep_or_with_a_number_too_large_to_read_is_malformed_and_says_which():
    with pytest.raises(RequestRefused) as refused:
        decode_queue_body(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert (refused.value.reason, refused.value.detail) == ("malformed", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    with pytest.raises(RequestRefused) as refused:
        decode_queue_body(b'{"a":' + b"9" * 5000 + b"}")
    assert (refused.value.reason, refused.value.detail) == ("malformed", "JSON holds a number too large to read")


def test_a_base64_copy_fits_on_the_queue_up_to_the_budget_exactly():
    fits = QUEUE_MESSAGE_BUDGET // 4 * 3  # base64 makes 4 bytes of every 3
    assert fits_on_queue("x" * fits, base64_encoded=True)
    assert not fits_on_queue("x" * (fits + 1), base64_encoded=True)
    assert fits_on_queue("x" * QUEUE_MESSAGE_BUDGET) and not fits_on_queue("x" * (QUEUE_MESSAGE_BUDGET + 1))


# --- delivery confirmation's small rules ----------------------------------------------------------


def test_a_trace_bound_is_written_in_utc_to_the_second_and_a_naive_one_is_refused():
    cet = timezone(timedelta(hours=1))
    assert graph_time(datetime(2026, 12, 2, 4, 0, 30, 999999, tzinfo=cet)) == "2026-12-02T03:00:30Z"
    with pytest.raises(ValueError, match="^a trace bound must be timezone-aware$"):
        graph_time(datetime(2026, 12, 2, 4, 0))


def test_a_bound_is_rounded_up_to_the_next_whole_second_unless_it_is_one():
    at = datetime(2026, 12, 2, 3, 0, 5, tzinfo=UTC)
    assert _ceil_seconds(at) == at
    assert _ceil_seconds(at + timedelta(microseconds=1)) == at + timedelta(seconds=1)


def test_a_request_is_open_while_any_recipient_is_pending_or_getting_status():
    assert is_open(["delivered", "pending"]) and is_open(["gettingStatus"])
    assert not is_open(["delivered", "failed"]) and not is_open([])


def test_rates_name_each_final_status_and_are_rounded_to_four_places():
    rates = delivery_rates({"delivered": 2, "filteredAsSpam": 1})
    assert rates["filteredAsSpam"] == 0.3333 and rates["delivered"] == 0.6667 and rates["traced"] == 3


def test_deltas_count_a_status_that_appears_or_disappears():
    assert count_delta({"pending": 2}, {"delivered": 2}) == {"delivered": 2, "pending": -2}


@pytest.mark.parametrize("field", ["status", "id", "senderAddress"])
def test_a_row_whose_optional_field_is_not_text_is_named(field):
    row = {"messageId": "<m@x>", "recipientAddress": "a@b.c", "receivedDateTime": "2026-12-02T03:00:00Z", field: 5}
    assert row_problem(row) == f"{field} is not a string"


def test_a_429_waits_its_retry_after_at_least_a_second_and_at_most_the_cap():
    now = datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    assert retry_at(now, 1.5) == now + timedelta(seconds=1.5)
    assert retry_at(now, 0.2) == now + timedelta(seconds=1)
    assert retry_at(now, 30.0, cap=timedelta(0)) == now + timedelta(seconds=1)


@pytest.mark.parametrize("bad", [dict(span=timedelta(0)), dict(max_age=timedelta(0))])
def test_a_trace_config_with_an_empty_span_or_max_age_is_refused(bad):
    with pytest.raises(ValueError, match=r"^the trace (span|max age) must be more than 0"):
        TraceConfig(**bad)


# --- the welcome scan's small rules ---------------------------------------------------------------


def _user(**changes):
    base = dict(id="u1", display_name="Ann Lee", given_name="Ann", user_principal_name="ann@contoso.com",
                mail="ann@contoso.com", created=datetime(2026, 12, 1, tzinfo=UTC), account_enabled=True,
                user_type="Member")
    return GraphUser(**{**base, **changes})


@pytest.mark.parametrize(("delta", "text"), [
    (timedelta(seconds=1), "1 second"), (timedelta(seconds=45), "45 seconds"), (timedelta(seconds=90), "90 seconds"),
    (timedelta(minutes=90), "90 minutes"), (timedelta(hours=1), "1 hour"), (timedelta(hours=36), "1.5 days"),
    (timedelta(days=7), "7 days"),
])
def test_a_duration_is_said_in_the_largest_whole_unit_and_days_may_be_fractional(delta, text):
    assert span(delta) == text


@pytest.mark.parametrize(("user", "group", "needed"), [
    (_user(), "g1", True),
    (_user(), "", False),
    (_user(user_type="Guest"), "g1", False),
    (_user(account_enabled=False), "g1", False),
    (_user(mail=""), "g1", False),
])
def test_the_group_is_read_only_when_membership_could_change_the_decision(user, group, needed):
    assert needs_group_check(user, group) is needed


def test_graph_times_with_z_are_utc():
    assert parse_graph_time("2026-12-02T03:00:00Z") == datetime(2026, 12, 2, 3, 0, tzinfo=UTC)
    assert parse_graph_time("2026-12-02T04:00:00+01:00") == datetime(2026, 12, 2, 3, 0, tzinfo=UTC)


def test_every_decision_names_its_user():
    now = datetime(2026, 12, 2, tzinfo=UTC)
    for user in (_user(), _user(user_type="Guest"), _user(mail=""), _user(mail="", created=None)):
        assert welcome_decide(user, now, timedelta(days=7), first_seen=now - timedelta(days=30)).user == user


# --- bookings behind a backlog (pacing's `_after_backlog` and the end of the day) ---------------

PREVIEW_CFG = PacingConfig(limits=PROFILES["preview-2024"], margin_seconds=1.0)  # a window of 61 s
DAY_START = 1_799_884_800.0  # 2027-01-15 00:00 UTC


def test_an_opening_exactly_whole_windows_before_the_backlogs_end_is_the_last_one_skipped():
    # Openings at +0, +61 and +122: the backlog ends at +122 exactly, so it takes +0 and +61, and
    # the booking goes after the opening at +122 (the backlog's last), a slack after it.
    w = PREVIEW_CFG.window
    assert _after_backlog(1000.0, 1000.0 + 2 * w, 1000.0 + 2 * w, PREVIEW_CFG) == 1000.0 + 2 * w + OPENING_SLACK_SECONDS


def test_with_no_opening_left_to_the_backlog_the_booking_waits_only_for_the_floor():
    assert _after_backlog(1000.0, 1003.0, 1000.0, PREVIEW_CFG) == 1003.0
    assert _after_backlog(1000.0, 1000.5, 1000.0, PREVIEW_CFG) == 1000.5
    assert _after_backlog(1000.0, 1003.0, 990.0, PREVIEW_CFG) == 1003.0


def _external_full(account: str, at: float) -> AccountState:
    slots = tuple(at + i * 0.1 for i in range(10))
    return AccountState(account=account, external_slots=slots, day=PREVIEW_CFG.day_of(at), external_today=10,
                        messages_today=10)


def test_behind_a_backlog_the_account_free_soonest_after_it_is_booked():
    now = DAY_START + 3600
    # a's window opens at +61 s, b's at +81 s; the backlog lasts until +100 s and takes both
    # openings: a's next one (+122 s) then comes first, b's (+142 s) too late to be near it. a,
    # listed second, is booked after its opening, a slack after it.
    states = [_external_full("b@contoso.com", now + 20), _external_full("a@contoso.com", now)]
    for seed in range(8):
        decision = decide(states, None, Shape(0, 1), now + 1, PREVIEW_CFG, random.Random(seed),
                          book_not_before=now + 100, backlog_until=now + 100)
        assert isinstance(decision, Grant) and decision.account == "a@contoso.com", seed
        assert decision.at == pytest.approx(now + 2 * PREVIEW_CFG.window + OPENING_SLACK_SECONDS), seed


def test_a_backlog_lasting_past_the_end_of_the_day_waits_for_the_first_slot_after_it():
    now = DAY_START + 86_400 - 30  # 30 s before the daily windows turn
    states = [_external_full("a@contoso.com", now - 50)]
    decision = decide(states, None, Shape(0, 1), now, PREVIEW_CFG, random.Random(1),
                      book_not_before=now + 600, backlog_until=now + 600)
    # The window opens at +11 s; the backlog takes it; the booking would go after the next opening
    # (+72 s) and a slack: 47 s into the next day, which is waited for, not booked.
    assert decision == Wait(until=DAY_START + 86_400 + 47, reason="")


def test_a_backlog_ending_exactly_at_the_end_of_the_day_waits_for_the_next_day():
    now = DAY_START + 86_400 - 7200  # two hours before the daily windows turn: past the booking horizon
    states = [_external_full("a@contoso.com", now - 50)]
    # The backlog's end is known (`backlog_until` now) but the floor is the end of the day: the
    # first slot is the turn of the day itself, which is not today's to book.
    decision = decide(states, None, Shape(0, 1), now, PREVIEW_CFG, random.Random(1),
                      book_not_before=DAY_START + 86_400, backlog_until=now)
    assert decision == Wait(until=DAY_START + 86_400, reason="")


# --- sendAt offsets and fractions ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "utc"), [
    ("2026-03-10T23:59:00+23:59", "2026-03-10T00:00:00"),
    ("2026-03-10T05:59:00+05:59", "2026-03-10T00:00:00"),
    ("2026-03-10T00:00:00-23:00", "2026-03-10T23:00:00"),
])
def test_send_at_takes_every_offset_up_to_23_59(text, utc):
    assert parse_send_at(text) == datetime.fromisoformat(utc + "+00:00").timestamp()


@pytest.mark.parametrize("text", ["2026-03-10T00:00:00+00:60", "2026-03-10T00:00:00+24:00"])
def test_send_at_with_an_offset_past_23_59_is_refused(text):
    with pytest.raises(BadSendAt):
        parse_send_at(text)


def test_send_at_with_more_than_six_digits_of_fraction_keeps_the_microseconds():
    assert parse_send_at("2026-03-10T08:05:09.1234567Z") == parse_send_at("2026-03-10T08:05:09.123456Z")


def test_a_held_requests_reason_is_in_utc_whatever_the_hosts_time_zone(monkeypatch):
    at = datetime(2026, 3, 10, 8, 5, 9, tzinfo=UTC).timestamp()
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        assert held_reason(at) == "scheduled: not before 2026-03-10T08:05:09Z"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_booking_that_spreading_pushes_past_the_end_of_the_day_waits_instead():
    # a's next slot is a second before the daily windows turn; that second already has its one
    # booking (b's, resting after it), so the spread would put a's at the turn of the day itself,
    # which is not today's: a wait for the slot, as if nothing were spread.
    end = DAY_START + 86_400
    cfg = PacingConfig(limits=PROFILES["preview-2024"], margin_seconds=1.0, bookings_per_second=1)
    a = AccountState("a@contoso.com", external_slots=tuple(end - 62 + i * 0.1 for i in range(10)),
                     day=cfg.day_of(end - 100), external_today=10, messages_today=10)
    b = AccountState("b@contoso.com", external_slots=(end - 0.7,), day=cfg.day_of(end - 100), external_today=1,
                     messages_today=1, cooldown_until=end + 1000)
    decision = decide([a, b], None, Shape(0, 1), end - 100, cfg, random.Random(1))
    assert isinstance(decision, Wait) and decision.until == end - 1 and decision.reason


# --- the contract's refusals say what and where -------------------------------------------------

CONTRACT_POLICY = ValidationPolicy(accounts=frozenset({"news@contoso.com"}), internal_domains=frozenset({"contoso.com"}),
                                   external_allowed=False, max_recipients=5)


def _refused(doc):
    with pytest.raises(RequestRefused) as refused:
        validate_request(doc, CONTRACT_POLICY)
    return refused.value.reason, refused.value.detail


def _mail(**extra):
    return {"to": ["ann@contoso.com"], "subject": "Hello", "text": "Hi", **extra}


def test_blob_url_attachments_need_the_requests_id_and_no_backslash():
    blob = "https://a.blob.core.windows.net/relay/requests/p/r-1/a.pdf"
    assert _refused(_mail(attachments=[{"name": "a.pdf", "blobUrl": blob}])) == (
        "bad-attachment", "a request with blobUrl attachments needs an id (its blobs are under requests/<producer>/<id>/)")
    assert _refused(_mail(id="r-1", attachments=[{"name": "a.pdf", "blobUrl": blob + "\\x"}])) == (
        "bad-attachment", "attachments[0].blobUrl must not contain a backslash")


def test_an_address_shaped_category_is_refused_saying_why():
    assert _refused(_mail(category="ann@contoso.com")) == (
        "address-shaped", "category looks like it holds a mail address; categories are stored, "
        "logged and aggregated in clear, so they must not")


def test_the_requested_lane_is_kept():
    assert validate_request(_mail(priority="high"), CONTRACT_POLICY).priority == "high"


def test_a_send_at_too_far_ahead_says_how_far_and_why():
    request = validate_request(_mail(sendAt="2026-03-20T12:00:00Z"), CONTRACT_POLICY)
    with pytest.raises(RequestRefused) as refused:
        check_send_at(request, datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp())
    assert (refused.value.reason, refused.value.detail) == (
        "send-at-too-far", "sendAt is 240.0 hours ahead; at most 7 days (168 hours) ahead, "
        "the storage queue's longest visibility timeout")


def test_a_relay_id_without_the_relays_proof_is_refused_saying_whose_ids_they_are():
    with pytest.raises(RequestRefused) as refused:
        check_id_claim({}, "welcome-1", b"k")
    assert (refused.value.reason, refused.value.detail) == (
        "reserved-id", "ids of the form 'c-' + 32 hex digits or 'welcome-...' are given by the relay itself; "
        "a producer chooses another id (or none)")


@pytest.mark.parametrize(("path", "named"), [("attachments[0].contentType", "attachments[0].contentType"),
                                             ("attachments[1].contentBase64", "attachments[1].contentBase64")])
def test_attachment_fields_are_named_in_a_refusal(path, named):
    assert _safe_path(path) == named


def test_a_field_name_with_a_lone_surrogate_is_a_bad_encoding():
    with pytest.raises(RequestRefused) as refused:
        _check_tree({"\ud800": "v"})
    assert refused.value.reason == "bad-encoding"


def test_objects_count_towards_the_nesting_limit_like_lists():
    def nested(levels):
        doc: object = "x"
        for _ in range(levels - 1):
            doc = {"a": doc}
        return doc
    _check_tree(nested(MAX_JSON_DEPTH))
    with pytest.raises(RequestRefused):
        _check_tree(nested(MAX_JSON_DEPTH + 1))


def test_a_queue_message_with_a_lone_surrogate_is_refused_not_raised():
    for body in ('{"text":"a\\ud800"}', '{"text":"a\ud800"}'):
        with pytest.raises(RequestRefused):
            decode_queue_body(body)


def test_a_lone_surrogate_has_a_digest_and_keeps_its_escape_on_the_queue():
    assert re.fullmatch(r"[0-9a-f]{32}", content_digest(b"k", {"text": "a\ud800"}))
    assert queue_text({"a": "\ud800", "b": 1}) == '{"a":"\\ud800","b":1}'


def test_a_graph_user_keeps_every_field_graph_gave_as_text():
    user = GraphUser.from_graph({"id": 7, "displayName": "Ann Lee", "givenName": "Ann",
                                 "userPrincipalName": "ann@contoso.com", "mail": " ann@contoso.com ",
                                 "createdDateTime": "2026-08-14T09:30:12Z", "accountEnabled": True, "userType": "Guest"})
    assert user == GraphUser(id="7", display_name="Ann Lee", given_name="Ann", user_principal_name="ann@contoso.com",
                             mail="ann@contoso.com", created=datetime(2026, 8, 14, 9, 30, 12, tzinfo=UTC),
                             account_enabled=True, user_type="Guest")
    empty = GraphUser.from_graph({"id": "y", "displayName": None, "givenName": None, "userPrincipalName": None,
                                  "mail": None, "userType": None, "accountEnabled": "true"})
    assert empty == GraphUser("y", "", "", "", "", None, False, "")


def test_templates_are_named_after_their_files_and_only_the_html_one_escapes():
    templates = Templates.from_sources({"subject": "  Welcome {{first_name}}\n", "text": "Hi {{display_name}}\n",
                                        "html": "<p>{{display_name}}</p>"})
    assert templates.subject == Template("welcome.subject.txt", "Welcome {{first_name}}")
    assert templates.text == Template("welcome.txt", "Hi {{display_name}}\n")
    assert templates.html == Template("welcome.html", "<p>{{display_name}}</p>", escape_html=True)
    with pytest.raises(TemplateError, match=r"^missing welcome template\(s\): welcome.txt, welcome.html$"):
        Templates.from_sources({"subject": "x"})
