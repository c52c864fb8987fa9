"""Every HVE reply code in hve-facts.md maps to the right next step."""

import pytest

from shared.send.replies import Outcome, Verdict, classify_reply, connection_lost

CASES = [
    # code, text, outcome, throttled, token_expired, daily
    (250, "2.6.0 <id@x> Queued mail for delivery", Outcome.SENT, False, False, False),
    (450, "4.5.104 Message rejected. Excessive message rate from sender ... rate limit for external emails has been exceeded", Outcome.DEFER, True, False, False),
    (450, "4.5.102 Message rejected. Excessive message rate from sender ... sender's submission tenant quota for external recipients was exceeded", Outcome.DEFER, True, False, True),
    (421, "4.3.2 Service not available, closing transmission channel", Outcome.DEFER, True, False, False),
    (451, "4.7.0 Temporary server error. Please try again later", Outcome.DEFER, False, False, False),
    (550, "5.5.105 External sending is not supported for High Volume Email accounts", Outcome.REFUSE, False, False, False),
    (552, "5.3.4 Message size exceeds fixed maximum message size", Outcome.REFUSE, False, False, False),
    (550, "5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found", Outcome.REFUSE, False, False, False),
    (535, "5.7.139 Authentication unsuccessful, basic auth is blocked", Outcome.ACCOUNT, False, False, False),
    (535, "5.7.139 Authentication unsuccessful, the organization configuration doesn't allow this authentication request", Outcome.ACCOUNT, False, False, False),
    (535, "5.7.3 Authentication unsuccessful", Outcome.ACCOUNT, False, False, False),
    (535, "5.7.142 token about to expire", Outcome.ACCOUNT, False, True, False),
    (535, "5.7.143 token expired", Outcome.ACCOUNT, False, True, False),
    (535, "5.7.144 missing permission", Outcome.ACCOUNT, False, False, False),
    (550, "5.7.240 app not allowed for this HVE account", Outcome.ACCOUNT, False, False, False),
] + [(501, f"5.5.{n} malformed XOAUTH2", Outcome.ACCOUNT, False, False, False) for n in range(121, 127)]


@pytest.mark.parametrize("code,text,outcome,throttled,token_expired,daily", CASES)
def test_hve_reply_is_classified(code, text, outcome, throttled, token_expired, daily):
    verdict = classify_reply(code, text)
    assert (verdict.outcome, verdict.throttled, verdict.token_expired, verdict.daily_quota) == (outcome, throttled, token_expired, daily)
    assert verdict.code == code


def test_enhanced_code_is_extracted():
    assert classify_reply(450, "4.5.104 Message rejected").enhanced == "4.5.104"
    assert classify_reply(554, "Transaction failed").enhanced == ""


def test_unknown_4xx_defers_and_unknown_5xx_refuses():
    assert classify_reply(454, "Try later").outcome is Outcome.DEFER
    assert classify_reply(554, "5.6.0 Content rejected").outcome is Outcome.REFUSE


def test_bare_535_without_enhanced_code_is_an_account_problem():
    assert classify_reply(535, "Authentication failed").outcome is Outcome.ACCOUNT


def test_lost_connection_defers_with_code_zero():
    verdict = connection_lost("reset by peer")
    assert verdict.outcome is Outcome.DEFER and verdict.code == 0


# The whole verdict (every field), at the edges of each rule: which code ranges count as what,
# which bare codes are account problems, and what is kept of the text.
D, R, A, S = Outcome.DEFER, Outcome.REFUSE, Outcome.ACCOUNT, Outcome.SENT
EDGES = [
    # code, text, outcome, enhanced, throttled
    (199, "odd", D, "", False),
    (200, "OK", S, "", False),
    (250, "2.0.0 OK", S, "2.0.0", False),
    (299, "OK", S, "", False),
    (300, "odd", D, "", False),
    (399, "odd", D, "", False),
    (400, "try later", D, "", False),
    (420, "4.4.2 timeout", D, "4.4.2", False),
    (421, "Service closing", D, "", True),
    (422, "try later", D, "", False),
    (499, "try later", D, "", False),
    (500, "5.5.2 Syntax error", R, "5.5.2", False),
    (500, "bad", R, "", False),
    (529, "bad", R, "", False),
    (530, "5.7.57 Client not authenticated", A, "5.7.57", False),
    (530, "Authentication required", A, "", False),
    (531, "bad", R, "", False),
    (534, "bad", R, "", False),
    (535, "Authentication failed", A, "", False),
    (536, "bad", R, "", False),
    (538, "Encryption required", A, "", False),
    (539, "bad", R, "", False),
    (550, "5.7.60 SMTP; Client does not have permissions to send as this sender", A, "5.7.60", False),
    (530, "5.7.0 Must issue a STARTTLS command first", A, "5.7.0", False),
    (554, "5.7.1 Message rejected as spam", R, "5.7.1", False),
    (550, "5.2.2 Mailbox full", R, "5.2.2", False),
    (554, "5.6.0 Content rejected", R, "5.6.0", False),
    (599, "bad", R, "", False),
    (600, "odd", D, "", False),
]


@pytest.mark.parametrize("code,text,outcome,enhanced,throttled", EDGES)
def test_every_field_of_the_verdict_at_the_edges_of_each_rule(code, text, outcome, enhanced, throttled):
    assert classify_reply(code, f"  {text} \r\n") == Verdict(outcome, code, enhanced, text, throttled=throttled)


def test_a_reply_without_text_keeps_an_empty_text():
    assert classify_reply(451, None) == Verdict(Outcome.DEFER, 451, "", "")
    assert classify_reply(550, "") == Verdict(Outcome.REFUSE, 550, "", "")


def test_listed_enhanced_codes_keep_code_text_and_flags():
    assert classify_reply(450, "4.5.102 quota") == Verdict(Outcome.DEFER, 450, "4.5.102", "4.5.102 quota",
                                                          throttled=True, daily_quota=True)
    assert classify_reply(535, "5.7.143 expired") == Verdict(Outcome.ACCOUNT, 535, "5.7.143", "5.7.143 expired",
                                                            token_expired=True)


def test_an_enhanced_code_is_only_read_at_the_start_and_whole():
    assert classify_reply(550, "see 5.1.1 later").enhanced == ""
    assert classify_reply(450, "4.5.1040 not this").enhanced == ""
    assert classify_reply(450, "4.5.104x").enhanced == ""
    assert classify_reply(450, "3.5.104 odd class").enhanced == ""


def test_a_lost_connection_is_a_deferral_with_no_code_and_a_bounded_text():
    assert connection_lost("reset by peer") == Verdict(Outcome.DEFER, 0, "", "connection lost: reset by peer")
    long = connection_lost("x" * 1000)
    assert len(long.text) == 300 and long.text.startswith("connection lost: xxx")
