"""The Azure identity adapters against real peers speaking the real REST shapes.

azure-identity's ManagedIdentityCredential (App Service flavour: IDENTITY_ENDPOINT/IDENTITY_HEADER)
talks to tools.msi_standin; azure-keyvault-secrets' SecretClient talks HTTPS to
tools.keyvault_standin, challenge authentication included. Neither SDK client is mocked: the
only test-only inputs are the stand-ins' addresses and, for SecretClient, the local CA and
`verify_challenge_resource=False` (the vault is 127.0.0.1, not *.vault.azure.net).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest
from azure.keyvault.secrets._shared import http_challenge_cache

import shared.send.stage as sender
from shared.hve.credentials import (CredentialError, KeyVaultPasswords, TokenSource, azure_credential, check_secret_names,
                                secret_name_for)
from shared.send.stage import Relay
from shared.settings import Settings, SettingsError
from tests.relay_harness import drain, enqueue, relay_settings
from tools.keyvault_standin import VAULT_RESOURCE, KeyVaultStandIn
from tools.msi_standin import MsiStandIn

CLIENT_ID = "5b0c3a7e-9d41-4f2a-8c6e-1f7d2e9a4b30"  # the app's user-assigned identity (AZURE_CLIENT_ID)
OUTLOOK = "https://outlook.office365.com"
NEWS = "news@contoso.com"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def msi(monkeypatch):
    with MsiStandIn(assigned_client_ids=[CLIENT_ID]) as standin:
        for name, value in standin.env().items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("IDENTITY_SERVER_THUMBPRINT", raising=False)  # would mean Service Fabric
        yield standin


@pytest.fixture
def vault(msi):
    # SecretClient remembers challenges per host:port for the whole process; a new stand-in may
    # get a port an earlier one had, and every test here should see the first challenge.
    http_challenge_cache.clear()
    with KeyVaultStandIn(issuer=msi) as standin:
        yield standin


def app_settings(**env: str) -> Settings:
    return Settings.from_env({"AZURE_CLIENT_ID": CLIENT_ID, **env})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- KeyVaultPasswords ------------------------------------------------------------------------------

def test_password_is_read_with_the_managed_identity_then_cached_for_the_ttl(msi, vault):
    name = secret_name_for(NEWS)
    assert re.fullmatch(r"hve-news-contoso-com-[0-9a-f]{10}", name)
    vault.set_secret(name, "news-pw")
    settings = app_settings(KEY_VAULT_URL=vault.vault_url, HVE_SECRET_CACHE_SECONDS="300")
    clock = Clock(1000.0)

    async def main():
        credential = azure_credential(settings.managed_identity_client_id)
        passwords = KeyVaultPasswords(settings.key_vault_url, credential, settings.secret_cache_seconds,
                                      clock=clock, **vault.client_options())
        seen = []
        try:
            seen.append(("first", await passwords.password(NEWS), len(vault.requests)))
            seen.append(("cached", await passwords.password(NEWS), len(vault.requests)))
            clock.now += 299
            seen.append(("ttl-1s", await passwords.password(NEWS), len(vault.requests)))
            vault.set_secret(name, "news-pw-2")
            clock.now += 2
            seen.append(("ttl-over", await passwords.password(NEWS), len(vault.requests)))
            vault.set_secret(name, "news-pw-3")
            seen.append(("cached-again", await passwords.password(NEWS), len(vault.requests)))
            passwords.forget(NEWS)
            seen.append(("forgotten", await passwords.password(NEWS), len(vault.requests)))
        finally:
            await passwords.close()
            await credential.close()
        return seen

    seen = run(main())
    assert seen == [("first", "news-pw", 2), ("cached", "news-pw", 2), ("ttl-1s", "news-pw", 2),
                    ("ttl-over", "news-pw-2", 3), ("cached-again", "news-pw-2", 3), ("forgotten", "news-pw-3", 4)]
    # The challenge flow: an unauthenticated request, 401 with the challenge, then the bearer token.
    first, *rest = vault.requests
    assert (first.path, first.status, first.identity) == (f"/secrets/{name}/", 401, None)
    assert [(r.status, r.identity) for r in rest] == [(200, CLIENT_ID)] * 3
    assert all(r.query.get("api-version") for r in vault.requests)
    # One token for the vault, asked for with the user-assigned identity; SecretClient keeps it.
    [grant] = msi.issued
    assert (grant.resource, grant.client_id) == (VAULT_RESOURCE, CLIENT_ID)
    [token_request] = msi.requests
    assert token_request.identity_header_ok and token_request.query["api-version"] == "2019-08-01"


def test_accounts_whose_names_differ_only_in_punctuation_get_their_own_passwords(msi, vault):
    # a.b@ and a-b@ once shared one secret: one account authenticated with the other's password.
    vault.set_secret(secret_name_for("a.b@contoso.com"), "dot-password")
    vault.set_secret(secret_name_for("a-b@contoso.com"), "dash-password")

    async def main():
        credential = azure_credential(CLIENT_ID)
        passwords = KeyVaultPasswords(vault.vault_url, credential, 300, **vault.client_options())
        try:
            return await passwords.password("a.b@contoso.com"), await passwords.password("a-b@contoso.com")
        finally:
            await passwords.close()
            await credential.close()

    assert run(main()) == ("dot-password", "dash-password")


def test_start_up_refuses_accounts_that_share_a_secret_name(storage, emulator):
    def readable_only(account: str) -> str:  # the old rule, without the hash
        return "hve-" + re.sub(r"[^a-z0-9]", "-", account)

    with pytest.raises(SettingsError, match="same Key Vault secret"):
        check_secret_names(["a.b@contoso.com", "a-b@contoso.com"], name_for=readable_only)
    assert check_secret_names(["News@contoso.com", "news@contoso.com"]) == {"news@contoso.com": secret_name_for(NEWS)}
    # The relay itself checks at start-up (here: an address deploy.sh could not name the same way).
    settings = relay_settings(storage, emulator, KEY_VAULT_URL="https://127.0.0.1:1/", HVE_ACCOUNTS="néws@contoso.com")
    with pytest.raises(SettingsError, match="not an ASCII address"):
        run(Relay.create(settings))


@pytest.mark.parametrize("case", ["missing", "empty", "forbidden"])
def test_unreadable_password_raises_credential_error_naming_the_account_not_a_secret(msi, vault, case):
    vault.set_secret(secret_name_for("alerts@contoso.com"), "alerts-secret-value")
    if case == "empty":
        vault.set_secret(secret_name_for(NEWS), "")
    if case == "forbidden":
        vault.set_secret(secret_name_for(NEWS), "news-secret-value")

    async def main():
        credential = azure_credential(CLIENT_ID)
        passwords = KeyVaultPasswords(vault.vault_url, credential, 300, **vault.client_options())
        try:
            assert await passwords.password("alerts@contoso.com") == "alerts-secret-value"
            if case == "forbidden":
                vault.forbid(CLIENT_ID)
            with pytest.raises(CredentialError) as raised:
                await passwords.password(NEWS)
            return raised.value
        finally:
            await passwords.close()
            await credential.close()

    error = run(main())
    message = str(error)
    assert NEWS in message and secret_name_for(NEWS) in message
    assert "secret-value" not in message and "-pw" not in message
    expected = {"missing": (404, "ResourceNotFoundError"), "empty": (200, "is empty"),
                "forbidden": (403, "HttpResponseError")}[case]
    assert vault.requests[-1].status == expected[0] and expected[1] in message


@pytest.mark.parametrize("drop", ["connection_verify", "verify_challenge_resource"])
def test_the_test_only_client_options_are_what_makes_the_local_vault_reachable(msi, vault, drop):
    """Without the local CA the certificate is refused; without verify_challenge_resource=False the
    SDK refuses a challenge for vault.azure.net from 127.0.0.1. Production passes neither."""
    vault.set_secret(secret_name_for(NEWS), "news-pw")
    # retry_total=0: the SDK would otherwise retry the failed TLS handshake with back-off.
    options = {**{k: v for k, v in vault.client_options().items() if k != drop}, "retry_total": 0}

    async def main():
        credential = azure_credential(CLIENT_ID)
        passwords = KeyVaultPasswords(vault.vault_url, credential, 300, **options)
        try:
            with pytest.raises(CredentialError) as raised:
                await passwords.password(NEWS)
            return raised.value
        finally:
            await passwords.close()
            await credential.close()

    error = run(main())
    assert NEWS in str(error)
    cause = {"connection_verify": "CERTIFICATE_VERIFY_FAILED", "verify_challenge_resource": "does not match"}[drop]
    assert cause in str(error.__cause__)
    assert not vault.secret_reads()
    assert msi.issued == []  # no token was spent on a vault that failed verification


# --- TokenSource ------------------------------------------------------------------------------------

class Observed:
    """The real credential, with a record of how often (and how) TokenSource asks it."""

    def __init__(self, credential):
        self.credential = credential
        self.calls = []

    async def get_token(self, *scopes, **kwargs):
        self.calls.append((scopes, sorted(kwargs)))
        return await self.credential.get_token(*scopes, **kwargs)


def test_token_comes_from_the_managed_identity_and_is_cached_until_five_minutes_before_expiry(msi):
    settings = app_settings()
    msi.token_lifetime = 3600

    async def main():
        credential = Observed(azure_credential(settings.managed_identity_client_id))
        clock = Clock(time.time())
        tokens = TokenSource(credential, settings.oauth_scope, clock=clock)
        seen = []
        try:
            first = await tokens.token()
            expires_on = msi.issued[0].expires_on
            seen.append(("first", first, len(credential.calls), len(msi.issued)))
            clock.now = expires_on - 301
            seen.append(("cached", await tokens.token(), len(credential.calls), len(msi.issued)))
            clock.now = expires_on - 299
            seen.append(("margin", await tokens.token(), len(credential.calls), len(msi.issued)))
            fresh = await tokens.token(force_refresh=True)
            seen.append(("forced", fresh, len(credential.calls), len(msi.issued)))
            clock.now = msi.issued[1].expires_on - 301
            seen.append(("after", await tokens.token(), len(credential.calls), len(msi.issued)))
        finally:
            await credential.credential.close()
        return first, fresh, seen, credential.calls

    first, fresh, seen, calls = run(main())
    assert settings.oauth_scope == f"{OUTLOOK}/.default"
    assert fresh != first and [t.token for t in msi.issued] == [first, fresh]
    assert seen == [
        ("first", first, 1, 1),
        ("cached", first, 1, 1),      # TokenSource answers by itself
        ("margin", first, 2, 1),      # TokenSource asks again; by the real clock the SDK's own cache still holds
        ("forced", fresh, 3, 2),      # force_refresh reaches the identity endpoint
        ("after", fresh, 3, 2),
    ]
    assert calls[2] == ((f"{OUTLOOK}/.default",), ["claims"])
    assert {(t.resource, t.client_id) for t in msi.issued} == {(OUTLOOK, CLIENT_ID)}


def test_force_refresh_still_works_with_a_credential_that_refuses_claims():
    """Azure CLI under DefaultAzureCredential refuses claims; the plain request is the fallback."""
    from azure.core.credentials import AccessToken
    from azure.identity import CredentialUnavailableError

    class NoClaims:
        def __init__(self):
            self.issued = 0

        async def get_token(self, *scopes, claims=None, **kwargs):
            if claims:
                raise CredentialUnavailableError("This credential doesn't support claims challenges.")
            self.issued += 1
            return AccessToken(f"cli-token-{self.issued}", int(time.time()) + 3600)

    tokens = TokenSource(NoClaims(), f"{OUTLOOK}/.default")

    async def main():
        return await tokens.token(), await tokens.token(force_refresh=True)

    assert run(main()) == ("cli-token-1", "cli-token-2")


# --- the send path end to end -------------------------------------------------------------------

class Made(list):
    """What Relay.create made through shared.send.stage's names that Relay.close leaves open (in Azure
    the identity objects live as long as the process); closed on the test's own event loop."""

    async def aclose(self) -> None:
        for thing in reversed(self):
            await thing.close()


