"""Reading claim-check payloads and attachments, and writing the relay's own copies.

The relay reads blobs with its own identity, which can read far more than any producer: a blob
URL in a request is therefore a claim the relay checks, never an address it simply follows (a
confused deputy otherwise: producer B, with queue rights only, could have A's invoice mailed to
itself). A URL is read only when it is

- in the producers' container (CLAIM_CHECK_CONTAINER) under `requests/<producer>/<request id>/`,
  where `<producer>` is one of BLOB_PRODUCERS (or the relay's own, `hve-relay`) and `<request id>`
  is the id of the request that names it: a producer can only write under its own prefix (an ABAC
  condition on its role, see docs/security.md), so the blob was written by that producer for that
  request; or
- the relay's own copy of a request (a deferred copy too big for the queue) in
  RELAY_STATE_CONTAINER, `deferred/<request id>-<32 hex>.json`, a container no producer is granted.

Anything else (another prefix, another request's id, another container or account, a SAS query)
is refused before a byte is read: no SSRF, no other producer's data.
"""

from __future__ import annotations

import re
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from shared.send.contract import RequestRefused

# Prefix of everything producers put in CLAIM_CHECK_CONTAINER: requests/<producer>/<request id>/...
REQUESTS_PREFIX = "requests/"
# The producer name of the relay's own producers (welcome scan, tools.enqueue, tools.demo).
RELAY_PRODUCER = "hve-relay"
# The producer name of `POST /api/send` (shared/send/intake.py): the relay writes its claim checks with
# its own identity, under a prefix of their own so they are told apart from the other tools'.
HTTP_PRODUCER = "http"
# Producer names that are the relay itself: never a name of BLOB_PRODUCERS (shared/settings.py).
RELAY_PRODUCERS = frozenset({RELAY_PRODUCER, HTTP_PRODUCER})
# Prefix of the relay's own copies in RELAY_STATE_CONTAINER.
DEFERRED_PREFIX = "deferred/"


def producer_prefix(producer: str, request_id: str) -> str:
    """Where a producer puts the blobs of one request: `requests/<producer>/<request id>/`."""
    return f"{REQUESTS_PREFIX}{producer}/{request_id}/"


class BlobReader:
    def __init__(
        self, container_client, max_bytes: int | None, *, state_container=None, producers: frozenset[str] = frozenset()
    ) -> None:
        self._container = container_client
        self._state = state_container
        self._max = max_bytes
        self._prefix = container_client.url.rstrip("/") + "/"
        self._state_prefix = state_container.url.rstrip("/") + "/" if state_container is not None else None
        self.producers = frozenset(producers) | RELAY_PRODUCERS

    # --- where a URL points, and whether this request may name it -------------------------------

    def _split(self, url: str) -> tuple[object, str, bool]:
        """(container client, blob name, is the relay's state container) of a URL in one of the
        relay's containers; RequestRefused otherwise."""
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            raise RequestRefused(
                "claim-check", "blob URLs must not carry a query (no SAS tokens: the relay uses its own identity)"
            )
        clean = f"{parts.scheme}://{parts.netloc}{parts.path}"
        for prefix, container, state in (
            (self._prefix, self._container, False),
            (self._state_prefix, self._state, True),
        ):
            if prefix is not None and clean.startswith(prefix) and len(clean) > len(prefix):
                name = unquote(clean[len(prefix) :])
                if ".." in name.split("/") or "\\" in name:
                    raise RequestRefused("claim-check", "blob name must not contain '..' or a backslash")
                return container, name, state
        raise RequestRefused(
            "claim-check", f"blob URL is outside the relay's container {self._container.container_name!r}"
        )

    def blob_name(self, url: str) -> str:
        """The name of a blob in the producers' container (RequestRefused for any other URL)."""
        _, name, state = self._split(url)
        if state:
            raise RequestRefused("claim-check", "not a blob of the producers' container")
        return name

    def locate(self, url: str, request_id: str, what: str, *, claim_check: bool = False) -> tuple[Any, str]:
        """(container client, blob name) of a blob request `request_id` may make the relay read;
        RequestRefused("blob-not-owned") when the blob is not that request's."""
        container, name, state = self._split(url)
        if state:
            # The relay's own deferred copy of this very request, and only as its claim check.
            if claim_check and re.fullmatch(re.escape(f"{DEFERRED_PREFIX}{request_id}-") + r"[0-9a-f]{32}\.json", name):
                return container, name
            raise RequestRefused(
                "blob-not-owned", f"{what}: the blob is one of the relay's own copies, not this request's"
            )
        producer, _, rest = (
            name[len(REQUESTS_PREFIX) :].partition("/") if name.startswith(REQUESTS_PREFIX) else ("", "", "")
        )
        if producer not in self.producers or not rest.startswith(f"{request_id}/") or rest == f"{request_id}/":
            raise RequestRefused(
                "blob-not-owned",
                f"{what}: the blob is not under requests/<producer>/<request id>/ of this request (a producer of "
                "BLOB_PRODUCERS, this request's id): a request may only name blobs its producer wrote for it",
            )
        return container, name

    # --- reading --------------------------------------------------------------------------------

    async def size(self, url: str, what: str, request_id: str) -> int:
        """The blob's size from its properties (nothing is downloaded)."""
        container, name = self.locate(url, request_id, what)
        try:
            props = await container.get_blob_client(name).get_blob_properties()
        except ResourceNotFoundError:
            raise RequestRefused("claim-check", f"{what}: blob {name!r} does not exist") from None
        return int(props.size)

    async def read(
        self, url: str, what: str, request_id: str, max_bytes: int | None = None, *, claim_check: bool = False
    ) -> bytes:
        """The blob's content, never more than `max_bytes` (and the reader's limit) held in memory:
        at most that many bytes plus one are asked for, so a blob that grew after its size was
        checked is refused, not read."""
        caps = [c for c in (self._max, max_bytes) if c is not None]
        cap = min(caps) if caps else None
        container, name = self.locate(url, request_id, what, claim_check=claim_check)
        try:
            stream = await container.download_blob(name, offset=0, length=cap + 1 if cap is not None else None)
        except ResourceNotFoundError:
            raise RequestRefused("claim-check", f"{what}: blob {name!r} does not exist") from None
        except HttpResponseError as exc:
            if cap is not None and getattr(exc, "error_code", None) == "InvalidRange":  # a range of an empty blob
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

    # --- the relay's own copies -----------------------------------------------------------------

    async def store(self, request_id: str, data: bytes) -> str:
        """Write the relay's copy of a request to RELAY_STATE_CONTAINER as
        `deferred/<request id>-<32 random hex>.json`, never overwriting; its URL."""
        container = self._state if self._state is not None else self._container
        name = f"{DEFERRED_PREFIX}{request_id}-{uuid.uuid4().hex}.json"
        try:
            blob = await container.upload_blob(name, data, overwrite=False)
        except ResourceNotFoundError:  # Azurite starts empty (Bicep creates the container in Azure)
            try:
                await container.create_container()
            except ResourceExistsError:
                pass
            blob = await container.upload_blob(name, data, overwrite=False)
        return blob.url
