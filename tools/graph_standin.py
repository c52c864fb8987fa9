"""A local stand-in for the part of Microsoft Graph the welcome scan reads, over real HTTP.

It speaks the real REST shapes, so the app's Graph client runs unchanged against it
(GRAPH_BASE_URL=http://127.0.0.1:<port>, GRAPH_DEV_TOKEN=<its token>):

- GET /v1.0/users with $filter on createdDateTime (`ge`, `le`, joined by `and`; a full
  date-time literal without quotes, as Graph wants), $select (only the selected properties come
  back; without $select Graph's default set, which has no createdDateTime, accountEnabled or
  userType), $top (1..999, default 100) and @odata.nextLink paging with an opaque $skiptoken.
  Users come back ordered by id, not by creation time, as in Graph.
- GET /v1.0/users/{id}; POST /v1.0/users, PATCH and DELETE /v1.0/users/{id} to change the
  directory while a demo runs.
- GET /v1.0/groups/{id}/members and /transitiveMembers (nested groups flattened), optionally
  cast with /microsoft.graph.user; $select, $top and paging as above.
- `Authorization: Bearer <token>` is required (401 InvalidAuthenticationToken otherwise).
- Injected faults: the next N matching requests answer 429/503 (Graph's error body), with a
  Retry-After header when asked.
- Every request is logged (method, path, query, status) for assertions.
- Message trace (delivery confirmation): GET /v1.0/admin/exchange/tracing/messageTraces with
  $filter (`eq` on senderAddress, recipientAddress, messageId, status, id; receivedDateTime needs
  both `ge` and `le`, a span of at most 10 days, a start no more than 90 days ago and an end not
  after now, else 400 as Graph answers; no filter: the last 48 hours), $top 1..5000 (default
  1000), @odata.nextLink paging, newest first; and .../messageTraces/{id}/getDetailsByRecipient(
  recipientAddress='...'). Past `trace_budget` trace requests in `trace_window` seconds (Graph:
  100 per 5 minutes) it answers 429 with Retry-After. Rows come from the HVE emulator's accepted
  messages (`feed_from(emulator)`), one per recipient, with outcomes set per address or domain:
  a status, or a timeline such as [["pending", 0], ["delivered", 120]] (seconds after receipt).

Python API (tests)::

    with GraphStandIn(users=[...], groups={"g1": ["u1"]}) as graph:
        graph.base_url, graph.token
        graph.load("tools/samples/graph-users.json")
        graph.page_limit = 3                              # server-driven paging below $top
        graph.add_user(displayName="Ann", mail=None, createdDateTime="-PT5M")   # Graph field names
        graph.update_user(user_id, mail="ann@contoso.com")
        graph.fail_next(429, count=1, retry_after=1)
        graph.requests                                    # [LoggedRequest(...), ...]
        graph.set_outcome("bad@contoso.com", "failed")    # or "@fabrikam.com", or a timeline
        graph.feed_from(emulator)                         # trace rows for messages it accepted
        graph.set_status(message_id, "ann@contoso.com", "delivered")

CLI::

    python -m tools.graph_standin --port 8484 --users tools/samples/graph-users.json
                                  [--page-limit 3] [--throttle 1] [--token T]
                                  [--traces traces.json] [--trace-budget 100]

`--traces`: a JSON list of {"senderAddress", "recipientAddress", "messageId", "receivedDateTime"
(may be relative, "-PT5M"), "status" (or a timeline)}.

A createdDateTime written as a negative ISO 8601 duration ("-PT2H", "-P1D") means that long
before the stand-in loaded it, so a sample file stays "new" whenever it is used.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import logging
import re
import secrets
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import quote, urlencode

from aiohttp import web

from tools.http_standin import BackgroundHttpServer

log = logging.getLogger("graph_standin")

DEFAULT_TOKEN = "graph-standin-dev-token"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 999

USER_PROPERTIES = (
    "id", "displayName", "givenName", "surname", "userPrincipalName", "mail", "mailNickname",
    "createdDateTime", "accountEnabled", "userType", "jobTitle", "department", "mobilePhone",
    "officeLocation", "preferredLanguage", "businessPhones", "otherMails", "proxyAddresses",
)
# What Graph returns for a user without $select.
DEFAULT_USER_SELECT = ("businessPhones", "displayName", "givenName", "jobTitle", "mail", "mobilePhone",
                       "officeLocation", "preferredLanguage", "surname", "userPrincipalName", "id")
_LOWER_PROPERTIES = {p.lower(): p for p in USER_PROPERTIES}
_CLAUSE = re.compile(r"^\s*createdDateTime\s+(ge|le)\s+(\S+)\s*$", re.IGNORECASE)
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,7})?(Z|[+-]\d{2}:\d{2})$")
_RELATIVE = re.compile(r"^-P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?$")


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, now: datetime | None = None) -> datetime | None:
    """A user's createdDateTime: a datetime, an ISO date-time, or "-PT2H" (that long before now)."""
    if value is None or isinstance(value, datetime):
        return value if value is None or value.tzinfo else value.replace(tzinfo=timezone.utc)
    text = str(value).strip()
    relative = _RELATIVE.match(text)
    if relative and text not in ("-P", "-PT"):
        days, hours, minutes, seconds = (int(v or 0) for v in relative.groups())
        return (now or datetime.now(timezone.utc)) - timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


