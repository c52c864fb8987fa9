"""Message contract v1: decoding a queue message and validating a mail request.

Pure policy: no I/O. The JSON Schema in `shared/schema/mail-request.v1.json` documents
the same contract for producers; tests keep the two in agreement.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from shared.send.send_at import MAX_SEND_AHEAD_SECONDS, BadSendAt, parse_send_at

if TYPE_CHECKING:
    from shared.hve.limits import Limits
    from shared.settings import Settings

# An Azure queue message holds at most 64 KiB of text, counted in UTF-8 (Azurite enforces the same);
# bigger requests travel by claim check. The host reads what the relay writes as is (host.json
# `messageEncoding: none`); with base64 every copy would grow by 4/3 and the budget would shrink.
QUEUE_MESSAGE_MAX_BYTES = 64 * 1024
# What the relay itself puts on the queue stays this far below the limit (the service's own count
# of a message is not documented to the byte; Azurite refuses some multi-byte text a few bytes short).
QUEUE_MESSAGE_BUDGET = QUEUE_MESSAGE_MAX_BYTES - 1024
MAX_REQUEST_ID_LENGTH = 200
MAX_SUBJECT_LENGTH = 998
MAX_CATEGORY_LENGTH = 64
# The lanes a request may ask for (`priority`): "high" is the priority queue (MAIL_QUEUE_PRIORITY).
PRIORITIES = ("normal", "high")
MAX_CUSTOM_HEADERS = 20
# The contract nests three levels (request -> attachments -> attachment); anything deeper is junk,
# and walking it could exhaust the interpreter's recursion limit.
MAX_JSON_DEPTH = 8

_REQUEST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@=+-]{0,199}$")
# Something that reads as `local@domain` (an '@' between two characters other than spaces): ids and
# categories are stored, logged and aggregated in clear, so they must never carry a mail address.
_ADDRESS_SHAPED = re.compile(r"[^\s@]@[^\s@.]")
# RFC 5322 dot-atom local part; domain of LDH labels with at least one dot.
_LOCAL = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
_LABEL = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
_ADDR = re.compile(rf"^(?P<local>{_LOCAL})@(?P<domain>{_LABEL}(?:\.{_LABEL})+)$")
_NAMED = re.compile(r"^(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]+)>$")
_CUSTOM_HEADER_NAME = re.compile(r"^X-[A-Za-z0-9][A-Za-z0-9-]{0,76}$")
# Characters that end a header line or that no header may carry.
_FORBIDDEN_IN_HEADER = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029\u0085]")
_ATTACHMENT_NAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\\"]")
_CONTENT_TYPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")

_FIELDS = {
    "id",
    "to",
    "cc",
    "bcc",
    "subject",
    "text",
    "html",
    "attachments",
    "account",
    "category",
    "headers",
    # Where replies go (the Reply-To header); not a recipient.
    "replyTo",
    # When to send (ISO 8601 with an offset); see shared/send/send_at.py.
    "sendAt",
    # Asked for by callers used to Send-MailMessage; refused unless it is the HVE account.
    "from",
    "sender",
    # Written by the relay on re-enqueued copies; informational (the ledger counts attempts).
    "attempt",
    # Written by the relay on requests whose id is in its own namespaces (see `RELAY_ID_PREFIXES`).
    "idProof",
    # The lane: `POST /api/send` routes "high" onto the priority queue. On the queue path the lane
    # is the queue the request was written to; the field is checked there but moves nothing.
    "priority",
}
# Fields that are not the request's content: its identity, the relay's bookkeeping, its lane (the
# same mail asked for again in another lane is the same request, not an id-conflict).
_NOT_CONTENT = {"id", "attempt", "idProof", "priority"}
# Headers a caller may never set through `headers`, even under an X- name, because the relay owns them.
_RESERVED_HEADERS = {"x-hve-relay-request-id"}


class RequestRefused(Exception):
    """The request breaks the contract. `reason` is a stable code, `detail` says what and where."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Address:
    addr: str
    display_name: str = ""

    @property
    def domain(self) -> str:
        return self.addr.rsplit("@", 1)[1].lower()


