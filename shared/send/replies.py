"""Classifying SMTP replies from HVE into what the relay does next. Pure and table-driven.

Codes and texts: docs/hve-facts.md.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Outcome(enum.StrEnum):
    SENT = "sent"
    DEFER = "defer"  # try again later, same or another account
    REFUSE = "refuse"  # the message itself is unacceptable: never retry
    ACCOUNT = "account"  # the account cannot send now: defer the message, mark the account


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    code: int  # SMTP basic code; 0 when the connection was lost without a reply
    enhanced: str  # e.g. "4.5.104", "" when the reply had none
    text: str
    # The server asked us to slow down: the governor puts the account in cooldown.
    throttled: bool = False
    # The token was rejected as expiring/expired: refresh it once and retry.
    token_expired: bool = False
    # A daily quota was hit: the cooldown lasts until the daily window resets.
    daily_quota: bool = False


_ENHANCED = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})\b")

# Enhanced status code -> (outcome, throttled, token_expired, daily_quota). Most specific wins.
_BY_ENHANCED: dict[str, tuple[Outcome, bool, bool, bool]] = {
    "4.5.104": (Outcome.DEFER, True, False, False),  # external message rate per account
    "4.5.102": (Outcome.DEFER, True, False, True),  # daily external quota
    "5.5.105": (Outcome.REFUSE, False, False, False),  # external sending not supported (GA)
    "5.3.4": (Outcome.REFUSE, False, False, False),  # message too big
    "5.7.139": (Outcome.ACCOUNT, False, False, False),  # basic auth blocked / org config
    "5.7.3": (Outcome.ACCOUNT, False, False, False),  # authentication unsuccessful
    "5.7.142": (Outcome.ACCOUNT, False, True, False),  # token about to expire
    "5.7.143": (Outcome.ACCOUNT, False, True, False),  # token expired
    "5.7.144": (Outcome.ACCOUNT, False, False, False),  # token lacks permission
    "5.7.240": (Outcome.ACCOUNT, False, False, False),  # app not allowed for this HVE account
    "5.7.57": (Outcome.ACCOUNT, False, False, False),  # not authenticated
    "5.7.60": (Outcome.ACCOUNT, False, False, False),  # not allowed to send as this sender
    "5.7.0": (Outcome.ACCOUNT, False, False, False),  # e.g. STARTTLS/auth required
}
for _n in range(121, 127):  # 501 5.5.121..5.5.126: malformed XOAUTH2 exchange
    _BY_ENHANCED[f"5.5.{_n}"] = (Outcome.ACCOUNT, False, False, False)

# Enhanced-code classes (x.y) when the exact code is not listed.
_BY_CLASS: dict[str, Outcome] = {
    "5.1": Outcome.REFUSE,  # bad address / mailbox
    "5.2": Outcome.REFUSE,  # mailbox full / message too big for it
    "5.3": Outcome.REFUSE,  # mail system: size and the like
    "5.6": Outcome.REFUSE,  # content / media
    "5.5": Outcome.REFUSE,  # protocol / policy on this message
}


def classify_reply(code: int, text: str) -> Verdict:
    text = (text or "").strip()
    match = _ENHANCED.match(text)
    enhanced = ".".join(match.groups()) if match else ""
    if 200 <= code < 300:
        return Verdict(Outcome.SENT, code, enhanced, text)
    if enhanced in _BY_ENHANCED:
        outcome, throttled, token_expired, daily = _BY_ENHANCED[enhanced]
        return Verdict(outcome, code, enhanced, text, throttled, token_expired, daily)
    if code == 421:
        # Service closing / too many connections: back the account off.
        return Verdict(Outcome.DEFER, code, enhanced, text, throttled=True)
    if code in (530, 535, 538):
        return Verdict(Outcome.ACCOUNT, code, enhanced, text)
    if 400 <= code < 500:
        return Verdict(Outcome.DEFER, code, enhanced, text)
    if 500 <= code < 600:
        cls = ".".join(enhanced.split(".")[:2]) if enhanced else ""
        return Verdict(_BY_CLASS.get(cls, Outcome.REFUSE), code, enhanced, text)
    return Verdict(Outcome.DEFER, code, enhanced, text)


# Anything shaped like local@domain, quoted local parts included; the domain is kept (it tells
# internal from external and is no one's address), the local part is not.
_ADDRESS = re.compile(
    r"""(?:"[^"\r\n]*"|[^\s<>()\[\]",;:@'][^\s<>()\[\]",;:@]*)@((?:[A-Za-z0-9-]+\.)*[A-Za-z0-9-]+|\[[^\]\s]*\])"""
)


def mask_addresses(text: str) -> str:
    """`text` with every mail address's local part replaced by `***`, for what is stored or logged
    (HVE's replies quote recipients: `550 5.1.1 <carol@contoso.com> ...`)."""
    return _ADDRESS.sub(lambda m: f"***@{m.group(1)}", text)


def connection_lost(detail: str) -> Verdict:
    """No reply at all: the message may or may not have arrived; the Message-ID makes a resend safe."""
    return Verdict(Outcome.DEFER, 0, "", f"connection lost: {detail}"[:300])
