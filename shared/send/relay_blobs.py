"""The blobs the relay keeps of a request, and their clean-up.

Two kinds, both full copies of a request (recipients and body):
- claim-check requests a producer uploads under `requests/<producer>/<request id>/` of the
  claim-check container (shared/send/producer.py, shared/send/blobs.py): the ledger row keeps the URL the
  request came by (`ClaimCheck`);
- the relay's own deferred copies in its state container, `deferred/<request id>-<32 hex>.json`,
  written when a copy going back on the queue no longer fits a queue message (Relay._requeue):
  found by their name.

Every blob of a request is deleted when the request becomes final (sent, refused, dead; by the
send stage or by the `purge_expired` sweep): the one it came by, and, for a request that came by
one of its copies (or one the sweep records dead), every copy named for it. A copy coming back
after that (a duplicate) is deleted then. The `purge_expired` timer deletes whatever is left under these prefixes after the
retention period, and a lifecycle rule (infra/modules/storage.bicep) after a few days. Nothing
else in a container is touched: attachments belong to their producer.

`relay_blob_areas` is the one place that says where these blobs live.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import ResourceNotFoundError

from shared.send.blobs import DEFERRED_PREFIX
from shared.send.producer import CLAIM_CHECK_PREFIX

log = logging.getLogger("hve_relay.blobs")

_CONCURRENCY = 16


@dataclass(frozen=True)
class BlobArea:
    """A container and name prefix under which only the relay's copies of requests live."""

    container: str
    prefix: str
    # Blob names are `<prefix><request id>-<32 hex>.json`: a request's blobs are found by name.
    # Otherwise only the URL a request came by (the ledger's `ClaimCheck`) names its blob.
    named_by_request: bool = False

    def request_blob(self, name: str, request_id: str) -> bool:
        """Whether `name` is one of `request_id`'s blobs by its name."""
        return (
            self.named_by_request
            and re.fullmatch(re.escape(f"{self.prefix}{request_id}-") + r"[0-9a-f]{32}\.json", name) is not None
        )


def relay_blob_areas(settings: Any) -> tuple[BlobArea, ...]:
    """Every (container, prefix) holding the relay's copies of requests: what is deleted when a
    request is final, swept by `purge_expired`, and covered by the lifecycle rule (tests check
    infra/modules/storage.bicep against this)."""
    return (
        BlobArea(settings.claim_check_container, CLAIM_CHECK_PREFIX),
        BlobArea(settings.relay_state_container, DEFERRED_PREFIX, named_by_request=True),
    )


class RelayBlobs:
    def __init__(self, storage: Any, areas: Sequence[BlobArea]) -> None:
        self._storage = storage
        self.areas = tuple(areas)

    @classmethod
    def of(cls, storage: Any, settings: Any) -> RelayBlobs:
        return cls(storage, relay_blob_areas(settings))

    def _container(self, area: BlobArea) -> Any:
        return self._storage.container(area.container)

    def owned(self, url: str) -> tuple[BlobArea, str] | None:
        """The area and blob name of `url` when it points under one of the relay's prefixes."""
        if not url:
            return None
        parts = urlsplit(url)
        clean = f"{parts.scheme}://{parts.netloc}{parts.path}"
        for area in self.areas:
            base = self._container(area).url.rstrip("/") + "/"
            if parts.query or parts.fragment or not clean.startswith(base):
                continue
            name = unquote(clean[len(base) :])
            if name.startswith(area.prefix) and ".." not in name.split("/") and "\\" not in name:
                return area, name
        return None

    async def delete_for_request(
        self, request_id: str, claim_blob: str = "", *, find_copies: bool | None = None, logger: logging.Logger = log
    ) -> int:
        """Best effort, never raises: delete the request's claim-check blob (if it is under one of
        the relay's prefixes) and, with `find_copies`, every blob named for it (one listing per
        area). By default (None) they are looked for only when the claim-check blob is one of
        them: only a request near the queue limit ever had a copy written, and the listing is
        spared on every other request. A copy of another delivery still on the queue is deleted
        when it comes back (`delete_copy`). How many were deleted."""
        names: set[tuple[BlobArea, str]] = set()
        try:
            owned = self.owned(claim_blob)
            # (A blob named for a request is deleted only for that request.)
            if owned is not None and (not owned[0].named_by_request or owned[0].request_blob(owned[1], request_id)):
                names.add(owned)
            if find_copies is None:
                find_copies = owned is not None and owned[0].named_by_request
            for area in self.areas:
                if not area.named_by_request or not find_copies:
                    continue
                try:
                    async for blob in self._container(area).list_blobs(name_starts_with=f"{area.prefix}{request_id}-"):
                        if area.request_blob(blob.name, request_id):
                            names.add((area, blob.name))
                except ResourceNotFoundError:
                    pass  # no container yet: nothing was written
            results = await asyncio.gather(*(self._delete(area, name) for area, name in names), return_exceptions=True)
        except Exception as exc:  # noqa: BLE001 - any storage failure is only logged
            results = [exc]
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            logger.warning(
                "request %s: claim-check blob not deleted (%s); the lifecycle rule and purge_expired will",
                request_id,
                type(failed[0]).__name__,
            )
        return sum(1 for r in results if r is True)

    async def delete_copy(self, request_id: str, url: str, *, logger: logging.Logger = log) -> bool:
        """Delete `url` if it is one of `request_id`'s blobs by its name (a copy of a request
        that is final already, delivered again); best effort."""
        try:
            owned = self.owned(url)
            if owned is None or not owned[0].request_blob(owned[1], request_id):
                return False
            return await self._delete(*owned)
        except Exception as exc:  # noqa: BLE001 - any storage failure is only logged
            logger.warning(
                "request %s: claim-check blob not deleted (%s); the lifecycle rule and purge_expired will",
                request_id,
                type(exc).__name__,
            )
            return False

    async def sweep(self, older_than: datetime, max_blobs: int) -> tuple[int, bool]:
        """Delete up to `max_blobs` blobs under the relay's prefixes last modified before
        `older_than` (requests whose clean-up failed or never ran); (deleted, whether more may
        be left)."""
        found: list[tuple[BlobArea, str]] = []
        more = False
        for area in self.areas:
            try:
                async for blob in self._container(area).list_blobs(name_starts_with=area.prefix):
                    if blob.last_modified is None or blob.last_modified >= older_than:
                        continue
                    if len(found) >= max_blobs:
                        more = True
                        break
                    found.append((area, blob.name))
            except ResourceNotFoundError:
                continue
            if more:
                break
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def delete(area: BlobArea, name: str) -> bool:
            async with gate:
                return await self._delete(area, name)

        await asyncio.gather(*(delete(a, n) for a, n in found))
        return len(found), more

    async def _delete(self, area: BlobArea, name: str) -> bool:
        try:
            await self._container(area).delete_blob(name)
            return True
        except ResourceNotFoundError:
            return False  # deleted already (another delivery, an earlier run)