@dataclass(frozen=True)
class Attachment:
    name: str
    content_type: str
    content: bytes | None = None
    blob_url: str | None = None


@dataclass(frozen=True)
class MailRequest:
    id: str | None
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    subject: str
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    account: str | None
    category: str
    headers: tuple[tuple[str, str], ...]
    # The Reply-To header's addresses: not recipients (not in the envelope, counted in no limit).
    reply_to: tuple[Address, ...] = ()
    # Epoch seconds of `sendAt`, when the request names one: not sent before, age counted from it.
    send_at: float | None = None
    priority: str = "normal"

    @property
    def recipients(self) -> tuple[Address, ...]:
        return self.to + self.cc + self.bcc


@dataclass(frozen=True)
class ValidationPolicy:
    accounts: frozenset[str]
    internal_domains: frozenset[str]
    external_allowed: bool
    # Above the per-message limit a request is chunked; this is the hard cap per request.
    max_recipients: int | None

    @classmethod
    def from_settings(cls, settings: Settings, limits: Limits) -> ValidationPolicy:
        """The policy the send stage applies (and the welcome scan checks its requests against)."""
        account_domains = {a.rsplit("@", 1)[1] for a in settings.accounts}
        return cls(
            accounts=frozenset(settings.accounts),
            # The HVE accounts' own domains are accepted domains of the tenant.
            internal_domains=settings.internal_domains | account_domains,
            external_allowed=limits.external_allowed,
            max_recipients=settings.max_recipients_per_request,
        )


@dataclass(frozen=True)
class ClaimCheck:
    blob_url: str
    id: str | None


# --- queue body ---------------------------------------------------------------------------------


