"""Limits, backoff and the MIME message, exactly: the arithmetic at its edges with a random source
pinned to the ends of its range, the override rules with their messages, and the message on the wire."""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime, timezone
from email import message_from_bytes, policy

import pytest

from shared.send.contract import Address, MailRequest
from shared.hve.limits import PROFILES, resolve_limits
from shared.send.mime import build_message, message_id
from shared.send.retry import MAX_JITTER_SECONDS, MAX_VISIBILITY_SECONDS, retry_delay, visibility_for


class Low:
    """A random source that always answers the low end of the range it is asked for."""

    def uniform(self, a: float, b: float) -> float:
        return a


class High:
    def uniform(self, a: float, b: float) -> float:
        return b


# --- retry ------------------------------------------------------------------------------------

@pytest.mark.parametrize("attempt,low,high", [(0, 15, 30), (1, 15, 30), (2, 30, 60), (3, 60, 120), (4, 120, 240),
                                              (7, 960, 1920), (8, 1800, 3600), (30, 1800, 3600)])
def test_backoff_is_equal_jitter_over_a_doubling_capped_ceiling(attempt, low, high):
    assert retry_delay(attempt, 30, 3600, Low()) == low
    assert retry_delay(attempt, 30, 3600, High()) == high


def test_backoff_never_hides_a_message_past_the_queue_maximum():
    assert retry_delay(3, 10 ** 7, 10 ** 8, High()) == MAX_VISIBILITY_SECONDS
    assert 15 <= retry_delay(1, 30, 3600) <= 30  # the module's own random source by default


@pytest.mark.parametrize("wait,fraction,rng,expected", [
    (100, 0.1, High(), 110),       # 10% of the wait...
    (100, 0.1, Low(), 100),
    (1000, 0.1, High(), 1000 + MAX_JITTER_SECONDS),  # ...but at most half a minute
    (5, 0.1, High(), 6),           # ...and at least a second
    (100, 0.0, High(), 100),       # bookings: no jitter at all
    (12.5, 0.0, High(), 13),       # whole seconds, rounded up
    (0.2, 0.0, Low(), 1),
    (-5, 0.0, High(), 0),          # a wait in the past: visible at once
    (10 ** 9, 0.1, High(), MAX_VISIBILITY_SECONDS),
])
def test_visibility_is_the_wait_plus_a_bounded_jitter_in_whole_seconds(wait, fraction, rng, expected):
    assert visibility_for(wait, jitter_fraction=fraction, rng=rng) == expected


def test_visibility_jitters_by_ten_percent_by_default():
    assert visibility_for(100, rng=High()) == 110
    assert 100 <= visibility_for(100) <= 110


# --- limits -----------------------------------------------------------------------------------

def test_an_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError) as info:
        resolve_limits("ga-2027")
    assert str(info.value) == "unknown limits profile 'ga-2027'; known: preview-2024, ga-2026"


def test_overrides_replace_only_the_fields_they_name():
    ga = PROFILES["ga-2026"]
    assert resolve_limits("ga-2026") is ga and resolve_limits("ga-2026", {}) is ga
    changed = resolve_limits("ga-2026", {"external_allowed": True, "messages_per_minute": 0,
                                         "recipients_per_message": None, "external_recipients_per_day": 5})
    assert changed.external_allowed is True and changed.messages_per_minute == 0
    assert changed.recipients_per_message is None and changed.external_recipients_per_day == 5
    assert changed.message_bytes == ga.message_bytes
    assert resolve_limits("ga-2026", {"external_allowed": False}).external_allowed is False


@pytest.mark.parametrize("overrides,message", [
    ({"recipients_per_mesage": 1, "zz": 2}, "HVE_LIMITS has unknown keys: recipients_per_mesage, zz"),
    ({"external_allowed": "yes"}, "HVE_LIMITS.external_allowed must be true or false"),
    ({"external_allowed": 1}, "HVE_LIMITS.external_allowed must be true or false"),
    ({"recipients_per_message": -1}, "HVE_LIMITS.recipients_per_message must be a non-negative integer or null"),
    ({"recipients_per_message": 1.5}, "HVE_LIMITS.recipients_per_message must be a non-negative integer or null"),
    ({"recipients_per_message": "10"}, "HVE_LIMITS.recipients_per_message must be a non-negative integer or null"),
    ({"messages_per_minute": True}, "HVE_LIMITS.messages_per_minute must be a non-negative integer or null"),
])
def test_a_bad_override_is_refused_with_its_message(overrides, message):
    with pytest.raises(ValueError) as info:
        resolve_limits("ga-2026", overrides)
    assert str(info.value) == message


# --- the message ------------------------------------------------------------------------------

NOW = datetime(2026, 3, 10, 12, 30, 5, tzinfo=timezone.utc)


def request(**fields) -> MailRequest:
    base = dict(id="r-1", to=(Address("ann@contoso.com", "Ann Example"),), cc=(), bcc=(Address("eve@contoso.com"),),
                subject="Quarterly update", text="Hello Ann", html=None, attachments=(), account=None,
                category="", headers=())
    base.update(fields)
    return MailRequest(**base)


