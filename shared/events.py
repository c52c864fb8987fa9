"""Event targets (adapter): where outcome events go, and nothing about when or why.

- `QueueTarget`: a storage queue (EVENTS_QUEUE), one event per message as its JSON text (no
  base64), messages that never expire (a consumer deletes them once handled).
- `EventGridTarget`: an Event Grid custom topic (EVENTS_TOPIC_ENDPOINT), the CloudEvents batch
  publish API: `POST {topic endpoint}/api/events?api-version=2018-01-01` with
  `Content-Type: application/cloudevents-batch+json; charset=utf-8` and a bearer token of the app's
  managed identity for https://eventgrid.azure.net (role "EventGrid Data Sender" on the topic).
  Plain aiohttp (loaded by the async Azure SDKs already) rather than the azure-eventgrid SDK.

`Publisher.publish` sends a batch to every target and raises `EventsUnavailable` when one of them
did not take it (the caller decides what that means: see shared/send/events.py and
shared/delivery/events.py). Off (no target) unless EVENTS_QUEUE or EVENTS_TOPIC_ENDPOINT is set.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

from shared.settings import Settings

EVENT_GRID_SCOPE = "https://eventgrid.azure.net/.default"
EVENT_GRID_API_VERSION = "2018-01-01"
CLOUDEVENTS_BATCH = "application/cloudevents-batch+json; charset=utf-8"
_TIMEOUT_SECONDS = 10.0


class EventsUnavailable(Exception):
    """A target did not take the events (the message names the target, never an event's content)."""


class Target(Protocol):
    name: str

    async def publish(self, events: list[dict[str, Any]]) -> None: ...

    async def close(self) -> None: ...


def event_text(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


class QueueTarget:
    def __init__(self, name: str, queue: Callable[[], Awaitable[Any]]) -> None:
        self.name = f"queue {name}"
        self._queue = queue  # the queue client, made (and the queue created locally) on first use

    async def publish(self, events: list[dict[str, Any]]) -> None:
        from azure.core.exceptions import AzureError

        try:
            queue = await self._queue()
            for event in events:
                await queue.send_message(event_text(event), time_to_live=-1)
        except AzureError as exc:
            raise EventsUnavailable(f"{self.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc

    async def close(self) -> None:
        return None  # the storage clients belong to the caller


def topic_url(endpoint: str) -> str:
    """The publish URL of a topic endpoint, given with or without its `/api/events` path."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme != "https" or not parts.hostname:
        raise ValueError("EVENTS_TOPIC_ENDPOINT must be an https:// URL")
    path = parts.path.rstrip("/")
    if not path.endswith("/api/events"):
        path += "/api/events"
    return f"https://{parts.netloc}{path}?api-version={EVENT_GRID_API_VERSION}"


class EventGridTarget:
    def __init__(self, endpoint: str, credential: Any, *, ca_file: str = "", owns_credential: bool = False) -> None:
        self.url = topic_url(endpoint)
        self.name = f"Event Grid topic {urlsplit(self.url).hostname}"
        self._credential = credential
        self._owns_credential = owns_credential
        self._ssl = ssl.create_default_context()
        if ca_file:
            self._ssl.load_verify_locations(cafile=ca_file)
        self._session: Any = None

    async def publish(self, events: list[dict[str, Any]]) -> None:
        import aiohttp

        try:
            token = (await self._credential.get_token(EVENT_GRID_SCOPE)).token
        except Exception as exc:  # azure-identity raises its own types; any of them means no token
            raise EventsUnavailable(f"{self.name}: no token: {type(exc).__name__}") from exc
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_TIMEOUT_SECONDS))
        body = ("[" + ",".join(event_text(e) for e in events) + "]").encode("utf-8")
        headers = {"Authorization": f"Bearer {token}", "Content-Type": CLOUDEVENTS_BATCH}
        try:
            async with self._session.post(self.url, data=body, headers=headers, ssl=self._ssl) as resp:
                if resp.status != 200:
                    raise EventsUnavailable(f"{self.name}: HTTP {resp.status}")
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise EventsUnavailable(f"{self.name}: {type(exc).__name__}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._owns_credential:
            await self._credential.close()


class Publisher:
    def __init__(self, targets: list[Target], source: str) -> None:
        self.targets = targets
        self.source = source

    @property
    def enabled(self) -> bool:
        return bool(self.targets)

    async def publish(self, events: list[dict[str, Any]]) -> None:
        """Every event to every target (each target all of them, in order); EventsUnavailable
        naming the targets that failed, after all were tried."""
        failed = []
        for target in self.targets:
            try:
                await target.publish(events)
            except EventsUnavailable as exc:
                failed.append(str(exc))
        if failed:
            raise EventsUnavailable("; ".join(failed))

    async def close(self) -> None:
        for target in self.targets:
            await target.close()


def app_credential(client_id: str) -> Any:
    """The app's identity (as in shared/hve/credentials.py: the user-assigned identity when its
    client id is set)."""
    if client_id:
        from azure.identity.aio import ManagedIdentityCredential

        return ManagedIdentityCredential(client_id=client_id)
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


def source_of(name: str) -> str:
    """`/hve-relay/<EVENTS_SOURCE, else the app's name>` (`local` when neither is set)."""
    return f"/hve-relay/{(name or 'local').strip().strip('/')}"


def publisher(settings: Settings, storage: Any, *, credential: Any = None) -> Publisher:
    """The targets the settings name (none: events off). `storage`: the caller's StorageClients;
    `credential`: for the topic (default: the app's managed identity, closed with the publisher)."""
    targets: list[Target] = []
    if settings.events_queue:
        targets.append(QueueTarget(settings.events_queue, lambda: storage.queue(settings.events_queue)))
    if settings.events_topic_endpoint:
        own = credential is None
        targets.append(
            EventGridTarget(
                settings.events_topic_endpoint,
                app_credential(settings.managed_identity_client_id) if own else credential,
                ca_file=settings.events_ca_file,
                owns_credential=own,
            )
        )
    return Publisher(targets, source_of(settings.events_source))