class GraphRequestError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: Mapping[str, str]
    status: int
    at: float


@dataclass
class _Fault:
    status: int
    remaining: int
    retry_after: str | None
    path_prefix: str


@dataclass
class _Cursor:
    kind: str                 # "users" or "members"
    ids: list[str]
    offset: int
    select: tuple[str, ...] | None
    page_size: int
    cast_users: bool = True


TRACE_PATH = "/v1.0/admin/exchange/tracing/messageTraces"
TRACE_STATUSES = ("gettingStatus", "pending", "failed", "delivered", "expanded", "quarantined", "filteredAsSpam",
                  "unknownFutureValue", "recalled")
MAX_TRACE_TOP = 5000
DEFAULT_TRACE_TOP = 1000
_TRACE_EQ = {"senderaddress": "senderAddress", "recipientaddress": "recipientAddress", "messageid": "messageId",
             "status": "status", "id": "id", "fromip": "fromIP", "toip": "toIP"}
_TRACE_CLAUSE = re.compile(r"^\s*(\w+)\s+(eq|ge|le)\s+(.+?)\s*$", re.IGNORECASE)
Timeline = list  # [(seconds after receipt, status), ...]


@dataclass
class _TraceRow:
    id: str
    message_id: str
    sender: str
    recipient: str
    received: datetime
    subject: str
    size: int
    timeline: list[tuple[float, str]]   # (seconds after receipt, status), in order
    visible_after: float = 0.0          # seconds after receipt before the row shows in trace
    fields: dict[str, Any] = field(default_factory=dict)   # served as given, over the real fields (a buggy Graph)

    def status_at(self, now: datetime) -> str:
        age = (now - self.received).total_seconds()
        status = self.timeline[0][1]
        for offset, value in self.timeline:
            if age >= offset:
                status = value
        return status

    def public(self, now: datetime, include_unknown: bool) -> dict[str, Any]:
        status = self.status_at(now)
        if status == "recalled" and not include_unknown:
            status = "unknownFutureValue"
        return {"id": self.id, "messageId": self.message_id, "senderAddress": self.sender,
                "recipientAddress": self.recipient, "receivedDateTime": _iso(self.received), "status": status,
                "subject": self.subject, "size": self.size, "fromIP": "127.0.0.1", "toIP": None, **self.fields}


@dataclass
class _State:
    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    cursors: dict[str, _Cursor] = field(default_factory=dict)
    faults: list[_Fault] = field(default_factory=list)
    log: list[LoggedRequest] = field(default_factory=list)
    traces: list[_TraceRow] = field(default_factory=list)
    trace_cursors: dict[str, tuple[list[_TraceRow], int, int]] = field(default_factory=dict)
    trace_spent: list[float] = field(default_factory=list)
    outcomes: dict[str, Any] = field(default_factory=dict)
    fed: set[tuple[str, int]] = field(default_factory=set)


