"""The welcome scan's pure policy: eligibility, windows, templates, the request. No peers."""

from __future__ import annotations

import html
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from shared.send.contract import ValidationPolicy, validate_request
from shared.settings import Settings, SettingsError
from shared.welcome.scan import builtin_templates
from shared.welcome.policy import (
    PENDING,
    SKIP,
    WELCOME,
    GraphUser,
    Links,
    Template,
    TemplateError,
    Templates,
    build_request,
    decide,
    graph_time,
    scan_window,
    span,
)

NOW = datetime(2026, 8, 14, 12, 0, tzinfo=timezone.utc)
DAY, HOUR = timedelta(days=1), timedelta(hours=1)
POLICY = ValidationPolicy(accounts=frozenset({"news@contoso.com"}), internal_domains=frozenset({"contoso.com"}),
                          external_allowed=False, max_recipients=500)


def user(**changes) -> GraphUser:
    base = dict(id="u1", display_name="Ann Example", given_name="Ann", user_principal_name="ann@contoso.com",
                mail="ann@contoso.com", created=NOW - HOUR, account_enabled=True, user_type="Member")
    base.update(changes)
    return GraphUser(**base)


# --- eligibility ----------------------------------------------------------------------------------

def test_enabled_member_with_mail_is_welcomed():
    assert decide(user(), NOW, 3 * DAY).outcome == WELCOME


def test_guest_is_skipped_for_good_even_when_new():
    d = decide(user(user_type="Guest"), NOW, 3 * DAY)
    assert (d.outcome, d.reason) == (SKIP, "guest account (userType Guest)")


@pytest.mark.parametrize("changes,reason", [
    ({"mail": ""}, "no mailbox yet (mail is empty)"),
    ({"account_enabled": False}, "account disabled"),
    ({"account_enabled": False, "mail": ""}, "account disabled; no mailbox yet (mail is empty)"),
])
def test_not_yet_eligible_is_pending_until_the_deadline_then_skipped(changes, reason):
    u = user(**changes)
    d = decide(u, NOW, 3 * DAY)
    assert (d.outcome, d.reason, d.retry_until) == (PENDING, reason, u.created + 3 * DAY)
    late = decide(u, u.created + 3 * DAY, 3 * DAY)
    assert late.outcome == SKIP and late.reason == f"{reason} (still, 3 days after creation)"


def test_mail_that_appears_before_the_deadline_is_welcomed_even_after_it():
    assert decide(user(), NOW + 10 * DAY, 3 * DAY).outcome == WELCOME


def test_group_restriction():
    assert decide(user(), NOW, DAY, group_id="g1", group_members=frozenset({"u1"})).outcome == WELCOME
    d = decide(user(), NOW, DAY, group_id="g1", group_members=frozenset({"u2"}))
    assert (d.outcome, d.reason) == (PENDING, "not a member of group g1")


def test_graph_user_parsing():
    u = GraphUser.from_graph({"id": "x", "displayName": None, "mail": None, "createdDateTime": "2026-08-14T09:30:12Z",
                              "accountEnabled": True, "userType": "Member"})
    assert (u.mail, u.display_name, u.created) == ("", "", datetime(2026, 8, 14, 9, 30, 12, tzinfo=timezone.utc))
    assert GraphUser.from_graph({"id": "y"}).account_enabled is False


# --- windows --------------------------------------------------------------------------------------

def test_first_scan_looks_back_lookback_only():
    w = scan_window(NOW, None, lookback=7 * DAY, overlap=HOUR, pending_for=3 * DAY)
    assert w.first_scan and w.since == NOW - 7 * DAY and "7 days" in w.why


def test_later_scan_overlaps_the_watermark():
    w = scan_window(NOW, NOW - timedelta(minutes=15), lookback=7 * DAY, overlap=HOUR, pending_for=3 * DAY)
    assert not w.first_scan and w.since == NOW - timedelta(minutes=75)


def test_a_long_outage_is_bounded_by_the_lookback():
    w = scan_window(NOW, NOW - 60 * DAY, lookback=7 * DAY, overlap=HOUR, pending_for=3 * DAY)
    assert w.since == NOW - 7 * DAY


def test_window_reaches_back_to_pending_users():
    w = scan_window(NOW, NOW - timedelta(minutes=15), lookback=7 * DAY, overlap=HOUR, pending_for=3 * DAY,
                    oldest_pending=NOW - 2 * DAY)
    assert w.since == NOW - 2 * DAY and "pending" in w.why


aware = st.datetimes(min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(timezone.utc))
durations = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=30))


@given(now=aware, wm_offset=st.timedeltas(min_value=timedelta(days=-90), max_value=timedelta(days=1)),
       lookback=st.timedeltas(min_value=timedelta(minutes=1), max_value=timedelta(days=30)), overlap=durations,
       pending=durations, pending_age=st.one_of(st.none(), durations))
@hsettings(max_examples=300, deadline=None)
def test_window_properties(now, wm_offset, lookback, overlap, pending, pending_age):
    watermark = now + wm_offset
    oldest = None if pending_age is None else now - pending_age
    since = scan_window(now, watermark, lookback=lookback, overlap=overlap, pending_for=pending,
                        oldest_pending=oldest).since
    # Bounded: never the whole tenant.
    assert since >= now - max(lookback, overlap, pending)
    # Covers everything since the last scan (less overlap), within the lookback.
    assert since <= max(watermark - overlap, now - lookback)
    # The latest overlap is always re-read, even after a watermark from a clock that ran ahead.
    assert since <= now - overlap
    # Pending users are re-read while they may still be welcomed.
    if oldest is not None:
        assert since <= max(oldest, now - max(lookback, pending))


