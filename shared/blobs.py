"""Reading claim-check payloads and attachments from the relay's own blob container.

A URL is trusted only when it points into that container of the relay's storage account: the
request cannot make the relay read anything else (no SSRF, no other tenant's data).
"""

from __future__ import annotations

import uuid
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from .contract import RequestRefused


class BlobReader:
    def __init__(self, container_client, max_bytes: int | None) -> None:
        self._container = container_client
        self._max = max_bytes
        self._prefix = container_client.url.rstrip("/") + "/"

    def blob_name(self, url: str) -> str:
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            raise RequestRefused("claim-check", "blob URLs must not carry a query (no SAS tokens: the relay uses its own identity)")
        clean = f"{parts.scheme}://{parts.netloc}{parts.path}"
        if not clean.startswith(self._prefix) or len(clean) == len(self._prefix):
            raise RequestRefused("claim-check", f"blob URL is outside the relay's container {self._container.container_name!r}")
        name = unquote(clean[len(self._prefix):])
        if ".." in name.split("/") or "\\" in name:
            raise RequestRefused("claim-check", "blob name must not contain '..' or a backslash")
        return name

    async def size(self, url: str, what: str) -> int:
        """The blob's size from its properties (nothing is downloaded)."""
        name = self.blob_name(url)
        try:
            props = await self._container.get_blob_client(name).get_blob_properties()
        except ResourceNotFoundError:
            raise RequestRefused("claim-check", f"{what}: blob {name!r} does not exist") from None
        return int(props.size)

    async def read(self, url: str, what: str, max_bytes: int | None = None) -> bytes:
        """The blob's content, never more than `max_bytes` (and the reader's limit) held in memory:
        at most that many bytes plus one are asked for, so a blob that grew after its size was
        checked is refused, not read."""
        caps = [c for c in (self._max, max_bytes) if c is not None]
        cap = min(caps) if caps else None
        name = self.blob_name(url)
        try:
            stream = await self._container.download_blob(name, offset=0, length=cap + 1 if cap is not None else None)
        except ResourceNotFoundError:
            raise RequestRefused("claim-check", f"{what}: blob {name!r} does not exist") from None
        except HttpResponseError as exc:
            if cap is not None and exc.error_code == "InvalidRange":  # a range of an empty blob
                return b""
            raise
        total = stream.properties.size
        if cap is not None and total is not None and total > cap:
            raise RequestRefused("too-large", f"{what}: blob {name!r} is {total} bytes, over the {cap}-byte limit")
        data = bytearray()
        async for chunk in stream.chunks():
            data += chunk
            if cap is not None and len(data) > cap:
                raise RequestRefused("too-large", f"{what}: blob {name!r} is over the {cap}-byte limit")
        return bytes(data)

    async def store(self, prefix: str, data: bytes) -> str:
        """Write `data` under `prefix` with an unguessable suffix, never overwriting; its URL."""
        name = f"{prefix}-{uuid.uuid4().hex}.json"
        try:
            blob = await self._container.upload_blob(name, data, overwrite=False)
        except ResourceNotFoundError:  # Azurite starts empty (Bicep creates the container in Azure)
            try:
                await self._container.create_container()
            except ResourceExistsError:
                pass
            blob = await self._container.upload_blob(name, data, overwrite=False)
        return blob.url
