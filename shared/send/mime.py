"""Building the MIME message HVE receives. Pure: bytes in, bytes out."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import TYPE_CHECKING

from shared.send.contract import Address, MailRequest

if TYPE_CHECKING:
    from shared.settings import Settings

# RFC 3834: a message sent by a program, not a person; well-behaved auto-responders do not answer it.
AUTO_SUBMITTED = ("Auto-Submitted", "auto-generated")
# Exchange's own header: suppress out-of-office, auto-replies, read/delivery receipts and NDRs.
AUTO_RESPONSE_SUPPRESS = "X-Auto-Response-Suppress"
SUPPRESS_ALL = (AUTO_RESPONSE_SUPPRESS, "All")


def automatic_headers(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The headers the relay adds to every message, by MAIL_AUTO_SUBMITTED and
    MAIL_SUPPRESS_AUTO_RESPONSES, so out-of-office replies do not flood the HVE account."""
    out = []
    if settings.mail_auto_submitted:
        out.append(AUTO_SUBMITTED)
    if settings.mail_suppress_auto_responses:
        out.append(SUPPRESS_ALL)
    return tuple(out)


def message_id(request_id: str, domain: str, chunk: int = 0, *, key: bytes) -> str:
    """Deterministic per request (and chunk), so a duplicate delivery carries the same Message-ID
    and Exchange discards it. Keyed (HMAC-SHA256 under RECIPIENT_HASH_KEY): nobody can compute the
    Message-ID of a request from its id (or, for a derived id, from a guessed text) and send a mail
    under it first, and the request id itself is not exposed."""
    digest = hmac.new(key, b"hve-relay message id\x00" + request_id.encode("utf-8"), hashlib.sha256).hexdigest()[:40]
    suffix = f".{chunk}" if chunk else ""
    return f"<{digest}{suffix}@{domain.lower()}>"


def _header_address(address: Address) -> HeaderAddress:
    local, domain = address.addr.rsplit("@", 1)
    return HeaderAddress(display_name=address.display_name, username=local, domain=domain)


def build_message(
    request: MailRequest,
    *,
    request_id: str,
    account: str,
    sender_name: str,
    message_id_domain: str,
    message_id_key: bytes,
    attachments: list[tuple[str, str, bytes]],
    now: datetime | None = None,
    chunk: int = 0,
    relay_headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The RFC 5322 message, CRLF line endings. Bcc never appears in the headers.

    `attachments` are (name, content type, bytes), already resolved from inline base64 or blobs.
    `chunk` > 0 marks one of several SMTP transactions of a request with many recipients: each has
    its own Message-ID, or Exchange would drop the later ones as duplicates.
    `relay_headers` (`automatic_headers`) are added after the request's own; a producer's
    X-Auto-Response-Suppress gives way to the relay's (`All` covers every flag it could name).
    """
    msg = EmailMessage(policy=SMTP)
    local, domain = account.rsplit("@", 1)
    msg["From"] = HeaderAddress(display_name=sender_name, username=local, domain=domain)
    if request.to:
        msg["To"] = [_header_address(a) for a in request.to]
    if request.cc:
        msg["Cc"] = [_header_address(a) for a in request.cc]
    if not request.to and not request.cc:
        msg["To"] = "undisclosed-recipients:;"
    msg["Subject"] = request.subject
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    msg["Message-ID"] = message_id(request_id, message_id_domain, chunk, key=message_id_key)
    if request.reply_to:
        msg["Reply-To"] = [_header_address(a) for a in request.reply_to]
    overridden = {name.lower() for name, _ in relay_headers}
    for name, value in request.headers:
        if name.lower() not in overridden:
            msg[name] = value
    for name, value in relay_headers:
        msg[name] = value

    if request.text and request.html:
        msg.set_content(request.text)
        msg.add_alternative(request.html, subtype="html")
    elif request.html:
        msg.set_content(request.html, subtype="html")
    else:
        msg.set_content(request.text or "")
    for name, content_type, data in attachments:
        maintype, subtype = content_type.split("/", 1)
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=name)
    return msg.as_bytes()
