"""Where, and as whom, the operations tools (tools.ledger, .poison, .status, .enqueue, .welcome,
.delivery) reach Storage: the one place that chooses.

    --connection-string CS   or AzureWebJobsStorage (local.settings.json): Azurite, or a key
    --account-name NAME      or AZURE_STORAGE_ACCOUNT: a real account, signed in as the operator
    --endpoint-suffix S      sovereign clouds (default core.windows.net)

Precedence: the flags, then AZURE_STORAGE_ACCOUNT, then AzureWebJobsStorage, then the app's own
identity-based form (AzureWebJobsStorage__accountName, e.g. settings copied from the app).

With an account name the tools sign in with DefaultAzureCredential: environment credentials (a
service principal), workload identity, Azure CLI (`az login`), Azure Developer CLI, Azure
PowerShell, VS Code. Never the interactive browser, and not the managed identity: on an Azure VM
that has one, an admin's `az login` must not silently turn into the VM's identity. Where a managed
identity *is* the operator (Cloud Shell, a jump host, a pipeline agent), say so with the SDK's own
switch, AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential (or `prod`); when it is set, the SDK's
choice stands. The Functions host's `AzureWebJobsStorage__{blob,queue,table}ServiceUri` settings,
if set, replace the public endpoints (a private endpoint with its own DNS name, Azurite over HTTPS).

On that path nothing is created: Bicep made every queue and table, and the operator roles
(infra/README.md) are read roles where a read is enough.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared.settings import Settings, SettingsError
from shared.storage import SERVICES, StorageClients, account_urls

ACCOUNT_ENV = "AZURE_STORAGE_ACCOUNT"
SERVICE_URI_ENV = {service: f"AzureWebJobsStorage__{service}ServiceUri" for service in SERVICES}
DEFAULT_SUFFIX = "core.windows.net"
T = TypeVar("T")


@dataclass(frozen=True)
class StorageTarget:
    """A connection string, or an account reached with the operator's credential."""

    connection_string: str = ""
    account_name: str = ""
    service_urls: Mapping[str, str] = field(default_factory=dict)

    @property
    def signed_in(self) -> bool:
        return not self.connection_string

    def describe(self) -> str:
        where = self.account_name or self.service_urls.get("queue", "?")
        return f"storage account {where}, signed in with DefaultAzureCredential"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage (default: local.settings.json / the environment)")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--connection-string", metavar="CS",
                       help="a storage connection string (Azurite); default: AzureWebJobsStorage")
    which.add_argument("--account-name", metavar="NAME",
                       help=f"the relay's storage account, reached as you (az login, VS Code, environment "
                            f"credentials); default: {ACCOUNT_ENV}")
    group.add_argument("--endpoint-suffix", default=DEFAULT_SUFFIX, metavar="SUFFIX",
                       help=f"with an account name: core.chinacloudapi.cn, core.usgovcloudapi.net, ... "
                            f"(default: {DEFAULT_SUFFIX})")


def target_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> StorageTarget:
    """Call after local.settings.json has been read into the environment."""
    env = os.environ if environ is None else environ

    def get(name: str) -> str:
        return (env.get(name) or "").strip()

    suffix = getattr(args, "endpoint_suffix", None) or DEFAULT_SUFFIX
    explicit = {s: get(name) for s, name in SERVICE_URI_ENV.items() if get(name)}
    if getattr(args, "connection_string", None):
        return StorageTarget(connection_string=args.connection_string)
    name = getattr(args, "account_name", None) or get(ACCOUNT_ENV)
    if not name and not get("AzureWebJobsStorage"):
        name = get("AzureWebJobsStorage__accountName")
    if name or (explicit and not get("AzureWebJobsStorage")):
        urls = {**(account_urls(name, suffix) if name else {}), **explicit}
        return StorageTarget(account_name=name, service_urls=urls)
    return StorageTarget(connection_string=get("AzureWebJobsStorage"))


def target_from_settings(settings: Settings) -> StorageTarget:
    """What a tool function called without a target uses (tests, other code): the settings' own."""
    if settings.storage_connection_string:
        return StorageTarget(connection_string=settings.storage_connection_string)
    name = settings.storage_account_name
    return StorageTarget(account_name=name, service_urls=account_urls(name) if name else {})


class SignInError(Exception):
    """The operator is not signed in (or not as anyone Storage accepts). Not an AzureError: the
    storage SDK would retry that with back-off for a minute and more before saying so."""


class OperatorCredential:
    """DefaultAzureCredential as the operator: no managed identity (unless AZURE_TOKEN_CREDENTIALS
    says otherwise) and no browser pop-up; a failed sign-in fails at once."""

    def __init__(self) -> None:
        from azure.identity.aio import DefaultAzureCredential

        if (os.environ.get("AZURE_TOKEN_CREDENTIALS") or "").strip():
            self._credential = DefaultAzureCredential()
        else:
            self._credential = DefaultAzureCredential(exclude_managed_identity_credential=True)

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        from azure.core.exceptions import ClientAuthenticationError

        try:
            return await self._credential.get_token(*scopes, **kwargs)
        except ClientAuthenticationError as exc:
            raise SignInError(
                f"{exc.message}\nSign in first (az login, or AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET "
                "for a service principal), or give --connection-string."
            ) from None

    async def close(self) -> None:
        await self._credential.close()


def operator_credential() -> OperatorCredential:
    return OperatorCredential()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run for a tool's main(): a failed sign-in, or storage refusing who signed in, is a
    message and exit code 2 rather than a traceback."""
    from azure.core.exceptions import HttpResponseError

    try:
        return asyncio.run(coro)
    except SignInError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except HttpResponseError as exc:
        if exc.status_code not in (401, 403):
            raise
        code = getattr(exc, "error_code", None) or ""
        code = getattr(code, "value", code)
        print(f"error: storage refused the request ({exc.status_code} {code}): {exc.reason}.\n"
              "Signed in, the operator needs the roles in infra/README.md (Operator roles); a fresh "
              "role assignment can take a few minutes to apply.", file=sys.stderr)
        raise SystemExit(2) from None


class ToolStorage(StorageClients):
    """StorageClients that also closes the credential it was opened with."""

    def __init__(self, settings: Settings, credential: Any, **kwargs: Any) -> None:
        super().__init__(settings, credential, **kwargs)
        self._credential = credential

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self._credential.close()


def open_storage(settings: Settings, target: StorageTarget | None = None) -> StorageClients:
    """The clients for a tool: the connection string as is, or the operator's credential."""
    target = target or target_from_settings(settings)
    if not target.signed_in:
        return StorageClients(dataclasses.replace(settings, storage_connection_string=target.connection_string))
    if missing := [s for s in SERVICES if not target.service_urls.get(s)]:
        raise SettingsError(f"no storage account: give --account-name or {ACCOUNT_ENV} "
                            f"(or --connection-string); missing {'/'.join(missing)} endpoint")
    return ToolStorage(
        dataclasses.replace(settings, storage_connection_string="", storage_account_name=target.account_name),
        operator_credential(), service_urls=target.service_urls, create_missing=False)


def announce(target: StorageTarget) -> None:
    """One line on stderr before a tool acts on a real account: which one, and as whom."""
    if target.signed_in:
        print(f"({target.describe()})", file=sys.stderr)


def tool_settings(args: argparse.Namespace) -> tuple[Settings, StorageTarget]:
    """Settings from the environment and the storage target of the flags, announced."""
    target = target_from_args(args)
    settings = Settings.from_env()
    announce(target)
    return settings, target