@pytest.fixture
def closing(monkeypatch):
    made = Made()
    real = sender.azure_credential

    def recording_credential(client_id):
        made.append(real(client_id))
        return made[-1]

    monkeypatch.setattr(sender, "azure_credential", recording_credential)
    return made


@pytest.fixture
def local_vault_options(monkeypatch, vault, closing):
    """Relay.create builds KeyVaultPasswords itself; give it the test-only SecretClient options."""
    real = sender.KeyVaultPasswords

    def with_local_vault(*args, **kwargs):
        passwords = real(*args, **kwargs, **vault.client_options())
        closing.append(passwords)
        return passwords

    monkeypatch.setattr(sender, "KeyVaultPasswords", with_local_vault)


def mail(request_id):
    return {"id": request_id, "to": ["Ann Example <ann@contoso.com>"], "subject": "Identity check", "text": "Hello Ann"}


def test_basic_auth_with_key_vault_password_survives_a_rotation(storage, emulator, msi, vault, closing,
                                                                local_vault_options):
    name = secret_name_for(NEWS)
    vault.set_secret(name, "news-pw")
    settings = relay_settings(
        storage, emulator, KEY_VAULT_URL=vault.vault_url, AZURE_CLIENT_ID=CLIENT_ID, HVE_PASSWORDS="",
        HVE_ACCOUNTS=NEWS, HVE_SECRET_CACHE_SECONDS="3600",
        HVE_POOL_IDLE_SECONDS="0",       # every message opens a session and authenticates
        ACCOUNT_UNHEALTHY_SECONDS="1",   # the only account is back in rotation for the retry
    )
    assert settings.auth_mode == "basic" and settings.local_passwords == {}
    steps = {}

    async def main():
        relay = await Relay.create(settings)
        try:
            await enqueue(relay, mail("kv-1"))
            steps["first"] = (await drain(relay), len(vault.secret_reads(name)), emulator.auth_count)
            await enqueue(relay, mail("kv-2"))
            steps["cached"] = (await drain(relay), len(vault.secret_reads(name)), emulator.auth_count)
            vault.set_secret(name, "news-pw-rotated")
            emulator.set_password(NEWS, "news-pw-rotated")
            await enqueue(relay, mail("kv-3"))
            steps["rotated"] = (await drain(relay), len(vault.secret_reads(name)), emulator.auth_count)
            return await relay.ledger.get("kv-3")
        finally:
            await relay.close()
            await closing.aclose()

    entry = run(main())
    results, reads, auths = steps["first"]
    assert [r.state for r in results] == ["sent"] and (reads, auths) == (1, 1)
    results, reads, auths = steps["cached"]
    assert [r.state for r in results] == ["sent"] and (reads, auths) == (1, 2)  # authenticated, vault not asked
    results, reads, auths = steps["rotated"]
    assert [(r.state, r.code, r.account) for r in results] == [("deferred", 535, NEWS), ("sent", 250, NEWS)]
    assert (reads, auths) == (2, 3)  # the 535 made it forget the cached password; the retry read the new one
    assert entry.state == "sent" and entry.attempts == 2 and entry.account == NEWS
    assert len(emulator.messages()) == 3
    assert all(r.identity in (None, CLIENT_ID) for r in vault.requests)
    assert [(t.resource, t.client_id) for t in msi.issued] == [(VAULT_RESOURCE, CLIENT_ID)]


