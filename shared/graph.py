"""A small Microsoft Graph client for the welcome scan: app-only token, paging, throttling.

aiohttp (already loaded by the async Azure SDKs) instead of the Graph SDK, which would add
seconds to every cold start for two GET requests.

- The token comes from any object with `async get_token(scope)` (azure-identity credentials;
  `StaticToken` for the local stand-in), cached by `shared.hve.credentials.TokenSource`.
- `@odata.nextLink` is followed as given, but only on the origin of the base URL: the bearer
  token is never sent anywhere else.
- 429 and 503 (and 502/504, and network errors) are retried: `Retry-After` is honoured when
  present, capped exponential backoff with jitter when not. A `Retry-After` longer than the
  client is willing to wait ends the call with `GraphThrottled`; the caller's next run tries again.
- HTTPS only, except for a loopback base URL (a local stand-in).
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
from yarl import URL

from shared.hve.credentials import CredentialError, TokenSource, azure_credential
from shared.settings import Settings, SettingsError

log = logging.getLogger("hve_relay.graph")


def graph_time(value: datetime) -> str:
    """The date-time literal Graph's $filter takes: full, UTC, no quotes (2026-08-14T09:30:00Z)."""
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


RETRY_STATUSES = frozenset({429, 502, 503, 504})
PAGE_SIZE = 999  # Graph's maximum $top for users and group members


class GraphError(Exception):
    """Graph answered with an error (or could not be reached). `status` 0: no HTTP answer."""

    def __init__(self, status: int, code: str, message: str, url: str = "") -> None:
        super().__init__(f"Graph {status or 'unreachable'} {code}: {message}" + (f" ({url})" if url else ""))
        self.status = status
        self.code = code
        self.message = message


class GraphThrottled(GraphError):
    """Still throttled after the allowed retries, or asked to wait longer than the client will.
    `retry_after`: the seconds Graph asked for (None when it did not say)."""

    def __init__(self, status: int, code: str, message: str, url: str = "", retry_after: float | None = None) -> None:
        super().__init__(status, code, message, url)
        self.retry_after = retry_after


@dataclass(frozen=True)
class _AccessToken:
    token: str
    expires_on: int


class StaticToken:
    """A fixed bearer token, for a local Graph stand-in on a loopback address (GRAPH_DEV_TOKEN)."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def get_token(self, *scopes: str, **kwargs: Any) -> _AccessToken:
        return _AccessToken(self._token, int(time.time()) + 24 * 3600)

    async def close(self) -> None:
        pass


def is_loopback_url(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_base_url(base_url: str) -> str:
    parts = urlsplit(base_url)
    if parts.scheme == "https" and parts.hostname:
        return base_url.rstrip("/")
    if parts.scheme == "http" and is_loopback_url(base_url):
        return base_url.rstrip("/")
    raise SettingsError(
        f"GRAPH_BASE_URL must be an https:// URL (plain http only on a loopback address), got {base_url!r}"
    )


def graph_scope(base_url: str) -> str:
    """`https://graph.microsoft.com/.default`, or the national cloud's own Graph resource."""
    parts = urlsplit(base_url)
    return f"{parts.scheme}://{parts.netloc}/.default"