class GraphStandIn(BackgroundHttpServer):
    """The stand-in server on its own thread and event loop. Public methods are thread-safe."""

    def __init__(self, users: Iterable[Mapping[str, Any]] = (), groups: Mapping[str, Iterable[str]] | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, token: str | None = DEFAULT_TOKEN,
                 default_page_size: int = DEFAULT_PAGE_SIZE, page_limit: int | None = None) -> None:
        super().__init__(host, port)
        # Server-driven paging, as Graph may do: never more than this per page, whatever $top says.
        self.page_limit = page_limit
        # Message trace: Graph's tenant-wide throttle, and the clock trace rows and filters are judged by.
        self.trace_budget = 100
        self.trace_window = 300.0
        self.clock = lambda: datetime.now(timezone.utc)
        self.token = token
        self.default_page_size = default_page_size
        self._lock = threading.RLock()
        self._state = _State()
        for user in users:
            self.add_user(**user)
        for group_id, members in (groups or {}).items():
            self.set_group(group_id, members)

    # -- directory -------------------------------------------------------------------------------

    def add_user(self, **fields: Any) -> dict[str, Any]:
        """Add a user (Graph property names). Defaults: a new id, createdDateTime now, enabled
        Member. `mail=None` is a user whose mailbox does not exist yet. Returns a copy."""
        unknown = set(fields) - set(USER_PROPERTIES)
        if unknown:
            raise ValueError(f"unknown user properties {sorted(unknown)}")
        user: dict[str, Any] = {
            "id": str(fields.pop("id", None) or uuid.uuid4()),
            "accountEnabled": True,
            "userType": "Member",
            "businessPhones": [],
        }
        user.update(fields)
        user["createdDateTime"] = parse_time(fields.get("createdDateTime", datetime.now(timezone.utc)))
        upn = user.get("userPrincipalName")
        if not upn:
            user["userPrincipalName"] = f"{user['id']}@contoso.onmicrosoft.com"
        with self._lock:
            if user["id"] in self._state.users:
                raise ValueError(f"user {user['id']} exists")
            self._state.users[user["id"]] = user
            return self._public(user)

    def update_user(self, user_id: str, **fields: Any) -> dict[str, Any]:
        unknown = set(fields) - set(USER_PROPERTIES) | ({"id"} & set(fields))
        if unknown:
            raise ValueError(f"cannot set {sorted(unknown)}")
        with self._lock:
            user = self._state.users[user_id]
            if "createdDateTime" in fields:
                fields["createdDateTime"] = parse_time(fields["createdDateTime"])
            user.update(fields)
            return self._public(user)

    def remove_user(self, user_id: str) -> None:
        with self._lock:
            del self._state.users[user_id]
            for members in self._state.groups.values():
                if user_id in members:
                    members.remove(user_id)

    def user(self, user_id: str) -> dict[str, Any]:
        with self._lock:
            return self._public(self._state.users[user_id])

    def all_users(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._public(u) for u in self._state.users.values()]

    def set_group(self, group_id: str, member_ids: Iterable[str]) -> None:
        """A group's direct members: user ids, or ids of other groups (nested)."""
        with self._lock:
            self._state.groups[group_id] = list(dict.fromkeys(member_ids))

    def add_group_members(self, group_id: str, *member_ids: str) -> None:
        with self._lock:
            members = self._state.groups.setdefault(group_id, [])
            members.extend(m for m in member_ids if m not in members)

    def load(self, path: str | Path) -> int:
        """Users (and groups) from a JSON file: a list of users, or {"users": [...], "groups":
        {"<group id>": ["<member id>", ...]}}. Returns the number of users loaded."""
        doc = json.loads(Path(path).read_text("utf-8"))
        users = doc if isinstance(doc, list) else doc.get("users", [])
        now = datetime.now(timezone.utc)
        for user in users:
            user = dict(user)
            if "createdDateTime" in user:
                user["createdDateTime"] = parse_time(user["createdDateTime"], now)
            self.add_user(**user)
        if isinstance(doc, dict):
            for group_id, members in doc.get("groups", {}).items():
                self.set_group(group_id, members)
        return len(users)

    @staticmethod
    def _public(user: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(user)
        if isinstance(out.get("createdDateTime"), datetime):
            out["createdDateTime"] = _iso(out["createdDateTime"])
        return out

    # -- message trace ---------------------------------------------------------------------------

    def set_outcome(self, who: str, outcome: str | Timeline) -> None:
        """What trace says for recipients fed later: `who` is an address, `@domain`, or `*`;
        `outcome` a status, or a timeline [[status, seconds after receipt], ...]."""
        with self._lock:
            self._state.outcomes[who.strip().lower()] = outcome

    def _timeline(self, recipient: str, outcome: str | Timeline | None) -> list[tuple[float, str]]:
        if outcome is None:
            key = recipient.lower()
            outcomes = self._state.outcomes
            outcome = outcomes.get(key, outcomes.get("@" + key.rsplit("@", 1)[-1], outcomes.get("*", "delivered")))
        steps = [(0.0, outcome)] if isinstance(outcome, str) else [(float(at), str(st)) for st, at in outcome]
        for _, status in steps:
            if status not in TRACE_STATUSES:
                raise ValueError(f"not a message-trace status: {status!r}")
        return sorted(steps)

    def add_trace(self, sender: str, recipients: Iterable[str], message_id: str, *, received: Any = None,
                  subject: str = "", size: int = 2048, outcome: str | Timeline | None = None,
                  visible_after: float = 0.0, fields: Mapping[str, Any] | None = None) -> str:
        """Trace rows for one message (one per recipient, one trace id); returns the trace id.
        `fields` are served as given over the real ones (a hostile or buggy row, e.g. `messageId: 12345`)."""
        when = parse_time(received) if received is not None else self.clock()
        trace_id = str(uuid.uuid4())
        with self._lock:
            for recipient in recipients:
                self._state.traces.append(_TraceRow(trace_id, message_id, sender.lower(), recipient.lower(), when,
                                                    subject, size, self._timeline(recipient, outcome), visible_after,
                                                    dict(fields or {})))
        return trace_id

    def feed_from(self, emulator: Any, *, visible_after: float = 0.0) -> int:
        """Trace rows for the messages the HVE emulator accepted since the last feed; how many messages."""
        fed = 0
        for record in emulator.accepted():
            key = (str(record.path), record.internal_id)
            with self._lock:
                if key in self._state.fed:
                    continue
                self._state.fed.add(key)
            self.add_trace(record.account, record.recipients, record.message_id,
                           received=datetime.fromtimestamp(record.received_at, timezone.utc),
                           visible_after=visible_after)
            fed += 1
        return fed

    def set_status(self, message_id: str, recipient: str, status: str) -> None:
        """From now on, trace says `status` for this recipient of this message."""
        if status not in TRACE_STATUSES:
            raise ValueError(f"not a message-trace status: {status!r}")
        with self._lock:
            rows = [r for r in self._state.traces if r.message_id == message_id and r.recipient == recipient.lower()]
            if not rows:
                raise KeyError(f"no trace row for {message_id}")
            for row in rows:
                row.timeline = [(0.0, status)]

    def trace_rows(self) -> list[dict[str, Any]]:
        now = self.clock()
        with self._lock:
            return [r.public(now, True) for r in self._state.traces]

    @property
    def trace_requests(self) -> list[LoggedRequest]:
        return [r for r in self.requests if r.path.startswith(TRACE_PATH)]

    # -- faults and the request log ----------------------------------------------------------------

    def fail_next(self, status: int = 429, *, count: int = 1, retry_after: float | str | None = None,
                  path: str = "/v1.0/") -> None:
        """The next `count` requests whose path starts with `path` answer `status` (after auth)."""
        header = None if retry_after is None else (str(int(retry_after)) if isinstance(retry_after, (int, float)) else retry_after)
        with self._lock:
            self._state.faults.append(_Fault(status, count, header, path))

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._state.log)

    def clear_log(self) -> None:
        with self._lock:
            self._state.log.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._bound_port}"

    thread_name = "graph-standin"

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v1.0/users", self._list_users)
        app.router.add_post("/v1.0/users", self._create_user)
        app.router.add_get("/v1.0/users/{id}", self._get_user)
        app.router.add_patch("/v1.0/users/{id}", self._patch_user)
        app.router.add_delete("/v1.0/users/{id}", self._delete_user)
        app.router.add_get(r"/v1.0/groups/{id}/{rel:(members|transitiveMembers)}", self._members)
        app.router.add_get(r"/v1.0/groups/{id}/{rel:(members|transitiveMembers)}/microsoft.graph.user", self._members)
        app.router.add_get(TRACE_PATH, self._message_traces)
        app.router.add_get(TRACE_PATH + r"/{id}/{call:getDetailsByRecipient\(.*\)}", self._trace_details)
        return app

    # -- HTTP ------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response = await self._guarded(request, handler)
        except GraphRequestError as exc:
            response = _error(exc.status, exc.code, exc.message)
        except web.HTTPException as exc:
            response = _error(exc.status, "Request_ResourceNotFound" if exc.status == 404 else "BadRequest",
                              exc.reason or "")
        with self._lock:
            self._state.log.append(LoggedRequest(request.method, request.path, dict(request.query),
                                                 response.status, time.time()))
        return response

    async def _guarded(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.token is not None:
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or not auth[7:].strip():
                raise GraphRequestError(401, "InvalidAuthenticationToken", "Access token is empty.")
            if not secrets.compare_digest(auth[7:].strip(), self.token):
                raise GraphRequestError(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.")
        with self._lock:
            fault = next((f for f in self._state.faults if request.path.startswith(f.path_prefix)), None)
            if fault is not None:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    self._state.faults.remove(fault)
        if fault is None and request.path.startswith(TRACE_PATH):
            throttled = self._trace_throttle()
            if throttled is not None:
                return throttled
        if fault is not None:
            code = {429: "TooManyRequests", 503: "ServiceUnavailable", 504: "GatewayTimeout"}.get(fault.status, "InternalServerError")
            response = _error(fault.status, code, "Injected by the Graph stand-in.")
            if fault.retry_after is not None:
                response.headers["Retry-After"] = fault.retry_after
            return response
        return await handler(request)

    def _origin(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    def _page_size(self, request: web.Request) -> int:
        raw = request.query.get("$top")
        if raw is None:
            return min(self.default_page_size, self.page_limit or MAX_PAGE_SIZE)
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise GraphRequestError(400, "Request_BadRequest",
                                    f"Invalid page size specified: '{raw}'. Must be between 1 and {MAX_PAGE_SIZE} inclusive.")
        return min(size, self.page_limit or MAX_PAGE_SIZE)

    @staticmethod
    def _select(request: web.Request) -> tuple[str, ...] | None:
        raw = request.query.get("$select")
        if raw is None:
            return None
        out = []
        for name in (part.strip() for part in raw.split(",")):
            canonical = _LOWER_PROPERTIES.get(name.lower())
            if canonical is None:
                raise GraphRequestError(400, "Request_BadRequest",
                                        f"Could not find a property named '{name}' on type 'microsoft.graph.user'.")
            out.append(canonical)
        return tuple(out)

    @staticmethod
    def _filter(raw: str | None) -> list[tuple[str, datetime]]:
        if raw is None:
            return []
        clauses = []
        for clause in re.split(r"\s+and\s+", raw.strip(), flags=re.IGNORECASE):
            match = _CLAUSE.match(clause)
            if not match:
                raise GraphRequestError(400, "Request_UnsupportedQuery",
                                        f"Unsupported or invalid query filter clause specified for property: '{clause.strip()}'. "
                                        "(Graph stand-in: only createdDateTime ge/le)")
            op, literal = match.group(1).lower(), match.group(2)
            if not _DATETIME.match(literal):
                raise GraphRequestError(400, "BadRequest",
                                        f"Invalid filter clause: the value '{literal}' is not a full date-time "
                                        "(write it as 2026-08-14T00:00:00Z, without quotes).")
            clauses.append((op, datetime.fromisoformat(literal.replace("Z", "+00:00"))))
        return clauses

    def _page(self, request: web.Request, path: str, cursor: _Cursor, context: str) -> web.Response:
        with self._lock:
            chunk = cursor.ids[cursor.offset:cursor.offset + cursor.page_size]
            cursor.offset += len(chunk)
            items = []
            for item_id in chunk:
                user = self._state.users.get(item_id)
                if user is not None:
                    items.append(_shape(user, cursor.select or DEFAULT_USER_SELECT))
                elif not cursor.cast_users and item_id in self._state.groups:
                    items.append({"@odata.type": "#microsoft.graph.group", "id": item_id})
            body: dict[str, Any] = {"@odata.context": context, "value": items}
            if cursor.offset < len(cursor.ids):
                token = base64.urlsafe_b64encode(secrets.token_bytes(18)).decode()
                self._state.cursors[token] = cursor
                params = dict(request.query)
                params.pop("$skiptoken", None)
                params["$skiptoken"] = token
                body["@odata.nextLink"] = f"{self._origin(request)}{path}?{urlencode(params, quote_via=quote, safe='$,:')}"
        return web.json_response(body)

    def _cursor(self, request: web.Request, kind: str) -> _Cursor | None:
        token = request.query.get("$skiptoken")
        if token is None:
            return None
        with self._lock:
            cursor = self._state.cursors.pop(token, None)
        if cursor is None or cursor.kind != kind:
            raise GraphRequestError(400, "Directory_ExpiredPageToken", "The specified page token value has expired "
                                    "and can no longer be included in your request.")
        return cursor

    async def _list_users(self, request: web.Request) -> web.Response:
        cursor = self._cursor(request, "users")
        if cursor is None:
            clauses = self._filter(request.query.get("$filter"))
            select = self._select(request)
            size = self._page_size(request)
            with self._lock:
                ids = sorted(uid for uid, user in self._state.users.items() if _matches(user, clauses))
            cursor = _Cursor("users", ids, 0, select, size)
        context = f"{self._origin(request)}/v1.0/$metadata#users" + (f"({','.join(cursor.select)})" if cursor.select else "")
        return self._page(request, "/v1.0/users", cursor, context)

    async def _get_user(self, request: web.Request) -> web.Response:
        select = self._select(request)
        with self._lock:
            user = self._state.users.get(request.match_info["id"])
            if user is None:
                raise GraphRequestError(404, "Request_ResourceNotFound",
                                        f"Resource '{request.match_info['id']}' does not exist or one of its queried reference-property objects are not present.")
            return web.json_response(_shape(user, select or DEFAULT_USER_SELECT))

    async def _create_user(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            user = self.add_user(**{k: v for k, v in doc.items() if k != "passwordProfile"})
        except (ValueError, TypeError) as exc:
            raise GraphRequestError(400, "Request_BadRequest", str(exc)) from None
        return web.json_response(user, status=201)

    async def _patch_user(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            self.update_user(request.match_info["id"], **doc)
        except KeyError:
            raise GraphRequestError(404, "Request_ResourceNotFound", f"Resource '{request.match_info['id']}' does not exist.") from None
        except (ValueError, TypeError) as exc:
            raise GraphRequestError(400, "Request_BadRequest", str(exc)) from None
        return web.Response(status=204)

    async def _delete_user(self, request: web.Request) -> web.Response:
        try:
            self.remove_user(request.match_info["id"])
        except KeyError:
            raise GraphRequestError(404, "Request_ResourceNotFound", f"Resource '{request.match_info['id']}' does not exist.") from None
        return web.Response(status=204)

    async def _members(self, request: web.Request) -> web.Response:
        group_id, rel = request.match_info["id"], request.match_info["rel"]
        cast_users = request.path.endswith("/microsoft.graph.user")
        path = request.path
        cursor = self._cursor(request, "members")
        if cursor is None:
            select = self._select(request)
            size = self._page_size(request)
            with self._lock:
                if group_id not in self._state.groups:
                    raise GraphRequestError(404, "Request_ResourceNotFound",
                                            f"Resource '{group_id}' does not exist or one of its queried reference-property objects are not present.")
                ids = self._expand(group_id, transitive=rel == "transitiveMembers")
                if cast_users:
                    ids = [i for i in ids if i in self._state.users]
            cursor = _Cursor("members", ids, 0, select, size, cast_users)
        return self._page(request, path, cursor, f"{self._origin(request)}/v1.0/$metadata#directoryObjects")

    def _expand(self, group_id: str, *, transitive: bool) -> list[str]:
        seen_groups = {group_id}
        out: list[str] = []
        queue = list(self._state.groups.get(group_id, []))
        while queue:
            member = queue.pop(0)
            if member in out:
                continue
            out.append(member)
            if transitive and member in self._state.groups and member not in seen_groups:
                seen_groups.add(member)
                queue.extend(self._state.groups[member])
        return out


    # -- message trace over HTTP -------------------------------------------------------------------

    def _trace_throttle(self) -> web.Response | None:
        """Graph's 100 trace requests per 5 minutes per tenant (trace_budget per trace_window)."""
        # Judged by the stand-in's clock (the one trace rows and filters use), so a test that moves
        # a fake clock moves Graph's 5-minute window with it.
        now = self.clock().timestamp()
        with self._lock:
            spent = self._state.trace_spent = [t for t in self._state.trace_spent if t > now - self.trace_window]
            if len(spent) < self.trace_budget:
                spent.append(now)
                return None
            wait = max(1, int(spent[0] + self.trace_window - now + 0.999))
        response = _error(429, "TooManyRequests", "Too many requests: the message trace limit for this tenant was reached.")
        response.headers["Retry-After"] = str(wait)
        return response

    def _trace_filter(self, raw: str | None) -> tuple[dict[str, str], datetime, datetime]:
        now = self.clock()
        if raw is None:
            return {}, now - timedelta(hours=48), now
        equals: dict[str, str] = {}
        bounds: dict[str, datetime] = {}
        for clause in re.split(r"\s+and\s+", raw.strip(), flags=re.IGNORECASE):
            match = _TRACE_CLAUSE.match(clause)
            if not match:
                raise GraphRequestError(400, "BadRequest", f"Invalid filter clause: '{clause.strip()}'.")
            prop, op, literal = match.group(1), match.group(2).lower(), match.group(3)
            if prop.lower() == "receiveddatetime":
                if op not in ("ge", "le") or not _DATETIME.match(literal):
                    raise GraphRequestError(400, "BadRequest", f"Invalid filter clause: receivedDateTime needs ge/le "
                                            f"and a full date-time, got '{clause.strip()}'.")
                if op in bounds:
                    raise GraphRequestError(400, "BadRequest", f"receivedDateTime {op} is given twice.")
                bounds[op] = datetime.fromisoformat(literal.replace("Z", "+00:00"))
            elif prop.lower() in _TRACE_EQ and op == "eq":
                if not (len(literal) >= 2 and literal[0] == literal[-1] == "'"):
                    raise GraphRequestError(400, "BadRequest", f"Invalid filter clause: '{clause.strip()}' needs a quoted string.")
                equals[_TRACE_EQ[prop.lower()]] = literal[1:-1].replace("''", "'")
            else:
                raise GraphRequestError(400, "BadRequest", f"Unsupported filter clause: '{clause.strip()}'.")
        if not bounds:
            return equals, now - timedelta(hours=48), now
        if set(bounds) != {"ge", "le"}:
            raise GraphRequestError(400, "BadRequest", "Both 'ge' and 'le' operators must be specified for receivedDateTime.")
        start, end = bounds["ge"], bounds["le"]
        if start >= end:
            raise GraphRequestError(400, "BadRequest", "The start of the receivedDateTime range must be before its end.")
        if end - start > timedelta(days=10):
            raise GraphRequestError(400, "BadRequest", "The receivedDateTime range can't be more than 10 days.")
        if start < now - timedelta(days=90):
            raise GraphRequestError(400, "BadRequest", "The receivedDateTime start can't be more than 90 days ago.")
        if end > now:
            raise GraphRequestError(400, "BadRequest", "The receivedDateTime end can't be in the future.")
        return equals, start, end

    async def _message_traces(self, request: web.Request) -> web.Response:
        include_unknown = "include-unknown-enum-members" in request.headers.get("Prefer", "")
        token = request.query.get("$skiptoken")
        now = self.clock()
        if token is not None:
            with self._lock:
                found = self._state.trace_cursors.pop(token, None)
            if found is None:
                raise GraphRequestError(400, "BadRequest", "The page token has expired.")
            rows, offset, size = found
        else:
            equals, start, end = self._trace_filter(request.query.get("$filter"))
            raw_top = request.query.get("$top")
            try:
                size = DEFAULT_TRACE_TOP if raw_top is None else int(raw_top)
            except ValueError:
                size = 0
            if not 1 <= size <= MAX_TRACE_TOP:
                raise GraphRequestError(400, "BadRequest", f"Invalid $top '{raw_top}': must be 1..{MAX_TRACE_TOP}.")
            size = min(size, self.page_limit or MAX_TRACE_TOP)
            with self._lock:
                rows = [r for r in self._state.traces
                        if start <= r.received <= end
                        and (now - r.received).total_seconds() >= r.visible_after
                        and all(_trace_value(r, k, now) == v.lower() for k, v in equals.items())]
            rows.sort(key=lambda r: (r.received, r.id, r.recipient), reverse=True)
            offset = 0
        page = rows[offset:offset + size]
        body: dict[str, Any] = {"@odata.context": f"{self._origin(request)}/v1.0/$metadata#admin/exchange/tracing/messageTraces",
                                "value": [r.public(now, include_unknown) for r in page]}
        if offset + size < len(rows):
            next_token = base64.urlsafe_b64encode(secrets.token_bytes(18)).decode()
            with self._lock:
                self._state.trace_cursors[next_token] = (rows, offset + size, size)
            body["@odata.nextLink"] = f"{self._origin(request)}{TRACE_PATH}?{urlencode({'$skiptoken': next_token}, quote_via=quote, safe='$,:')}"
        return web.json_response(body)

    async def _trace_details(self, request: web.Request) -> web.Response:
        match = re.fullmatch(r"getDetailsByRecipient\(recipientAddress='(.*)'\)", request.match_info["call"])
        if not match:
            raise GraphRequestError(400, "BadRequest", "getDetailsByRecipient needs recipientAddress='...'.")
        recipient = match.group(1).replace("''", "'").lower()
        trace_id = request.match_info["id"]
        now = self.clock()
        with self._lock:
            row = next((r for r in self._state.traces if r.id == trace_id and r.recipient == recipient), None)
        if row is None:
            raise GraphRequestError(404, "NotFound", "No message trace for this id and recipient.")
        status = row.status_at(now)
        events = [{"event": "Receive", "action": None,
                   "description": f"Message received by: {row.sender}", "dateTime": _iso(row.received)}]
        event, text = {
            "delivered": ("Deliver", "The message was successfully delivered."),
            "failed": ("Fail", f"Reason: [{{LED=550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient {row.recipient} not found by SMTP address lookup}}]"),
            "quarantined": ("Quarantine", f"The message to {row.recipient} was quarantined by policy."),
            "filteredAsSpam": ("Spam", "The message was marked as spam."),
        }.get(status, ("Pending", "The message is waiting for delivery."))
        events.append({"event": event, "action": event if status in ("failed", "quarantined") else None,
                       "description": text, "dateTime": _iso(row.received + timedelta(seconds=1))})
        for i, e in enumerate(events):
            e["id"] = f"{trace_id}-{i}"
            e["data"] = None
        return web.json_response({"@odata.context": "messageTraceDetail", "value": events})


def _trace_value(row: _TraceRow, name: str, now: datetime) -> str:
    return {"senderAddress": row.sender, "recipientAddress": row.recipient, "messageId": row.message_id,
            "status": row.status_at(now), "id": row.id, "fromIP": "127.0.0.1", "toIP": ""}[name].lower()


def _matches(user: Mapping[str, Any], clauses: list[tuple[str, datetime]]) -> bool:
    created = user.get("createdDateTime")
    if clauses and created is None:
        return False
    for op, value in clauses:
        if op == "ge" and not created >= value:
            return False
        if op == "le" and not created <= value:
            return False
    return True


def _shape(user: Mapping[str, Any], select: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in select:
        value = user.get(name)
        out[name] = _iso(value) if isinstance(value, datetime) else value
    return out


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "innerError": {
        "date": _iso(datetime.now(timezone.utc)), "request-id": str(uuid.uuid4()),
        "client-request-id": str(uuid.uuid4())}}}, status=status)


# --- CLI ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.graph_standin",
                                     description="Local stand-in for Microsoft Graph /v1.0/users and group members.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8484, help="0 picks a free port (printed)")
    parser.add_argument("--users", type=Path, help="JSON file: a list of users, or {\"users\": [...], \"groups\": {...}}")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="bearer token clients must send (GRAPH_DEV_TOKEN)")
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="page size when the client gives no $top")
    parser.add_argument("--page-limit", type=int, help="at most N items per page whatever $top asks (to show paging)")
    parser.add_argument("--throttle", type=int, default=0, metavar="N",
                        help="answer the first N requests with 429 and Retry-After: 1")
    parser.add_argument("--traces", type=Path, help="JSON list of message-trace rows to serve")
    parser.add_argument("--trace-budget", type=int, default=100, help="trace requests per 5 minutes before 429")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    standin = GraphStandIn(host=args.host, port=args.port, token=args.token, default_page_size=args.page_size,
                           page_limit=args.page_limit)
    count = standin.load(args.users) if args.users else 0
    standin.trace_budget = args.trace_budget
    for row in json.loads(args.traces.read_text("utf-8")) if args.traces else []:
        standin.add_trace(row["senderAddress"], [row["recipientAddress"]], row["messageId"],
                          received=row.get("receivedDateTime"), outcome=row.get("status", "delivered"))
    if args.throttle:
        standin.fail_next(429, count=args.throttle, retry_after=1)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with standin:
        print(f"Graph stand-in on {standin.base_url} with {count} user(s); token {args.token!r}", flush=True)
        print(f"  GRAPH_BASE_URL={standin.base_url}  GRAPH_DEV_TOKEN={args.token}", flush=True)
        seen = 0
        while not stop.wait(0.5):
            for entry in itertools.islice(standin.requests, seen, None):
                seen += 1
                log.info("%s %s %s -> %d", entry.method, entry.path,
                         "&".join(f"{k}={v}" for k, v in entry.query.items()), entry.status)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
