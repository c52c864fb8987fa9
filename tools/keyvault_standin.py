"""A local stand-in for the Key Vault secrets API, over real HTTPS on 127.0.0.1.

azure-keyvault-secrets' SecretClient talks to it unchanged, challenge authentication included:

- GET /secrets/{name}[/][{version}]?api-version=...  ->  200 with the secret bundle
  {"value", "id": "<vault>/secrets/<name>/<version>", "attributes": {"enabled", "created", "updated",
  "recoveryLevel", "recoverableDays"}, "tags", ["contentType"]}.
- A request without `Authorization: Bearer ...` gets what Key Vault answers to the SDK's first,
  deliberately unauthenticated request: 401 with
  `WWW-Authenticate: Bearer authorization="https://login.microsoftonline.com/<tenant>", resource="https://vault.azure.net"`.
  The SDK then asks its credential for https://vault.azure.net/.default and sends the request again.
- A bearer token it does not trust: 401 with the same challenge (an unknown token, one issued for
  another resource, an expired one). A trusted token of an identity that was `forbid`den: 403.
- A missing secret or version: 404 SecretNotFound; a disabled version: 403 SecretDisabled; a
  missing api-version or a name Key Vault would not allow: 400 BadParameter. Errors carry Key
  Vault's JSON shape {"error": {"code", "message"[, "innerError"]}}; the messages are close to,
  not copies of, the service's.
- Names are case-insensitive, as in Key Vault; every version is kept.

Trusted tokens: those given to `trust_token`, and, with `issuer=` an MsiStandIn (tools.msi_standin),
any unexpired token it issued for resource https://vault.azure.net (the identity is its client id).

The TLS certificate comes from a private CA (tools.hve_emulator.certs: 127.0.0.1 and localhost).
Clients trust `ca_file`; SecretClient also needs `verify_challenge_resource=False`, because the
challenge names vault.azure.net while the vault is 127.0.0.1 (`client_options()` gives both).

Python API (tests)::

    with MsiStandIn() as msi, KeyVaultStandIn(issuer=msi) as kv:
        kv.set_secret(secret_name_for("news@contoso.com"), "news-pw")   # shared.hve.credentials
        SecretClient(kv.vault_url, credential, **kv.client_options())
        kv.requests            # [LoggedRequest(method, path, query, identity, status, at), ...]
        kv.forbid(client_id)   # that identity's tokens get 403
"""

from __future__ import annotations

import re
import shutil
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from aiohttp import web

from tools.http_standin import BackgroundHttpServer

from tools.hve_emulator.certs import ensure_certificates, server_tls_context

VAULT_RESOURCE = "https://vault.azure.net"
DEFAULT_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
_VERSION = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    path: str
    query: Mapping[str, str]
    identity: str | None      # who the bearer token belongs to; None when absent or not trusted
    status: int
    at: float

    @property
    def secret_name(self) -> str | None:
        parts = self.path.strip("/").split("/")
        return parts[1] if len(parts) >= 2 and parts[0] == "secrets" else None


@dataclass
class _Version:
    version: str
    value: str
    enabled: bool
    content_type: str | None
    tags: dict[str, str]
    created: int


@dataclass
class _Secret:
    name: str                              # as first created (Key Vault keeps the original case)
    versions: list[_Version] = field(default_factory=list)


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str, inner: str | None = None,
                 challenge: bool = False) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.inner, self.challenge = status, code, message, inner, challenge


