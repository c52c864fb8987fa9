"""The welcome scan's policy: who is welcomed, which window a scan reads, what the mail says.

Pure: no I/O, no clock. The scan (`shared.welcome.scan`) feeds it Graph users, state rows and "now",
and carries out what it decides.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from shared.graph import graph_time  # the literal is the Graph adapter's (tools.welcome imports it from here too)
from shared.send.contract import MAX_SUBJECT_LENGTH

# What a scan asks Graph for (createdDateTime, accountEnabled and userType are not in the default set).
USER_SELECT = (
    "id",
    "displayName",
    "givenName",
    "userPrincipalName",
    "mail",
    "createdDateTime",
    "accountEnabled",
    "userType",
)
CATEGORY = "welcome"
REQUEST_ID_PREFIX = "welcome-"

# Outcomes of one user in one scan.
WELCOME, PENDING, SKIP = "welcome", "pending", "skip"
# States of a user's row in the welcome state table.
STATE_PENDING, STATE_ENQUEUED, STATE_SKIPPED = "pending", "enqueued", "skipped"
DONE_STATES = frozenset({STATE_ENQUEUED, STATE_SKIPPED})


def utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def parse_graph_time(value: str) -> datetime:
    return utc(datetime.fromisoformat(value.replace("Z", "+00:00")))


@dataclass(frozen=True)
class GraphUser:
    id: str
    display_name: str
    given_name: str
    user_principal_name: str
    mail: str
    created: datetime | None
    account_enabled: bool
    user_type: str

    @classmethod
    def from_graph(cls, doc: Mapping[str, Any]) -> GraphUser:
        created = doc.get("createdDateTime")
        return cls(
            id=str(doc["id"]),
            display_name=str(doc.get("displayName") or ""),
            given_name=str(doc.get("givenName") or ""),
            user_principal_name=str(doc.get("userPrincipalName") or ""),
            mail=str(doc.get("mail") or "").strip(),
            created=parse_graph_time(created) if created else None,
            # Absent means "not selected", which the scan never does; treat it as not enabled.
            account_enabled=doc.get("accountEnabled") is True,
            user_type=str(doc.get("userType") or ""),
        )

    @property
    def is_guest(self) -> bool:
        return self.user_type.lower() == "guest"


@dataclass(frozen=True)
class Decision:
    user: GraphUser
    outcome: str  # welcome | pending | skip
    reason: str = ""
    retry_until: datetime | None = None  # pending: re-checked on every scan until then


def request_id_for(user_id: str) -> str:
    return f"{REQUEST_ID_PREFIX}{user_id}"


# --- eligibility ----------------------------------------------------------------------------------


def decide(
    user: GraphUser,
    now: datetime,
    pending_for: timedelta,
    *,
    group_id: str = "",
    group_members: frozenset[str] | None = None,
    first_seen: datetime | None = None,
) -> Decision:
    """Welcome an enabled member with a mail address (in the group, when one is configured).

    A guest is skipped for good. Anything that can still change (the mailbox is being created,
    the account is enabled on the start date, dynamic group membership is catching up) keeps the
    user pending until `pending_for` after creation; after that the user is skipped with the reason.
    """
    if user.is_guest:
        return Decision(user, SKIP, "guest account (userType Guest)")
    waiting = []
    if not user.account_enabled:
        waiting.append("account disabled")
    if not user.mail:
        waiting.append("no mailbox yet (mail is empty)")
    if group_id and (group_members is None or user.id not in group_members):
        waiting.append(f"not a member of group {group_id}")
    if not waiting:
        return Decision(user, WELCOME)
    return hold(user, "; ".join(waiting), now, pending_for, first_seen=first_seen)


def hold(
    user: GraphUser, reason: str, now: datetime, pending_for: timedelta, *, first_seen: datetime | None = None
) -> Decision:
    """Pending for `reason` until `pending_for` after the user was created; skipped after that."""
    deadline = (user.created or first_seen or now) + pending_for
    if now >= deadline:
        return Decision(user, SKIP, f"{reason} (still, {span(pending_for)} after creation)")
    return Decision(user, PENDING, reason, deadline)


def span(delta: timedelta) -> str:
    """A duration for people: "7 days", "1 hour", "90 minutes", "1.5 days"."""
    seconds = delta.total_seconds()
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and (seconds % size == 0 or unit == "day"):
            value = seconds / size
            return f"{value:g} {unit}" + ("" if value == 1 else "s")
    return f"{seconds:g} second" + ("" if seconds == 1 else "s")


def needs_group_check(user: GraphUser, group_id: str) -> bool:
    """Whether the group membership would change this user's decision (saves a membership read)."""
    return bool(group_id) and not user.is_guest and user.account_enabled and bool(user.mail)


