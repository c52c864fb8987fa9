"""Secrets and tokens for authenticating to HVE: passwords (Key Vault or local) and OAuth tokens."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from shared.settings import SettingsError

# Key Vault secret names are 1-127 letters, digits and dashes: a readable part and a hash.
_READABLE_MAX = 100
_HASH_CHARS = 10


def secret_name_for(account: str) -> str:
    """Key Vault secret name of an account's password: `hve-` + the address lower-cased with every
    character other than a-z and 0-9 replaced by `-` (cut to 100 characters) + `-` + the first 10
    hex digits of SHA-256 of the lower-cased address. The readable part alone would map `a.b@x`
    and `a-b@x` to one secret; the hash keeps the names apart. infra/deploy.sh computes the same."""
    address = account.strip().lower()
    readable = re.sub(r"[^a-z0-9]", "-", address)[:_READABLE_MAX]
    digest = hashlib.sha256(address.encode("utf-8")).hexdigest()[:_HASH_CHARS]
    return f"hve-{readable}-{digest}"


def check_secret_names(accounts: Iterable[str], name_for: Callable[[str], str] = secret_name_for) -> dict[str, str]:
    """Account -> secret name, or SettingsError when two accounts would share a secret (one would
    authenticate with the other's password) or an address is not ASCII (deploy.sh and this module
    must lower-case it the same way)."""
    names: dict[str, str] = {}
    owners: dict[str, str] = {}
    for account in accounts:
        address = account.strip().lower()
        if not address.isascii():
            raise SettingsError(f"HVE_ACCOUNTS: {address!r} is not an ASCII address")
        name = name_for(address)
        if name in owners and owners[name] != address:
            raise SettingsError(f"HVE_ACCOUNTS: {owners[name]} and {address} map to the same Key Vault secret {name!r}")
        owners[name] = address
        names[address] = name
    return names


class CredentialError(Exception):
    """A password or token could not be obtained; the message names the account, never the secret."""


class PasswordSource(Protocol):
    async def password(self, account: str) -> str: ...

    def forget(self, account: str) -> None: ...


class LocalPasswords:
    """HVE_PASSWORDS: for a laptop or tests only."""

    def __init__(self, passwords: Mapping[str, str]) -> None:
        self._passwords = {k.lower(): v for k, v in passwords.items()}

    async def password(self, account: str) -> str:
        try:
            return self._passwords[account.lower()]
        except KeyError:
            raise CredentialError(f"HVE_PASSWORDS has no password for {account}") from None

    def forget(self, account: str) -> None:
        pass


@dataclass
class _Cached:
    value: str
    expires: float


class KeyVaultPasswords:
    """Passwords read from Key Vault with the app's identity, cached for a while so a burst of
    messages is not a burst of Key Vault calls. `forget` after an auth failure picks up a rotation."""

    def __init__(
        self,
        vault_url: str,
        credential: Any,
        ttl_seconds: float,
        clock: Callable[[], float] = time.monotonic,
        **client_options: Any,
    ) -> None:
        """`client_options` go to SecretClient unchanged; only tests pass them (a local CA in
        `connection_verify`, `verify_challenge_resource=False` for a vault on 127.0.0.1)."""
        from azure.keyvault.secrets.aio import SecretClient

        self._client = SecretClient(vault_url=vault_url, credential=credential, **client_options)
        self._ttl = ttl_seconds
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._lock = asyncio.Lock()

    async def password(self, account: str) -> str:
        cached = self._cache.get(account)
        if cached and cached.expires > self._clock():
            return cached.value
        async with self._lock:
            cached = self._cache.get(account)
            if cached and cached.expires > self._clock():
                return cached.value
            name = secret_name_for(account)
            try:
                secret = await self._client.get_secret(name)
            except Exception as exc:  # the SDK raises several types; the caller needs one
                raise CredentialError(
                    f"cannot read Key Vault secret {name!r} for {account}: {type(exc).__name__}"
                ) from exc
            if not secret.value:
                raise CredentialError(f"Key Vault secret {name!r} for {account} is empty")
            self._cache[account] = _Cached(secret.value, self._clock() + self._ttl)
            return secret.value

    def forget(self, account: str) -> None:
        self._cache.pop(account, None)

    async def close(self) -> None:
        await self._client.close()


class TokenSource:
    """An app-only access token for XOAUTH2, cached until shortly before it expires.

    `credential` is any azure-identity async credential (managed identity in Azure)."""

    REFRESH_MARGIN_SECONDS = 300

    def __init__(self, credential: Any, scope: str, clock: Callable[[], float] = time.time) -> None:
        self._credential = credential
        self._scope = scope
        self._clock = clock
        self._token: str | None = None
        self._expires_on = 0.0
        self._lock = asyncio.Lock()

    async def token(self, force_refresh: bool = False) -> str:
        if not force_refresh and self._token and self._expires_on - self.REFRESH_MARGIN_SECONDS > self._clock():
            return self._token
        async with self._lock:
            if not force_refresh and self._token and self._expires_on - self.REFRESH_MARGIN_SECONDS > self._clock():
                return self._token
            try:
                access = await (self._newer_token() if force_refresh else self._credential.get_token(self._scope))
            except Exception as exc:
                raise CredentialError(f"cannot get a token for {self._scope}: {type(exc).__name__}") from exc
            self._token, self._expires_on = access.token, float(access.expires_on)
            return self._token

    async def _newer_token(self) -> Any:
        """A token other than the one just refused. azure-identity credentials keep a cache of their
        own and would hand that very token back until it nearly expires; given claims they skip it.
        The claims are Entra's CAE shape ("issued no earlier than now"); managed identity drops them
        from the request. A credential that refuses claims (Azure CLI under DefaultAzureCredential)
        gets the plain request."""
        claims = json.dumps({"access_token": {"nbf": {"essential": True, "value": str(int(time.time()))}}})
        try:
            return await self._credential.get_token(self._scope, claims=claims)
        except Exception:
            return await self._credential.get_token(self._scope)


def azure_credential(client_id: str) -> Any:
    """The app's identity: the user-assigned managed identity when its client id is set."""
    if client_id:
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=client_id)
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


if __name__ == "__main__":  # python -m shared.hve.credentials ADDRESS...: the secret name of each account
    import sys

    for account, name in check_secret_names(sys.argv[1:]).items():
        print(f"{account}\t{name}")
