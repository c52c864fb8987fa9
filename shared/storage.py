"""Azure Storage clients (queues, tables, blobs) from the app's storage setting.

A connection string locally (Azurite); identity-based (`AzureWebJobsStorage__accountName` with a
managed identity) in Azure. The async clients are bound to the event loop that created them.

The operations tools (tools/_storage.py) pass their own credential (an admin's sign-in), the
service URLs and `create_missing=False`; the app itself passes none of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from azure.core.exceptions import ResourceExistsError

from shared.settings import Settings, SettingsError

SERVICES = ("blob", "queue", "table")


def account_urls(account_name: str, endpoint_suffix: str = "core.windows.net") -> dict[str, str]:
    """The public endpoints of a storage account: {"blob": "https://<name>.blob.<suffix>", ...}."""
    return {service: f"https://{account_name}.{service}.{endpoint_suffix}" for service in SERVICES}


class StorageClients:
    def __init__(
        self,
        settings: Settings,
        credential: Any | None = None,
        *,
        service_urls: Mapping[str, str] | None = None,
        create_missing: bool = True,
    ) -> None:
        """`credential` (default: the managed identity) and `service_urls` (default: the public
        endpoints of AzureWebJobsStorage__accountName) apply when there is no connection string.
        `create_missing=False`: never create a queue or table (Bicep made them in Azure; a
        reader may not create, and a 403 there would hide the real answer)."""
        # Imported here: the SDKs are the heaviest imports of the send path (cold start).
        from azure.data.tables.aio import TableServiceClient
        from azure.storage.blob.aio import BlobServiceClient
        from azure.storage.queue.aio import QueueServiceClient

        self._created: set[str] = set()
        self._lock = asyncio.Lock()
        self._create_missing = create_missing
        conn = settings.storage_connection_string
        if conn:
            self.queues = QueueServiceClient.from_connection_string(conn)
            self.tables = TableServiceClient.from_connection_string(conn)
            self.blobs = BlobServiceClient.from_connection_string(conn)
        elif settings.storage_account_name or service_urls:
            if credential is None:
                from azure.identity.aio import ManagedIdentityCredential

                credential = ManagedIdentityCredential(client_id=settings.storage_client_id or None)
            urls = dict(service_urls or {})
            if settings.storage_account_name:
                urls = {**account_urls(settings.storage_account_name), **urls}
            if missing := [s for s in SERVICES if not urls.get(s)]:
                raise SettingsError(f"no storage account name and no {'/'.join(missing)} service URL")
            self.queues = QueueServiceClient(urls["queue"], credential=credential)
            self.tables = TableServiceClient(urls["table"], credential=credential)
            self.blobs = BlobServiceClient(urls["blob"], credential=credential)
        else:
            raise SettingsError("AzureWebJobsStorage (or AzureWebJobsStorage__accountName) is not set")

    async def table(self, name: str):
        client = self.tables.get_table_client(name)
        await self._ensure(f"table:{name}", client.create_table)
        return client

    async def queue(self, name: str):
        client = self.queues.get_queue_client(name)
        await self._ensure(f"queue:{name}", client.create_queue)
        return client

    def container(self, name: str):
        return self.blobs.get_container_client(name)

    async def _ensure(self, key: str, create) -> None:
        # Once per process: Bicep creates them in Azure, Azurite starts empty.
        if key in self._created or not self._create_missing:
            return
        async with self._lock:
            if key in self._created:
                return
            try:
                await create()
            except ResourceExistsError:
                pass
            self._created.add(key)

    async def close(self) -> None:
        for client in (self.queues, self.tables, self.blobs):
            await client.close()
