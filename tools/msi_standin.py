"""A local stand-in for the App Service / Azure Functions managed identity endpoint, over real HTTP.

azure-identity's ManagedIdentityCredential talks to it unchanged when IDENTITY_ENDPOINT and
IDENTITY_HEADER point here (and IDENTITY_SERVER_THUMBPRINT is unset, which would mean Service
Fabric). It speaks the shape of the 2019-08-01 protocol that App Service serves on plain HTTP
inside the sandbox (azure/identity/_credentials/app_service.py builds the request):

    GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=<resource>[&client_id=<uami client id>]
    X-IDENTITY-HEADER: {IDENTITY_HEADER}

    200 {"access_token": "...", "expires_on": "<epoch seconds, as a string>", "resource": "<resource>",
         "token_type": "Bearer", "client_id": "<client id>"}

The credential turns a scope into a resource by dropping "/.default", so a token for
"https://vault.azure.net/.default" is asked for resource=https://vault.azure.net.

- A missing or wrong X-IDENTITY-HEADER, another api-version, or no resource: 400/401 with a JSON
  error (the exact wording of App Service's errors is not reproduced).
- `assigned_client_ids`: the user-assigned identities the "app" has; asking for another one is a
  400, as on App Service. None (the default) accepts any client id.
- Every request is logged (`requests`), every token handed out is recorded (`issued`), and
  `lookup(token)` tells another stand-in (Key Vault) what a bearer token was issued for.

Python API (tests)::

    with MsiStandIn(token_lifetime=3600) as msi:
        monkeypatch.setenv("IDENTITY_ENDPOINT", msi.endpoint)
        monkeypatch.setenv("IDENTITY_HEADER", msi.header_secret)      # or: msi.env()
        msi.set_token("https://outlook.office365.com", "token-the-emulator-knows")
        msi.token_lifetime = 120
        msi.issued        # [IssuedToken(resource, client_id, token, expires_on, at), ...]
        msi.lookup(token) # IssuedToken | None
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from aiohttp import web

from tools.http_standin import BackgroundHttpServer

API_VERSION = "2019-08-01"
TOKEN_PATH = "/msi/token"
DEFAULT_TOKEN_LIFETIME = 24 * 3600  # managed identity tokens live about a day
SYSTEM_ASSIGNED = "system-assigned"  # client_id recorded when the request names no identity


@dataclass(frozen=True)
class IssuedToken:
    resource: str
    client_id: str       # the client id asked for, or SYSTEM_ASSIGNED
    token: str
    expires_on: int      # epoch seconds
    at: float


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: Mapping[str, str]
    identity_header_ok: bool
    status: int
    at: float


class MsiStandIn(BackgroundHttpServer):
    """The endpoint on its own thread and event loop. Public methods are thread-safe."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, header_secret: str | None = None,
                 token_lifetime: float = DEFAULT_TOKEN_LIFETIME,
                 assigned_client_ids: Iterable[str] | None = None) -> None:
        super().__init__(host, port)
        self.header_secret = header_secret or secrets.token_urlsafe(24)
        self.token_lifetime = token_lifetime
        self.assigned_client_ids = None if assigned_client_ids is None else {c.lower() for c in assigned_client_ids}
        self._lock = threading.RLock()
        self._fixed: dict[str, str] = {}
        self._issued: list[IssuedToken] = []
        self._log: list[LoggedRequest] = []

    # -- tokens ----------------------------------------------------------------------------------

    def set_token(self, resource: str, token: str | None) -> None:
        """Every token issued for `resource` from now on is `token` (None: a fresh random one each
        time, the default). `resource` as the credential sends it: no "/.default"."""
        with self._lock:
            if token is None:
                self._fixed.pop(_resource_key(resource), None)
            else:
                self._fixed[_resource_key(resource)] = token

    @property
    def issued(self) -> list[IssuedToken]:
        with self._lock:
            return list(self._issued)

    def lookup(self, token: str) -> IssuedToken | None:
        """The latest grant of `token` (a fixed token string may have been issued several times)."""
        with self._lock:
            return next((t for t in reversed(self._issued) if secrets.compare_digest(t.token, token)), None)

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()
            self._issued.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """IDENTITY_ENDPOINT."""
        return f"http://{self.host}:{self._bound_port}{TOKEN_PATH}"

    def env(self) -> dict[str, str]:
        """The variables App Service sets for a managed identity."""
        return {"IDENTITY_ENDPOINT": self.endpoint, "IDENTITY_HEADER": self.header_secret}

    thread_name = "msi-standin"

    def build_app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", TOKEN_PATH, self._token)
        return app

    # -- HTTP ------------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        header = request.headers.get("X-IDENTITY-HEADER", "")
        header_ok = bool(header) and secrets.compare_digest(header, self.header_secret)
        response = self._answer(request, header_ok)
        with self._lock:
            self._log.append(LoggedRequest(request.method, request.path, dict(request.query), header_ok,
                                           response.status, time.time()))
        return response

    def _answer(self, request: web.Request, header_ok: bool) -> web.Response:
        query = request.query
        if request.method != "GET":
            return _error(405, f"The requested resource does not support http method '{request.method}'.")
        if not header_ok:
            return _error(401, "The X-IDENTITY-HEADER header is missing or does not match IDENTITY_HEADER.")
        if query.get("api-version") != API_VERSION:
            return _error(400, f"api-version must be {API_VERSION}, got {query.get('api-version')!r}.")
        resource = query.get("resource", "")
        if not resource:
            return _error(400, "The resource parameter is required.")
        identities = [k for k in ("client_id", "principal_id", "object_id", "mi_res_id") if query.get(k)]
        if len(identities) > 1:
            return _error(400, "Only one of client_id, principal_id, object_id, mi_res_id may be given.")
        if identities and identities[0] != "client_id":
            return _error(400, "This stand-in only knows user-assigned identities by client_id.")
        client_id = query.get("client_id", "")
        if client_id and self.assigned_client_ids is not None and client_id.lower() not in self.assigned_client_ids:
            return _error(400, f"No managed identity with client_id {client_id} is assigned to this app.")
        now = time.time()
        with self._lock:
            token = self._fixed.get(_resource_key(resource)) or f"msi-{secrets.token_urlsafe(24)}"
            grant = IssuedToken(resource, client_id or SYSTEM_ASSIGNED, token, int(now + self.token_lifetime), now)
            self._issued.append(grant)
        body = {"access_token": token, "expires_on": str(grant.expires_on), "resource": resource,
                "token_type": "Bearer"}
        if client_id:
            body["client_id"] = client_id
        return web.json_response(body)


def _resource_key(resource: str) -> str:
    return resource.rstrip("/").lower()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"statusCode": status, "message": message}, status=status)
