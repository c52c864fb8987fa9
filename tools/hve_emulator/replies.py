"""Reply texts, worded as Exchange Online / HVE words them (see docs/hve-facts.md).

Where Microsoft's exact text is unknown the reply keeps the documented code and says so here.
"""

from __future__ import annotations

import re

GREETING_IDENT = "Microsoft ESMTP MAIL Service ready (HVE emulator)"

STARTTLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.3 Authentication unsuccessful"
BASIC_AUTH_BLOCKED = "535 5.7.139 Authentication unsuccessful, basic auth is blocked"
# Microsoft documents the codes 5.5.121-5.5.126, 5.7.143, 5.7.144 and 5.7.240; the wording is ours.
XOAUTH2_MALFORMED = "501 5.5.121 Malformed XOAUTH2 request"
TOKEN_EXPIRED = "535 5.7.143 Authentication unsuccessful, the access token has expired"
TOKEN_MISSING_PERMISSION = (
    "535 5.7.144 Authentication unsuccessful, the token does not have the Mail.Send permission"
)
APP_NOT_ALLOWED = (
    "550 5.7.240 Authentication unsuccessful, the application is not allowed for this "
    "High Volume Email account"
)

NOT_AUTHENTICATED = "530 5.7.57 Client not authenticated to send mail"
SEND_AS_DENIED = "550 5.7.60 SMTP; Client does not have permissions to send as this sender"
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
EXTERNAL_NOT_SUPPORTED = (
    "550 5.5.105 External sending is not supported for High Volume Email accounts"
)
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"

DEFAULT_FAULT = "451 4.7.0 Temporary server error, please try again later"


def queued(message_id: str, internal_id: int, hostname: str) -> str:
    return (
        f"250 2.6.0 {message_id} [InternalId={internal_id}, Hostname={hostname}] "
        "Queued mail for delivery"
    )


def external_rate_exceeded(sender: str) -> str:
    return (
        f"450 4.5.104 Message rejected. Excessive message rate from sender {sender}, "
        "rate limit for external emails has been exceeded"
    )


def external_daily_quota_exceeded(sender: str) -> str:
    return (
        f"450 4.5.102 Message rejected. Excessive message rate from sender {sender}, "
        "sender's submission tenant quota for external recipients was exceeded"
    )


def tenant_daily_quota_exceeded(sender: str) -> str:
    # Microsoft publishes no reply for the preview's 100,000 recipients per tenant per day.
    # 4xx because the quota reopens at the next UTC day; 4.5.199 is the emulator's own code.
    return (
        f"450 4.5.199 Message rejected. Excessive message rate from sender {sender}, "
        "tenant daily recipient limit for High Volume Email was exceeded (HVE emulator code)"
    )


# aiosmtpd's stock replies for checks it makes itself, reworded the Exchange way.
STOCK_REWRITES: dict[str, str] = {
    "530 Must issue a STARTTLS command first": STARTTLS_REQUIRED,
    "552 Error: Too much mail data": MESSAGE_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": MESSAGE_TOO_BIG,
}

_ENHANCED = re.compile(r"^[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b")


def enhanced_code(reply: str) -> str | None:
    """'4.5.104' from '450 4.5.104 Message rejected...', None when the reply carries none."""
    match = _ENHANCED.match(reply)
    return match.group(1) if match else None


def is_valid_reply(reply: str) -> bool:
    return bool(re.match(r"^[45]\d\d( |$)", reply))