# --- window arithmetic ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    since: datetime
    first_scan: bool
    why: str


def scan_window(
    now: datetime,
    watermark: datetime | None,
    *,
    lookback: timedelta,
    overlap: timedelta,
    pending_for: timedelta,
    oldest_pending: datetime | None = None,
) -> Window:
    """Users created at or after `since` are read (no upper bound: a user created while the scan
    runs is simply seen early, and seen again by the next scan's overlap).

    - First scan: `now - lookback`, never the whole tenant.
    - Later: `watermark - overlap`, so users that Graph replicated late (or a clock skew) are not
      missed; but never before `now - lookback` (a user that old is not new any more) and never
      after `now - overlap` (a watermark from a clock that ran ahead must not hide anyone).
    - Pending users are re-read where they are: the window reaches back to the oldest of them
      (bounded by how long anyone stays pending).
    """
    now = utc(now)
    if watermark is None:
        since, first, why = now - lookback, True, f"first scan: looking back {span(lookback)}"
    else:
        since = max(utc(watermark) - overlap, now - lookback)
        since = min(since, now - overlap)
        first, why = False, f"watermark {graph_time(watermark)} less overlap {span(overlap)}"
    if oldest_pending is not None:
        floor = now - max(lookback, pending_for)
        reach = max(utc(oldest_pending), floor)
        if reach < since:
            since, why = reach, why + "; reaching back to the oldest pending user"
    return Window(since=since, first_scan=first, why=why)


# --- the message ----------------------------------------------------------------------------------


class TemplateError(ValueError):
    """A welcome template is missing, or uses a variable or section the renderer does not know."""


TEMPLATE_FILES = {"subject": "welcome.subject.txt", "text": "welcome.txt", "html": "welcome.html"}
TEMPLATE_VARIABLES = frozenset(
    {
        "display_name",
        "first_name",
        "user_principal_name",
        "mail",
        "outlook_url",
        "faq_url",
        "support_address",
        "support_mailto",
    }
)
_TAG = re.compile(r"\{\{\s*([#^/]?)\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]+")


@dataclass(frozen=True)
class Template:
    """A small Mustache subset: `{{name}}` inserts a value (HTML-escaped in the HTML template),
    `{{#name}}...{{/name}}` keeps the block only when the value is not empty, `{{^name}}...{{/name}}`
    only when it is empty. Only the variables in TEMPLATE_VARIABLES exist; anything else is an error
    when the template is loaded, not when a user is welcomed."""

    name: str
    source: str
    escape_html: bool = False
    _parts: tuple = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_parts", _parse(self.name, self.source))

    def render(self, values: Mapping[str, str]) -> str:
        out: list[str] = []
        _render(self._parts, values, self.escape_html, out)
        return "".join(out)