class KeyVaultStandIn(BackgroundHttpServer):
    """The vault on its own thread and event loop. Public methods are thread-safe."""

    def __init__(self, *, issuer: Any = None, tenant_id: str = DEFAULT_TENANT, host: str = "127.0.0.1",
                 port: int = 0, state_dir: str | Path | None = None) -> None:
        super().__init__(host, port)
        self.tenant_id = tenant_id
        self.issuer = issuer
        self._own_state_dir = state_dir is None
        self.state_dir = Path(state_dir) if state_dir is not None else Path(tempfile.mkdtemp(prefix="kv-standin-"))
        self._certs = ensure_certificates(self.state_dir)
        self._lock = threading.RLock()
        self._secrets: dict[str, _Secret] = {}
        self._trusted: dict[str, str] = {}
        self._forbidden: set[str] = set()
        self._log: list[LoggedRequest] = []

    # -- secrets ---------------------------------------------------------------------------------

    def set_secret(self, name: str, value: str, *, enabled: bool = True, content_type: str | None = None,
                   tags: Mapping[str, str] | None = None) -> str:
        """A new (current) version of the secret; returns its version id."""
        if not _NAME.match(name):
            raise ValueError(f"invalid Key Vault secret name {name!r}")
        version = _Version(uuid.uuid4().hex, value, enabled, content_type, dict(tags or {}), int(time.time()))
        with self._lock:
            secret = self._secrets.setdefault(name.lower(), _Secret(name))
            secret.versions.append(version)
        return version.version

    def delete_secret(self, name: str) -> None:
        with self._lock:
            del self._secrets[name.lower()]

    # -- who may read ----------------------------------------------------------------------------

    def trust_token(self, token: str, identity: str = "trusted") -> None:
        with self._lock:
            self._trusted[token] = identity

    def forbid(self, identity: str, forbidden: bool = True) -> None:
        """A trusted token of `identity` (an MSI client id) is answered 403, as without an access
        policy or role assignment."""
        with self._lock:
            (self._forbidden.add if forbidden else self._forbidden.discard)(identity.lower())

    # -- the request log -------------------------------------------------------------------------

    @property
    def requests(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._log)

    def secret_reads(self, name: str | None = None) -> list[LoggedRequest]:
        """Successful GETs of secrets (of `name`, case-insensitive, when given)."""
        return [r for r in self.requests if r.method == "GET" and r.status == 200 and r.secret_name
                and (name is None or r.secret_name.lower() == name.lower())]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def vault_url(self) -> str:
        """KEY_VAULT_URL."""
        return f"https://{self.host}:{self._bound_port}"

    @property
    def ca_file(self) -> Path:
        return self._certs.ca_file

    def client_options(self) -> dict[str, Any]:
        """SecretClient keyword arguments for this stand-in (tests only)."""
        return {"connection_verify": str(self.ca_file), "verify_challenge_resource": False}

    thread_name = "keyvault-standin"

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/secrets/{name}", self._get_secret)
        app.router.add_get("/secrets/{name}/", self._get_secret)
        app.router.add_get("/secrets/{name}/{version}", self._get_secret)
        return app

    def ssl_context(self) -> ssl.SSLContext:
        return server_tls_context(self._certs)

    def stop(self) -> None:
        super().stop()
        if self._own_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    # -- HTTP ------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        identity = None
        try:
            identity = self._authenticate(request)
            if "api-version" not in request.query:
                raise _Refused(400, "BadParameter", "The api-version query parameter is required.")
            response = await handler(request)
        except _Refused as refusal:
            response = self._error(refusal)
        except web.HTTPException as exc:
            response = self._error(_Refused(exc.status, "BadParameter" if exc.status != 404 else "NotFound",
                                            exc.reason or "The request is not supported by the stand-in."))
        response.headers["x-ms-request-id"] = str(uuid.uuid4())
        response.headers["x-ms-keyvault-service-version"] = "1.9.0.0"
        with self._lock:
            self._log.append(LoggedRequest(request.method, request.path, dict(request.query), identity,
                                           response.status, time.time()))
        return response

    def _authenticate(self, request: web.Request) -> str:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _Refused(401, "Unauthorized", "AKV10000: Request is missing a Bearer or PoP token.", challenge=True)
        with self._lock:
            identity = self._trusted.get(token)
        if identity is None and self.issuer is not None:
            grant = self.issuer.lookup(token)
            if grant is not None:
                if grant.resource.rstrip("/").lower() != VAULT_RESOURCE:
                    raise _Refused(401, "Unauthorized", f"AKV10022: Invalid audience. Expected {VAULT_RESOURCE}, "
                                   f"found: {grant.resource}.", challenge=True)
                if grant.expires_on <= time.time():
                    raise _Refused(401, "Unauthorized", "AKV10032: Token expired.", challenge=True)
                identity = grant.client_id
        if identity is None:
            raise _Refused(401, "Unauthorized", "AKV10032: Invalid issuer.", challenge=True)
        with self._lock:
            forbidden = identity.lower() in self._forbidden
        if forbidden:
            raise _Refused(403, "Forbidden", f"The user, group or application '{identity}' does not have secrets "
                           "get permission on this key vault.", inner="ForbiddenByPolicy")
        return identity

    async def _get_secret(self, request: web.Request) -> web.Response:
        name, version = request.match_info["name"], request.match_info.get("version", "")
        if not _NAME.match(name):
            raise _Refused(400, "BadParameter", f"The secret name '{name}' is invalid: use 1-127 letters, digits and dashes.")
        if version and not _VERSION.match(version):
            raise _Refused(400, "BadParameter", f"Invalid secret version '{version}'.")
        with self._lock:
            secret = self._secrets.get(name.lower())
            found = None
            if secret is not None:
                found = next((v for v in secret.versions if v.version == version), None) if version else secret.versions[-1]
            if found is None:
                shown = f"{name}/{version}" if version else name
                raise _Refused(404, "SecretNotFound", f"A secret with (name/id) {shown} was not found in this key vault. "
                               "If you recently deleted this secret you may be able to recover it using the correct "
                               "recovery command. For help resolving this issue, please see "
                               "https://go.microsoft.com/fwlink/?linkid=2125182")
            if not found.enabled:
                raise _Refused(403, "Forbidden", "Operation get is not allowed on a disabled secret.", inner="SecretDisabled")
            body: dict[str, Any] = {
                "value": found.value,
                "id": f"{self._origin(request)}/secrets/{secret.name}/{found.version}",
                "attributes": {"enabled": True, "created": found.created, "updated": found.created,
                               "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90},
                "tags": dict(found.tags),
            }
            if found.content_type is not None:
                body["contentType"] = found.content_type
        return web.json_response(body)

    def _origin(self, request: web.Request) -> str:
        return f"https://{request.host}"

    def _error(self, refusal: _Refused) -> web.Response:
        error: dict[str, Any] = {"code": refusal.code, "message": refusal.message}
        if refusal.inner:
            error["innerError"] = {"code": refusal.inner}
        response = web.json_response({"error": error}, status=refusal.status)
        if refusal.challenge:
            response.headers["WWW-Authenticate"] = (
                f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", resource="{VAULT_RESOURCE}"')
        return response
