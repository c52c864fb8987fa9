"""Every HVE reply code in hve-facts.md maps to the right next step."""

import pytest

from shared.replies import Outcome, classify_reply, connection_lost

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