def build(req: MailRequest, **kwargs) -> bytes:
    args = dict(request_id="r-1", account="news@contoso.com", sender_name="Contoso Relay",
                message_id_domain="Contoso.com", message_id_key=b"k", attachments=[], now=NOW)
    args.update(kwargs)
    return build_message(req, **args)


def test_message_ids_are_a_keyed_digest_of_the_request_id_per_chunk_at_the_lowercased_domain():
    plain = message_id("r-1", "Contoso.COM", key=b"k")
    assert re.fullmatch(r"<[0-9a-f]{40}@contoso\.com>", plain)
    assert message_id("r-1", "contoso.com", 0, key=b"k") == plain
    assert message_id("r-1", "contoso.com", 2, key=b"k") == plain.replace("@", ".2@")
    digest = hmac.new(b"k", "hve-relay message id\x00r-é".encode("utf-8"), hashlib.sha256).hexdigest()
    assert message_id("r-é", "contoso.com", key=b"k") == f"<{digest[:40]}@contoso.com>"


def test_a_message_id_cannot_be_computed_from_the_request_id_alone():
    # Unkeyed, anyone knowing an id (or the text behind a derived one) could mail under its
    # Message-ID first and have Exchange drop the real one as a duplicate.
    assert message_id("r-1", "contoso.com", key=b"k") != message_id("r-1", "contoso.com", key=b"other")
    unkeyed = hashlib.sha256(b"r-1").hexdigest()[:40]
    assert message_id("r-1", "contoso.com", key=b"k") != f"<{unkeyed}@contoso.com>"


def test_a_text_message_is_exactly_this_on_the_wire():
    wire = build(request(cc=(Address("bob@contoso.com"),), headers=(("X-Campaign", "q3"),)))
    expected = (
        b"From: Contoso Relay <news@contoso.com>\r\n"
        b"To: Ann Example <ann@contoso.com>\r\n"
        b"Cc: bob@contoso.com\r\n"
        b"Subject: Quarterly update\r\n"
        b"Date: Tue, 10 Mar 2026 12:30:05 +0000\r\n"
        b"Message-ID: " + message_id("r-1", "contoso.com", key=b"k").encode() + b"\r\n"
        b"X-Campaign: q3\r\n"
        b"Content-Type: text/plain; charset=\"utf-8\"\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n"
        b"MIME-Version: 1.0\r\n"
        b"\r\n"
        b"Hello Ann\r\n"
    )
    assert wire == expected
    assert b"eve@contoso.com" not in wire  # Bcc is envelope only


def test_a_chunk_gets_its_own_message_id():
    wire = build(request(), chunk=3)
    assert b"Message-ID: " + message_id("r-1", "contoso.com", 3, key=b"k").encode() + b"\r\n" in wire


def test_only_bcc_recipients_show_undisclosed_recipients():
    wire = build(request(to=()))
    assert b"\r\nTo: undisclosed-recipients:;\r\n" in wire and b"Cc:" not in wire
    only_cc = build(request(to=(), cc=(Address("bob@contoso.com", "Bob"),)))
    assert b"\r\nCc: Bob <bob@contoso.com>\r\n" in only_cc and b"To:" not in only_cc


def test_the_date_defaults_to_now_in_utc():
    msg = message_from_bytes(build(request(), now=None), policy=policy.default)
    sent = msg["Date"].datetime
    assert sent.utcoffset().total_seconds() == 0
    assert abs((sent - datetime.now(timezone.utc)).total_seconds()) < 24 * 3600


@pytest.mark.parametrize("text,html,kind,bodies", [
    ("Hi", "<p>Hi</p>", "multipart/alternative", [("text/plain", "Hi\r\n"), ("text/html", "<p>Hi</p>\r\n")]),
    (None, "<p>Hi</p>", "text/html", [("text/html", "<p>Hi</p>\r\n")]),
    ("Hi", None, "text/plain", [("text/plain", "Hi\r\n")]),
    (None, None, "text/plain", [("text/plain", "\r\n")]),
])
def test_the_body_is_text_html_or_both_as_alternatives(text, html, kind, bodies):
    msg = message_from_bytes(build(request(text=text, html=html)), policy=policy.default)
    assert msg.get_content_type() == kind
    parts = [msg] if not msg.is_multipart() else list(msg.iter_parts())
    assert [(p.get_content_type(), p.get_content()) for p in parts] == bodies
    assert all(b"text/HTML" not in bytes(p) for p in parts)


def test_attachments_keep_name_type_and_bytes():
    wire = build(request(), attachments=[("report.pdf", "application/pdf", b"%PDF-1.7"),
                                         ("notes.xlsx", "application/vnd.ms-excel", b"n")])
    msg = message_from_bytes(wire, policy=policy.default)
    found = [(a.get_filename(), a.get_content_type(), a.get_payload(decode=True)) for a in msg.iter_attachments()]
    assert found == [("report.pdf", "application/pdf", b"%PDF-1.7"), ("notes.xlsx", "application/vnd.ms-excel", b"n")]
