"""A local stand-in for an Event Grid custom topic's publish API (CloudEvents schema), over real HTTPS.

    POST /api/events?api-version=2018-01-01
    Content-Type: application/cloudevents-batch+json; charset=utf-8
    Authorization: Bearer <token for https://eventgrid.azure.net>
    [ {CloudEvent}, ... ]

- 200 (empty body) when the batch is taken; every event is kept (`events`).
- No or an untrusted bearer token: 401; a token issued for another resource: 401 too. Trusted
  tokens: those given to `trust_token`, and, with `issuer=` an MsiStandIn (tools.msi_standin), any
  unexpired token it issued for resource https://eventgrid.azure.net.
- Another path: 404; another api-version: 400; another content type: 415 (Event Grid answers
  400 with its own wording; the status is what a publisher acts on); a body that is not a JSON
  array of objects with specversion, id, source and type: 400.
- `fail_next(n, status)`: the next n publishes get `status` (503: the topic unavailable).
  `hang_next(n)`: the next n publishes are never answered (the publisher times out or dies).

The TLS certificate comes from the private CA of tools.hve_emulator.certs (127.0.0.1, localhost);
the app trusts it through EVENTS_CA_FILE (`ca_file`).

Python API (tests)::

    with MsiStandIn() as msi, EventGridStandIn(issuer=msi) as topic:
        settings: EVENTS_TOPIC_ENDPOINT=topic.endpoint, EVENTS_CA_FILE=str(topic.ca_file)
        topic.events      # every event taken, in order
        topic.requests    # [LoggedRequest(path, query, content_type, identity, status, count, at), ...]
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tools.http_standin import BackgroundHttpServer
from tools.hve_emulator.certs import ensure_certificates, server_tls_context

EVENT_GRID_RESOURCE = "https://eventgrid.azure.net"
API_VERSION = "2018-01-01"
CONTENT_TYPE = "application/cloudevents-batch+json"
PATH = "/api/events"
_REQUIRED = ("specversion", "id", "source", "type")


@dataclass(frozen=True)
class LoggedRequest:
    path: str
    query: dict[str, str]
    content_type: str
    identity: str | None  # who the bearer token belongs to; None when absent or not trusted
    status: int
    count: int  # events in the batch (0 when refused before reading it)
    at: float


class EventGridStandIn(BackgroundHttpServer):
    thread_name = "eventgrid-standin"

    def __init__(self, *, issuer: Any = None, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.issuer = issuer
        self._lock = threading.RLock()
        self._trusted: dict[str, str] = {}
        self._events: list[dict[str, Any]] = []
        self._log: list[LoggedRequest] = []
        self._fail: list[int] = []
        self._hang = 0
        self._dir = Path(tempfile.mkdtemp(prefix="eventgrid-standin-"))
        self._certs = ensure_certificates(self._dir)

    # -- test API ----------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The topic endpoint as the portal shows it (EVENTS_TOPIC_ENDPOINT)."""
        return f"https://{self.host}:{self._bound_port}{PATH}"

    @property
    def ca_file(self) -> Path:
        return self._certs.ca_file

    @property
    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._events)

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def trust_token(self, token: str, identity: str = "trusted") -> None:
        with self._lock:
            self._trusted[token] = identity

    def fail_next(self, count: int = 1, status: int = 503) -> None:
        with self._lock:
            self._fail += [status] * count

    def hang_next(self, count: int = 1) -> None:
        with self._lock:
            self._hang += count

    # -- server ------------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._publish)
        return app

    def ssl_context(self) -> ssl.SSLContext:
        return server_tls_context(self._certs)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _identity(self, request: web.Request) -> str | None:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        with self._lock:
            if token in self._trusted:
                return self._trusted[token]
        grant = self.issuer.lookup(token) if self.issuer is not None else None
        if grant is None or grant.expires_on < time.time():
            return None
        if grant.resource.rstrip("/").lower() != EVENT_GRID_RESOURCE:
            return None
        return grant.client_id

    async def _publish(self, request: web.Request) -> web.Response:
        identity = self._identity(request)
        content_type = request.headers.get("Content-Type", "")
        status, count, message = await self._answer(request, identity, content_type)
        with self._lock:
            self._log.append(
                LoggedRequest(request.path, dict(request.query), content_type, identity, status, count, time.time())
            )
        if status == 200:
            return web.Response(status=200)
        return web.json_response({"error": {"code": str(status), "message": message}}, status=status)

    async def _answer(self, request: web.Request, identity: str | None, content_type: str) -> tuple[int, int, str]:
        if request.method != "POST" or request.path != PATH:
            return 404, 0, "Not found."
        if request.query.get("api-version") != API_VERSION:
            return 400, 0, f"api-version must be {API_VERSION}."
        if identity is None:
            return 401, 0, "The request authorization is missing or not valid."
        media, _, params = content_type.partition(";")
        if media.strip().lower() != CONTENT_TYPE or "charset=utf-8" not in params.replace(" ", "").lower():
            return 415, 0, f"Content-Type must be {CONTENT_TYPE}; charset=utf-8."
        with self._lock:
            hang = self._hang > 0
            self._hang -= hang
            fail = self._fail.pop(0) if self._fail and not hang else 0
        if hang:
            await asyncio.sleep(3600)
        if fail:
            return fail, 0, "Injected fault."
        try:
            batch = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return 400, 0, "The body is not JSON."
        if not isinstance(batch, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) and e.get(k) for k in _REQUIRED) for e in batch
        ):
            return 400, 0, "The body must be a JSON array of CloudEvents (specversion, id, source, type)."
        with self._lock:
            self._events.extend(batch)
        return 200, len(batch), ""