def test_xoauth2_with_managed_identity_tokens_and_a_refresh_when_hve_says_expired(storage, emulator, msi, closing, caplog):
    msi.set_token(OUTLOOK, "hve-token-1")
    emulator.set_oauth_token("hve-token-1", NEWS)
    settings = relay_settings(storage, emulator, HVE_AUTH="oauth", AZURE_CLIENT_ID=CLIENT_ID, HVE_PASSWORDS="",
                              HVE_ACCOUNTS=NEWS, HVE_POOL_IDLE_SECONDS="0")
    steps = {}

    async def main():
        relay = await Relay.create(settings)
        try:
            await enqueue(relay, mail("oauth-1"))
            steps["first"] = (await drain(relay), len(msi.issued))
            await enqueue(relay, mail("oauth-2"))
            steps["cached"] = (await drain(relay), len(msi.issued))
            # HVE now judges the cached token expired (5.7.143), and the identity endpoint has a new one.
            emulator.set_oauth_token("hve-token-1", NEWS, expires_at=1.0)
            msi.set_token(OUTLOOK, "hve-token-2")
            emulator.set_oauth_token("hve-token-2", NEWS)
            await enqueue(relay, mail("oauth-3"))
            steps["refreshed"] = (await drain(relay), len(msi.issued))
        finally:
            await relay.close()
            await closing.aclose()

    with caplog.at_level(logging.INFO, logger="hve_emulator"):
        run(main())
    for step, issued in (("first", 1), ("cached", 1), ("refreshed", 2)):
        results, count = steps[step]
        assert [(r.state, r.account) for r in results] == [("sent", NEWS)] and count == issued, step
    assert [(t.resource, t.client_id, t.token) for t in msi.issued] == [
        (OUTLOOK, CLIENT_ID, "hve-token-1"), (OUTLOOK, CLIENT_ID, "hve-token-2")]
    auth_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("auth ")]
    assert auth_lines == [f"auth ok mechanism=XOAUTH2 account={NEWS}"] * 2 + [
        "auth refused mechanism=XOAUTH2 reply=535 5.7.143", f"auth ok mechanism=XOAUTH2 account={NEWS}"]
    assert len(emulator.messages()) == 3