def graph_credential(settings: Settings) -> Any:
    """The credential the app uses for Graph: the managed identity (AZURE_CLIENT_ID), or the fixed
    GRAPH_DEV_TOKEN when GRAPH_BASE_URL is a loopback stand-in. The dev token is refused for any
    other URL, so it can never reach the real Graph."""
    if settings.graph_dev_token:
        if not is_loopback_url(settings.graph_base_url):
            raise SettingsError(
                "GRAPH_DEV_TOKEN is only for a loopback GRAPH_BASE_URL (a local stand-in); "
                f"unset it to use the app identity with {settings.graph_base_url}"
            )
        return StaticToken(settings.graph_dev_token)
    return azure_credential(settings.managed_identity_client_id)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        # "nan" is no wait at all; "inf" or 1e15 is kept as given (callers cap what they wait).
        return None if math.isnan(seconds) else max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_seconds(attempt: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Capped exponential backoff with jitter: attempt 1 -> about base, doubling up to cap."""
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return ceiling * (0.5 + 0.5 * rng())


def _query(params: dict[str, str]) -> str:
    # Graph reads `$filter=createdDateTime ge 2026-08-14T00:00:00Z`; keep `$`, `,` and `:` readable.
    return urlencode(params, quote_via=quote, safe="$,:")


class GraphClient:
    def __init__(
        self,
        base_url: str,
        credential: Any,
        *,
        owns_credential: bool = False,
        max_attempts: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        retry_after_max: float = 120.0,
        timeout_seconds: float = 60.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base_url = check_base_url(base_url)
        self._origin = self._origin_of(self.base_url)
        self._credential = credential
        self._owns_credential = owns_credential
        self._tokens = TokenSource(credential, graph_scope(self.base_url))
        self._max_attempts = max(1, max_attempts)
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._retry_after_max = retry_after_max
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._sleep = sleep
        self._rng = rng
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0
        self.retries = 0

    @classmethod
    def from_settings(cls, settings: Settings, credential: Any = None, **kwargs: Any) -> GraphClient:
        owns = credential is None
        return cls(
            settings.graph_base_url,
            credential if credential is not None else graph_credential(settings),
            owns_credential=owns,
            **kwargs,
        )

    @staticmethod
    def _origin_of(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
        return parts.scheme, (parts.hostname or "").lower(), port

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._owns_credential and hasattr(self._credential, "close"):
            await self._credential.close()

    async def __aenter__(self) -> GraphClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # --- requests ---------------------------------------------------------------------------------

    async def get_json(self, url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        """GET one Graph URL (already encoded) with retries; the JSON object it answers."""
        extra = dict(headers or {})
        if self._origin_of(url) != self._origin:
            raise GraphError(0, "foreign-url", "refusing to send the Graph token to another origin", url)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"User-Agent": "hve-relay-welcome"})
        refreshed = force_refresh = False
        attempt = 0
        while True:
            attempt += 1
            try:
                token = await self._tokens.token(force_refresh=force_refresh)
            except CredentialError as exc:
                raise GraphError(0, "no-token", str(exc), url) from exc
            force_refresh = False
            headers = {
                **extra,
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "client-request-id": str(uuid.uuid4()),
            }
            self.requests += 1
            try:
                async with self._session.get(URL(url, encoded=True), headers=headers, allow_redirects=False) as resp:
                    if resp.status == 200:
                        try:
                            body = await resp.json(content_type=None)
                        except ValueError:
                            body = None
                        if not isinstance(body, dict):
                            raise GraphError(200, "bad-response", "the answer is not a JSON object", url)
                        return body
                    code, message = await self._error_of(resp)
                    if resp.status == 401 and not refreshed:
                        # A token revoked or rotated early: one fresh token, then give up.
                        refreshed = force_refresh = True
                        attempt -= 1
                        continue
                    if resp.status not in RETRY_STATUSES:
                        raise GraphError(resp.status, code, message, url)
                    wait = retry_after_seconds(resp.headers.get("Retry-After"))
                    error: GraphError = GraphThrottled(resp.status, code, message, url, retry_after=wait)
            except (TimeoutError, aiohttp.ClientError) as exc:
                wait = None
                error = GraphError(0, type(exc).__name__, str(exc) or "no answer", url)
            if attempt >= self._max_attempts:
                raise error
            if wait is None:
                wait = backoff_seconds(attempt, self._backoff_base, self._backoff_max, self._rng)
            elif wait > self._retry_after_max:
                raise GraphThrottled(
                    error.status,
                    error.code,
                    f"asked to retry after {wait:.0f} s, more than the {self._retry_after_max:.0f} s this client waits",
                    url,
                    retry_after=wait,
                )
            self.retries += 1
            log.warning("Graph %s (%s); retry %d in %.1f s", error.status or "unreachable", error.code, attempt, wait)
            await self._sleep(wait)

    @staticmethod
    async def _error_of(resp: aiohttp.ClientResponse) -> tuple[str, str]:
        try:
            doc = await resp.json(content_type=None)
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            return str(err.get("code") or resp.reason or ""), str(err.get("message") or "")[:300]
        except (ValueError, aiohttp.ContentTypeError, UnicodeDecodeError):
            return str(resp.reason or ""), ""

    async def pages(self, path: str, params: dict[str, str]) -> AsyncIterator[list[dict[str, Any]]]:
        """Every page of a collection, following `@odata.nextLink`."""
        url: str | None = f"{self.base_url}{path}?{_query(params)}" if params else f"{self.base_url}{path}"
        while url:
            doc = await self.get_json(url)
            value = doc.get("value")
            if not isinstance(value, list):
                raise GraphError(200, "bad-response", "a collection answer has no 'value' list", url)
            yield value
            url = doc.get("@odata.nextLink")

    # --- what the welcome scan reads ----------------------------------------------------------------

    async def users_created_since(self, since: datetime, select: Iterable[str]) -> AsyncIterator[dict[str, Any]]:
        """Users with createdDateTime >= since (any order; a user may repeat across pages)."""
        params = {
            "$filter": f"createdDateTime ge {graph_time(since)}",
            "$select": ",".join(select),
            "$top": str(PAGE_SIZE),
        }
        async for page in self.pages("/v1.0/users", params):
            for item in page:
                if isinstance(item, dict) and item.get("id"):
                    yield item

    async def group_member_ids(self, group_id: str) -> frozenset[str]:
        """Ids of the users in a group, nested groups included (transitive members)."""
        path = f"/v1.0/groups/{quote(group_id, safe='')}/transitiveMembers/microsoft.graph.user"
        ids: set[str] = set()
        async for page in self.pages(path, {"$select": "id", "$top": str(PAGE_SIZE)}):
            ids.update(str(item["id"]) for item in page if isinstance(item, dict) and item.get("id"))
        return frozenset(ids)

    # --- what delivery confirmation reads (message trace) -------------------------------------------

    def message_traces_url(self, filter_text: str, top: int) -> str:
        """The first page of `GET /v1.0/admin/exchange/tracing/messageTraces` for a filter that
        shared.delivery.policy.trace_filter built (and checked)."""
        return f"{self.base_url}{TRACE_PATH}?{_query({'$filter': filter_text, '$top': str(top)})}"

    async def message_trace_page(self, url: str) -> tuple[list[dict[str, Any]], str | None]:
        """One page of trace rows and the next page's URL (None at the end). One request, no
        retries beyond the client's: the caller counts every request against its budget."""
        doc = await self.get_json(url, headers=TRACE_HEADERS)
        value = doc.get("value")
        if not isinstance(value, list):
            raise GraphError(200, "bad-response", "a collection answer has no 'value' list", _no_query(url))
        next_link = doc.get("@odata.nextLink")
        return [v for v in value if isinstance(v, dict)], next_link if isinstance(
            next_link, str
        ) and next_link else None

    async def trace_details(self, trace_id: str, recipient: str) -> list[dict[str, Any]]:
        """`getDetailsByRecipient`: the events of one recipient of one trace row."""
        literal = quote("'" + recipient.replace("'", "''") + "'", safe="'@")
        url = (
            f"{self.base_url}{TRACE_PATH}/{quote(trace_id, safe='')}/getDetailsByRecipient(recipientAddress={literal})"
        )
        doc = await self.get_json(url, headers=TRACE_HEADERS)
        value = doc.get("value")
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


TRACE_PATH = "/v1.0/admin/exchange/tracing/messageTraces"
# `recalled` is only returned when asked for.
TRACE_HEADERS = {"Prefer": "include-unknown-enum-members"}


def _no_query(url: str) -> str:
    # A trace URL names a recipient in getDetailsByRecipient: errors carry the path's start only.
    return url.split("?", 1)[0].split("/getDetailsByRecipient", 1)[0]
