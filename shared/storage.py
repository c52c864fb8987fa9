"""Azure Storage clients (queues, tables, blobs) from the app's storage setting.

A connection string locally (Azurite); identity-based (`AzureWebJobsStorage__accountName` with a
managed identity) in Azure. The async clients are bound to the event loop that created them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from azure.core.exceptions import ResourceExistsError

from shared.settings import Settings, SettingsError


class StorageClients:
    def __init__(self, settings: Settings, credential: Any | None = None) -> None:
        # Imported here: the SDKs are the heaviest imports of the send path (cold start).
        from azure.data.tables.aio import TableServiceClient
        from azure.storage.blob.aio import BlobServiceClient
        from azure.storage.queue.aio import QueueServiceClient

        self._created: set[str] = set()
        self._lock = asyncio.Lock()
        conn = settings.storage_connection_string
        if conn:
            self.queues = QueueServiceClient.from_connection_string(conn)
            self.tables = TableServiceClient.from_connection_string(conn)
            self.blobs = BlobServiceClient.from_connection_string(conn)
        elif settings.storage_account_name:
            if credential is None:
                from azure.identity.aio import ManagedIdentityCredential

                credential = ManagedIdentityCredential(client_id=settings.storage_client_id or None)
            name = settings.storage_account_name
            self.queues = QueueServiceClient(f"https://{name}.queue.core.windows.net", credential=credential)
            self.tables = TableServiceClient(f"https://{name}.table.core.windows.net", credential=credential)
            self.blobs = BlobServiceClient(f"https://{name}.blob.core.windows.net", credential=credential)
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
        if key in self._created:
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