def _parse(name: str, source: str) -> tuple:
    root: list = []
    stack: list[tuple[str, str, list]] = []
    current = root
    pos = 0
    for match in _TAG.finditer(source):
        start, end = match.start(), match.end()
        kind, var = match.groups()
        if kind:
            # A section tag alone on its line takes the whole line with it (as in Mustache).
            line_start = source.rfind("\n", 0, start) + 1
            line_end = source.find("\n", end)
            line_end = len(source) if line_end < 0 else line_end + 1
            if line_start >= pos and not source[line_start:start].strip() and not source[end:line_end].strip():
                start, end = line_start, line_end
        current.append(source[pos:start])
        pos = end
        if var not in TEMPLATE_VARIABLES:
            raise TemplateError(
                f"{name}: unknown variable {{{{{kind}{var}}}}}; known: {', '.join(sorted(TEMPLATE_VARIABLES))}"
            )
        if kind in ("#", "^"):
            block: list = []
            current.append((kind, var, block))
            stack.append((kind, var, current))
            current = block
        elif kind == "/":
            if not stack or stack[-1][1] != var:
                raise TemplateError(f"{name}: {{{{/{var}}}}} closes no open section")
            current = stack.pop()[2]
        else:
            current.append(("=", var, None))
    if stack:
        raise TemplateError(f"{name}: section {{{{{stack[-1][0]}{stack[-1][1]}}}}} is not closed")
    current.append(source[pos:])
    if any("{{" in text for text in _flatten(root)):
        raise TemplateError(f"{name}: a '{{{{' does not form a valid tag")
    return tuple(root)


def _flatten(parts: list):
    for part in parts:
        if isinstance(part, str):
            yield part
        elif part[2] is not None:
            yield from _flatten(part[2])


def _render(parts, values: Mapping[str, str], escape: bool, out: list[str]) -> None:
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        kind, var, block = part
        value = values.get(var, "")
        if kind == "=":
            out.append(html.escape(value, quote=True) if escape else value)
        elif (kind == "#") == bool(value):
            _render(block, values, escape, out)


@dataclass(frozen=True)
class Templates:
    subject: Template
    text: Template
    html: Template

    @classmethod
    def from_sources(cls, sources: Mapping[str, str]) -> Templates:
        missing = [TEMPLATE_FILES[k] for k in TEMPLATE_FILES if k not in sources]
        if missing:
            raise TemplateError(f"missing welcome template(s): {', '.join(missing)}")
        return cls(
            subject=Template(TEMPLATE_FILES["subject"], sources["subject"].strip()),
            text=Template(TEMPLATE_FILES["text"], sources["text"]),
            html=Template(TEMPLATE_FILES["html"], sources["html"], escape_html=True),
        )


@dataclass(frozen=True)
class Links:
    outlook_url: str = "https://outlook.office.com/mail/"
    faq_url: str = ""
    support_address: str = ""


def _clean(value: str) -> str:
    """No control characters or line breaks in anything a user controls (display names are typed
    by admins and synced from on-premises directories)."""
    return re.sub(r"\s+", " ", _CONTROL.sub(" ", value)).strip()


def template_values(user: GraphUser, links: Links) -> dict[str, str]:
    display = _clean(user.display_name) or _clean(user.user_principal_name) or user.mail
    support = links.support_address.strip()
    return {
        "display_name": display,
        "first_name": _clean(user.given_name) or display,
        "user_principal_name": _clean(user.user_principal_name),
        "mail": user.mail,
        "outlook_url": links.outlook_url,
        "faq_url": links.faq_url,
        "support_address": support,
        "support_mailto": f"mailto:{quote(support, safe='@')}" if support else "",
    }


def _recipient(user: GraphUser) -> str:
    # The contract reads "Name <addr>"; characters that would confuse it are dropped from the name.
    name = re.sub(r"\s+", " ", re.sub(r'[<>"\\]', " ", _clean(user.display_name))).strip()
    return f"{name} <{user.mail}>" if name else user.mail


def build_request(user: GraphUser, templates: Templates, links: Links, *, bcc: str = "") -> dict[str, Any]:
    """The mail request (contract v1) welcoming one user. The relay picks the HVE account."""
    values = template_values(user, links)
    subject = _clean(templates.subject.render(values))[:MAX_SUBJECT_LENGTH]
    request: dict[str, Any] = {
        "id": request_id_for(user.id),
        "to": [_recipient(user)],
        "subject": subject,
        "text": templates.text.render(values),
        "html": templates.html.render(values),
        "category": CATEGORY,
    }
    if bcc:
        request["bcc"] = [bcc]
    return request