@given(now=aware, lookback=st.timedeltas(min_value=timedelta(minutes=1), max_value=timedelta(days=30)))
def test_first_window_is_exactly_the_lookback(now, lookback):
    assert scan_window(now, None, lookback=lookback, overlap=HOUR, pending_for=DAY).since == now - lookback


# --- templates and the request --------------------------------------------------------------------

def test_template_sections_and_unknown_names():
    t = Template("t", "a\n  {{#faq_url}}\n[{{faq_url}}]\n{{/faq_url}}\nb{{^faq_url}} none{{/faq_url}}")
    assert t.render({"faq_url": "x"}) == "a\n[x]\nb"  # a section tag alone on its line takes the line
    assert t.render({"faq_url": ""}) == "a\nb none"
    assert Template("t", "<{{mail}}>", escape_html=True).render({"mail": "<&>"}) == "<&lt;&amp;&gt;>"
    for bad, msg in [("{{nope}}", "unknown variable"), ("{{#mail}}", "not closed"), ("{{/mail}}", "closes no"),
                     ("{{ mail ", "valid tag"), ("{{#mail}}{{/faq_url}}", "closes no")]:
        with pytest.raises(TemplateError, match=msg):
            Template("t", bad)


def test_templates_need_all_three_files():
    with pytest.raises(TemplateError, match="welcome.html"):
        Templates.from_sources({"subject": "s", "text": "t"})


def test_request_shape_and_contract():
    request = build_request(user(), builtin_templates(), Links(faq_url="https://intranet/faq?a=1&b=2",
                                                                support_address="help@contoso.com"),
                            bcc="cs@contoso.com")
    assert request["id"] == "welcome-u1" and request["category"] == "welcome"
    assert request["to"] == ["Ann Example <ann@contoso.com>"] and request["bcc"] == ["cs@contoso.com"]
    assert "from" not in request and "account" not in request  # the relay picks the HVE account
    assert request["subject"] == "Welcome, Ann: your Microsoft 365 account is ready"
    assert 'href="https://intranet/faq?a=1&amp;b=2"' in request["html"]
    assert 'href="mailto:help@contoso.com"' in request["html"]
    assert "https://intranet/faq?a=1&b=2" in request["text"] and "https://outlook.office.com/mail/" in request["text"]
    validated = validate_request(request, POLICY)
    assert validated.to[0].display_name == "Ann Example"


def test_optional_links_leave_no_empty_paragraphs():
    request = build_request(user(), builtin_templates(), Links())
    assert "FAQ" not in request["html"] and "Need help" not in request["text"] and "mailto:" not in request["html"]
    assert "\n\n\n" not in request["text"]


def test_html_injection_in_display_name_is_escaped():
    evil = user(display_name='<img src=x onerror="alert(1)">Eve & Co', given_name="<script>x</script>")
    request = build_request(evil, builtin_templates(), Links())
    assert "<img" not in request["html"] and "<script>" not in request["html"]
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;Eve &amp; Co" in request["html"]
    assert "&lt;script&gt;x&lt;/script&gt;" in request["html"]
    validate_request(request, POLICY)


@given(name=st.text(max_size=80), given_name=st.text(max_size=40))
@hsettings(max_examples=200, deadline=None)
def test_any_display_name_makes_a_valid_escaped_request(name, given_name):
    request = build_request(user(display_name=name, given_name=given_name), builtin_templates(), Links())
    validated = validate_request(request, POLICY)  # never a header-injection refusal
    assert validated.to[0].addr == "ann@contoso.com"
    # No markup from the name survives into the HTML: every < in the body is the template's own.
    plain = build_request(user(display_name="x", given_name="y"), builtin_templates(), Links())
    assert request["html"].count("<") == plain["html"].count("<")
    assert request["html"].count(">") == plain["html"].count(">")
    assert "\n" not in request["subject"] and "\r" not in request["subject"]


# --- settings -------------------------------------------------------------------------------------

def test_welcome_settings_defaults_and_errors():
    s = Settings.from_env({})
    assert (s.welcome_lookback, s.welcome_overlap, s.welcome_pending) == (7 * DAY, HOUR, 3 * DAY)
    assert (s.welcome_state_table, s.welcome_schedule, s.welcome_enabled) == ("hvewelcome", "0 */15 * * * *", False)
    assert Settings.from_env({"WELCOME_LOOKBACK": "P1DT12H", "WELCOME_OVERLAP": "PT30M"}).welcome_lookback == 1.5 * DAY
    for name, bad in [("WELCOME_LOOKBACK", "7 days"), ("WELCOME_OVERLAP", "P1M"), ("WELCOME_LOOKBACK", "PT")]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})
    with pytest.raises(SettingsError, match="WELCOME_PENDING_DAYS"):
        Settings.from_env({"WELCOME_PENDING_DAYS": "-1"})


def test_span_and_graph_time():
    assert [span(7 * DAY), span(HOUR), span(timedelta(minutes=90))] == ["7 days", "1 hour", "90 minutes"]
    assert graph_time(datetime(2026, 8, 14, 9, 30, 12, 500, tzinfo=timezone.utc)) == "2026-08-14T09:30:12Z"
    assert html.escape("x") == "x"
