"""HVE accounts and how HVE judges credentials: basic auth (LOGIN/PLAIN) and XOAUTH2 tokens.

Credentials are checked at AUTH time only; a connection that already authenticated keeps
sending after a password change, as with Exchange.
"""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass
from typing import Collection, Mapping

from . import replies
from .config import OAuthToken


@dataclass(frozen=True)
class AuthDecision:
    """account is the configured address when accepted, None when refused with reply."""

    account: str | None
    reply: str


@dataclass(frozen=True)
class XOAuth2Credentials:
    user: str
    token: str


@dataclass
class _Account:
    address: str
    password: str
    basic_blocked: bool = False
    disabled: bool = False


class AccountStore:
    """Thread-safe: tests change accounts from their thread while the server runs in its own."""

    def __init__(
        self,
        accounts: Mapping[str, str],
        oauth_tokens: Mapping[str, str | OAuthToken],
        basic_auth_blocked: Collection[str] = (),
    ) -> None:
        self._configured_accounts = dict(accounts)
        self._configured_tokens = {
            token: grant if isinstance(grant, OAuthToken) else OAuthToken(account=grant)
            for token, grant in oauth_tokens.items()
        }
        self._configured_blocked = {a.lower() for a in basic_auth_blocked}
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, OAuthToken] = {}
        self.reset()

    def reset(self) -> None:
        """Back to the configuration: passwords, blocks and tokens changed at runtime are undone."""
        with self._lock:
            self._accounts = {
                address.lower(): _Account(
                    address, password, basic_blocked=address.lower() in self._configured_blocked
                )
                for address, password in self._configured_accounts.items()
            }
            self._tokens = dict(self._configured_tokens)

    def canonical(self, address: str) -> str | None:
        with self._lock:
            account = self._accounts.get(address.lower())
            return account.address if account else None

    def set_password(self, address: str, password: str) -> None:
        """Change a password (an unknown address becomes a new account until reset())."""
        with self._lock:
            account = self._accounts.get(address.lower())
            if account is None:
                self._accounts[address.lower()] = _Account(address, password)
            else:
                account.password = password

    def block_basic_auth(self, address: str, blocked: bool = True) -> None:
        with self._lock:
            self._require(address).basic_blocked = blocked

    def disable_account(self, address: str, disabled: bool = True) -> None:
        with self._lock:
            self._require(address).disabled = disabled

    def set_oauth_token(self, token: str, grant: OAuthToken | None) -> None:
        """Add or replace a token; None revokes it."""
        with self._lock:
            if grant is None:
                self._tokens.pop(token, None)
            else:
                self._tokens[token] = grant

    def check_password(self, login: str, password: str) -> AuthDecision:
        with self._lock:
            account = self._accounts.get(login.lower())
            # The authentication policy is applied before the password is looked at.
            if account is not None and account.basic_blocked:
                return AuthDecision(None, replies.BASIC_AUTH_BLOCKED)
            if (
                account is None
                or account.disabled
                or not hmac.compare_digest(account.password.encode(), password.encode())
            ):
                return AuthDecision(None, replies.AUTH_FAILED)
            return AuthDecision(account.address, replies.AUTH_OK)

    def check_token(self, credentials: XOAuth2Credentials, now: float) -> AuthDecision:
        with self._lock:
            grant = self._tokens.get(credentials.token)
            if grant is None:
                # Not a token Entra would have issued for this tenant.
                return AuthDecision(None, replies.AUTH_FAILED)
            if grant.expires_at is not None and now >= grant.expires_at:
                return AuthDecision(None, replies.TOKEN_EXPIRED)
            if not grant.mail_send:
                return AuthDecision(None, replies.TOKEN_MISSING_PERMISSION)
            account = self._accounts.get(credentials.user.lower())
            if account is None or credentials.user.lower() != grant.account.lower():
                return AuthDecision(None, replies.APP_NOT_ALLOWED)
            if account.disabled:
                return AuthDecision(None, replies.AUTH_FAILED)
            return AuthDecision(account.address, replies.AUTH_OK)

    def _require(self, address: str) -> _Account:
        account = self._accounts.get(address.lower())
        if account is None:
            raise KeyError(f"unknown HVE account {address!r}")
        return account


def parse_xoauth2(raw: bytes) -> XOAuth2Credentials | None:
    """Parse the decoded SASL XOAUTH2 response; None when malformed.

    Format: "user=" user "\\x01auth=Bearer " token "\\x01\\x01".
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.endswith("\x01\x01"):
        return None
    fields = dict(part.split("=", 1) for part in text[:-2].split("\x01") if "=" in part)
    user = fields.get("user", "")
    scheme, _, token = fields.get("auth", "").partition(" ")
    if not user or scheme.lower() != "bearer" or not token.strip():
        return None
    return XOAuth2Credentials(user=user, token=token.strip())