def decode_queue_body(body: bytes | str) -> dict[str, Any]:
    """The JSON object in a queue message written raw or base64-encoded (both are accepted)."""
    # surrogatepass: a str body with a lone surrogate becomes bytes that fail UTF-8 below, not here
    raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
    text = raw.strip()
    if not text:
        raise RequestRefused("malformed", "the queue message is empty")
    if not text.startswith(b"{"):
        # '{' is not in the base64 alphabet, so a raw JSON object can never be mistaken for base64.
        try:
            text = base64.b64decode(text, validate=True).strip()
        except (binascii.Error, ValueError):
            raise RequestRefused("malformed", "the queue message is neither a JSON object nor base64 of one") from None
    try:
        doc = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise RequestRefused("malformed", "the queue message is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestRefused("malformed", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise RequestRefused("malformed", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        # e.g. an integer of thousands of digits (Python's int conversion limit)
        raise RequestRefused("malformed", "JSON holds a number too large to read") from None
    if not isinstance(doc, dict):
        raise RequestRefused("malformed", "the request must be a JSON object")
    _check_tree(doc)
    return doc


def _check_tree(doc: Any) -> None:
    """Refuse what would break later stages: nesting beyond the contract, and strings that are not
    Unicode text (JSON's \\ud800 escapes decode to lone surrogates, which no encoder accepts)."""
    stack: list[tuple[Any, str, int]] = [(doc, "", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestRefused("malformed", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if not _is_text(key):
                    raise RequestRefused(
                        "bad-encoding", f"a field name under {where or 'the request'} is not valid Unicode text"
                    )
                stack.append((item, path, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and not _is_text(value):
            # The path names fields of the contract only up to here; never the value itself.
            raise RequestRefused("bad-encoding", f"{_safe_path(where)} is not valid Unicode text (a lone surrogate)")


def _is_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safe_path(path: str) -> str:
    # Field names are caller-chosen; keep the ones the contract knows, mask the rest.
    parts = re.split(r"(\[\d+\])|\.", path)
    known = _FIELDS | {"claimCheck", "blobUrl", "name", "contentType", "contentBase64"}
    out = []
    for part in parts:
        if not part:
            continue
        out.append(part if part in known or part.startswith("[") or _CUSTOM_HEADER_NAME.match(part) else "?")
    return ".".join(out).replace(".[", "[") or "the request"


CONTENT_ID_PREFIX = "c-"
# Ids the relay gives requests itself: derived from content (`c-` and 32 hex digits, exactly what
# `content_request_id` makes), the welcome scan's (`welcome-` and anything). A producer may not send
# one: a request carrying such an id is refused (`reserved-id`) unless it carries the relay's proof
# (`idProof`, see `id_proof`), which only the relay's own copies and producers (welcome scan) can
# compute. (Compared case-insensitively; a producer's `c-1042` is not the relay's form.)
RELAY_ID_PREFIXES = (CONTENT_ID_PREFIX, "welcome-")
_RELAY_ID = re.compile(r"^(?:c-[0-9a-f]{32}|welcome-.*)$", re.IGNORECASE | re.DOTALL)


def content_request_id(body: bytes | str) -> str:
    """The id of a request that names none: `c-` and 32 hex digits of the SHA-256 of its JSON text
    (after the transport's base64, if any). Every copy of the same bytes (the host's poison copy, a
    replay, a producer sending it again) is the same request: one ledger row, one Message-ID."""
    raw = (body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)).strip()
    if raw and not raw.startswith(b"{"):
        try:
            raw = base64.b64decode(raw, validate=True).strip()
        except (binascii.Error, ValueError):
            pass
    return CONTENT_ID_PREFIX + hashlib.sha256(raw).hexdigest()[:32]


def is_relay_id(request_id: str) -> bool:
    return bool(_RELAY_ID.match(request_id))


def id_proof(key: bytes, request_id: str) -> str:
    """What a request in the relay's own id namespaces carries to show the relay gave it that id:
    32 hex digits of HMAC-SHA256 under RECIPIENT_HASH_KEY (producers never hold the key)."""
    return hmac.new(key, b"hve-relay request id\x00" + request_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def check_id_claim(doc: Mapping[str, Any], request_id: str, key: bytes) -> None:
    """Refuse a producer's request whose id is in the relay's namespaces (`RELAY_ID_PREFIXES`)."""
    if not is_relay_id(request_id):
        return
    proof = doc.get("idProof")
    if not isinstance(proof, str) or not hmac.compare_digest(proof, id_proof(key, request_id)):
        raise RequestRefused(
            "reserved-id",
            "ids of the form 'c-' + 32 hex digits or 'welcome-...' are given by the relay itself; "
            "a producer chooses another id (or none)",
        )


def content_digest(key: bytes, doc: Mapping[str, Any]) -> str:
    """A keyed digest of a request's content, kept in its ledger row so a different request sent
    under the same id is told apart (`id-conflict`) from a copy of the same one (`duplicate`).

    The content is the decoded JSON object (so raw and base64 copies agree) without its identity and
    the relay's bookkeeping (`id`, `attempt`, `idProof`: the relay adds them to the copies it
    re-enqueues), in a canonical text (keys sorted, compact, UTF-8). For a claim check it is the
    object in the blob, never the stub. HMAC-SHA256 under RECIPIENT_HASH_KEY: the ledger holds no
    content and no digest anyone could compute from a guessed request."""
    content = {k: v for k, v in doc.items() if k not in _NOT_CONTENT}
    text = json.dumps(content, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    data = text.encode("utf-8", "surrogatepass")
    return hmac.new(key, b"hve-relay request content\x00" + data, hashlib.sha256).hexdigest()[:32]


def queue_text(doc: Mapping[str, Any]) -> str:
    """A request as the relay re-enqueues it: compact JSON, non-ASCII text as UTF-8, not as 6-byte
    \\u escapes (which triple Cyrillic and pass no queue limit). Text that is not valid UTF-8 (a lone
    surrogate) keeps its escapes so the copy can still be written."""
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(doc, separators=(",", ":"))
    return text


def fits_on_queue(text: str, *, base64_encoded: bool = False) -> bool:
    size = len(text.encode("utf-8"))
    if base64_encoded:
        size = 4 * ((size + 2) // 3)
    return size <= QUEUE_MESSAGE_BUDGET


def mime_base64_size(raw_bytes: int) -> int:
    """Bytes an attachment of `raw_bytes` takes in a MIME message: base64 in lines of 76 plus CRLF."""
    encoded = 4 * -(-raw_bytes // 3)
    return encoded + 2 * -(-encoded // 76)


def claim_check_of(doc: Mapping[str, Any]) -> ClaimCheck | None:
    """A claim-check stub (`{"claimCheck": {"blobUrl": ...}, "id": ...}`), or None for a full request."""
    if "claimCheck" not in doc:
        return None
    extra = set(doc) - {"claimCheck", "id", "attempt", "idProof"}
    if extra:
        raise RequestRefused(
            "schema", f"a claim-check message carries only 'claimCheck', 'id' and 'attempt', not {sorted(extra)}"
        )
    ref = doc["claimCheck"]
    if not isinstance(ref, dict) or not isinstance(ref.get("blobUrl"), str) or set(ref) != {"blobUrl"}:
        raise RequestRefused("schema", "claimCheck must be an object with a single string field 'blobUrl'")
    check_blob_url("claimCheck.blobUrl", ref["blobUrl"], "claim-check")
    request_id = parse_request_id(doc.get("id"))
    if request_id is None:
        # The blob lives under its request's id (`requests/<producer>/<id>/`): no id, no blob.
        raise RequestRefused(
            "schema", "a claim-check message needs the request's id (its blob is under requests/<producer>/<id>/)"
        )
    return ClaimCheck(blob_url=ref["blobUrl"], id=request_id)


def check_blob_url(field: str, url: str, reason: str) -> None:
    """A backslash (raw or %5C) is a path separator to some tools and not to others: refused."""
    if "\\" in unquote(url):
        raise RequestRefused(reason, f"{field} must not contain a backslash")


# --- validation ---------------------------------------------------------------------------------


def parse_request_id(value: Any) -> str | None:
    """The caller's idempotency key, checked (it becomes a Table key and a Message-ID seed)."""
    if value is None:
        return None
    if not isinstance(value, str) or not _REQUEST_ID.match(value):
        raise RequestRefused(
            "schema",
            "id must be 1-200 characters of letters, digits and . _ : @ = + - (starting with a letter or digit)",
        )
    if _ADDRESS_SHAPED.search(value):
        raise RequestRefused(
            "address-shaped",
            "id looks like it holds a mail address; ids are stored and logged in clear, so they must not",
        )
    return value


def check_header_value(field: str, value: str) -> None:
    if _FORBIDDEN_IN_HEADER.search(value):
        raise RequestRefused("header-injection", f"{field} contains a line break or control character")


def parse_address(field: str, value: Any) -> Address:
    # Refusals name the field and its index, never the value: reasons are stored and logged.
    if not isinstance(value, str) or not value.strip():
        raise RequestRefused("bad-address", f"{field}: an address must be a non-empty string")
    check_header_value(field, value)
    value = value.strip()
    named = _NAMED.match(value)
    if named:
        display, addr = named.group("name").strip(), named.group("addr").strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            display = display[1:-1]
    elif "<" in value or ">" in value:
        raise RequestRefused("bad-address", f"{field} is not 'addr' or 'Display Name <addr>'")
    else:
        display, addr = "", value
    match = _ADDR.match(addr)
    if not match or len(addr) > 254 or len(match.group("local")) > 64:
        raise RequestRefused("bad-address", f"{field} is not a valid mail address")
    return Address(addr=addr, display_name=display)


def _address_list(doc: Mapping[str, Any], field: str) -> tuple[Address, ...]:
    value = doc.get(field)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RequestRefused("schema", f"{field} must be a list of addresses")
    return tuple(parse_address(f"{field}[{i}]", item) for i, item in enumerate(value))


def _optional_str(doc: Mapping[str, Any], field: str) -> str | None:
    value = doc.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestRefused("schema", f"{field} must be a string")
    return value


def _attachments(doc: Mapping[str, Any]) -> tuple[Attachment, ...]:
    value = doc.get("attachments")
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RequestRefused("schema", "attachments must be a list")
    out = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, dict):
            raise RequestRefused("schema", f"{where} must be an object")
        unknown = set(item) - {"name", "contentType", "contentBase64", "blobUrl"}
        if unknown:
            raise RequestRefused("schema", f"{where} has unknown fields {sorted(unknown)}")
        name, ctype = item.get("name"), item.get("contentType", "application/octet-stream")
        if not isinstance(name, str) or not name.strip() or len(name) > 255:
            raise RequestRefused("bad-attachment", f"{where}.name must be a non-empty file name")
        check_header_value(f"{where}.name", name)
        if _ATTACHMENT_NAME_FORBIDDEN.search(name):
            raise RequestRefused(
                "bad-attachment", f"{where}.name must not contain quotes, slashes or control characters"
            )
        if not isinstance(ctype, str) or not _CONTENT_TYPE.match(ctype):
            raise RequestRefused("bad-attachment", f"{where}.contentType must look like 'type/subtype'")
        has_inline, has_blob = "contentBase64" in item, "blobUrl" in item
        if has_inline == has_blob:
            raise RequestRefused("bad-attachment", f"{where} needs exactly one of contentBase64 or blobUrl")
        if has_inline:
            data = item["contentBase64"]
            if not isinstance(data, str):
                raise RequestRefused("bad-attachment", f"{where}.contentBase64 must be a string")
            try:
                content = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RequestRefused("bad-attachment", f"{where}.contentBase64 is not valid base64") from None
            out.append(Attachment(name=name, content_type=ctype.lower(), content=content))
        else:
            url = item["blobUrl"]
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                raise RequestRefused("bad-attachment", f"{where}.blobUrl must be an http(s) URL")
            check_blob_url(f"{where}.blobUrl", url, "bad-attachment")
            out.append(Attachment(name=name, content_type=ctype.lower(), blob_url=url))
    return tuple(out)


def _custom_headers(doc: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    value = doc.get("headers")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestRefused("schema", "headers must be an object of X- header names to string values")
    if len(value) > MAX_CUSTOM_HEADERS:
        raise RequestRefused("schema", f"at most {MAX_CUSTOM_HEADERS} custom headers")
    out = []
    for name, header_value in value.items():
        check_header_value(f"headers name {name!r}", name)
        if name.lower() in ("from", "sender"):
            raise RequestRefused("send-as", f"the {name} header is set by the relay to the HVE account")
        if not _CUSTOM_HEADER_NAME.match(name) or name.lower() in _RESERVED_HEADERS:
            raise RequestRefused("schema", f"header {name!r} is not allowed: only custom X- headers may be set")
        if not isinstance(header_value, str):
            raise RequestRefused("schema", f"header {name} must have a string value")
        check_header_value(f"headers.{name}", header_value)
        out.append((name, header_value))
    return tuple(out)


def _check_send_as(doc: Mapping[str, Any], accounts: frozenset[str], chosen: str | None) -> None:
    """HVE has no Send As: a From/Sender is only tolerated when it names the relay's own account."""
    for field in ("from", "sender"):
        if field not in doc:
            continue
        addr = parse_address(field, doc[field]).addr.lower()
        if addr not in accounts or (chosen is not None and addr != chosen):
            raise RequestRefused(
                "send-as",
                f"{field} is not an HVE account of this relay; HVE sends only as the account itself",
            )


def check_send_at(request: MailRequest, now: float) -> None:
    """Refuse (`send-at-too-far`) a request scheduled more than 7 days ahead of the relay's clock:
    the queue cannot hide it that long. A time in the past is fine (it is sent now)."""
    if request.send_at is None:
        return
    ahead = request.send_at - now
    if ahead > MAX_SEND_AHEAD_SECONDS:
        raise RequestRefused(
            "send-at-too-far",
            f"sendAt is {ahead / 3600:.1f} hours ahead; at most 7 days (168 hours) ahead, "
            "the storage queue's longest visibility timeout",
        )


def is_internal(address: Address, internal_domains: Iterable[str]) -> bool:
    return address.domain in internal_domains


def validate_request(doc: Mapping[str, Any], policy: ValidationPolicy) -> MailRequest:
    """A typed request, or RequestRefused naming the first rule it breaks."""
    unknown = set(doc) - _FIELDS
    if unknown:
        raise RequestRefused("schema", f"unknown fields {sorted(unknown)}")
    attempt = doc.get("attempt", 0)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise RequestRefused("schema", "attempt must be a non-negative integer")
    request_id = parse_request_id(doc.get("id"))

    account = doc.get("account")
    if account is not None:
        if not isinstance(account, str) or account.strip().lower() not in policy.accounts:
            raise RequestRefused("unknown-account", "account is not one of the configured HVE accounts")
        account = account.strip().lower()
    _check_send_as(doc, policy.accounts, account)

    to, cc, bcc = (_address_list(doc, f) for f in ("to", "cc", "bcc"))
    recipients = to + cc + bcc
    if not recipients:
        raise RequestRefused("no-recipients", "at least one recipient in to, cc or bcc is required")
    limit = policy.max_recipients
    if limit is not None and len(set(r.addr.lower() for r in recipients)) > limit:
        raise RequestRefused("too-many-recipients", f"{len(recipients)} recipients; the limit per request is {limit}")
    if not policy.external_allowed:
        external = [r for r in recipients if not is_internal(r, policy.internal_domains)]
        if external:
            raise RequestRefused(
                "external-not-allowed",
                f"{len(external)} external recipient(s) (e.g. domain {external[0].domain!r}); "
                "HVE refuses external recipients (550 5.5.105) under this limits profile",
            )

    subject = _optional_str(doc, "subject") or ""
    check_header_value("subject", subject)
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise RequestRefused("schema", f"subject is longer than {MAX_SUBJECT_LENGTH} characters")
    text, html = _optional_str(doc, "text"), _optional_str(doc, "html")
    if not (text and text.strip()) and not (html and html.strip()):
        raise RequestRefused("no-body", "a request needs a non-empty text or html body")

    category = _optional_str(doc, "category") or ""
    check_header_value("category", category)
    if len(category) > MAX_CATEGORY_LENGTH:
        raise RequestRefused("schema", f"category is longer than {MAX_CATEGORY_LENGTH} characters")
    if _ADDRESS_SHAPED.search(category):
        raise RequestRefused(
            "address-shaped",
            "category looks like it holds a mail address; categories are stored, "
            "logged and aggregated in clear, so they must not",
        )

    # Where replies go: validated like `to`, but not a recipient (no limit, no domain rule: HVE
    # never sends to it; replies come from the recipients' own servers).
    reply_to = _address_list(doc, "replyTo")
    try:
        send_at = parse_send_at(doc.get("sendAt"))
    except BadSendAt as bad:
        raise RequestRefused("bad-send-at", str(bad)) from None
    priority = doc.get("priority", "normal")
    if priority not in PRIORITIES:
        raise RequestRefused("schema", "priority must be 'high' or 'normal'")

    attachments = _attachments(doc)
    if request_id is None and any(a.blob_url for a in attachments):
        raise RequestRefused(
            "bad-attachment",
            "a request with blobUrl attachments needs an id (its blobs are under requests/<producer>/<id>/)",
        )

    return MailRequest(
        id=request_id,
        to=to,
        cc=cc,
        bcc=bcc,
        subject=subject,
        text=text,
        html=html,
        attachments=attachments,
        account=account,
        category=category,
        headers=_custom_headers(doc),
        reply_to=reply_to,
        send_at=send_at,
        priority=priority,
    )
