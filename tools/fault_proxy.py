"""A TCP proxy on 127.0.0.1 in front of one HTTP service (an Azurite port) that injects storage faults.

Bytes pass through unchanged, except that:

* `rule(method, path)` may return a `Fault` for a request: the client gets that HTTP status instead of
  the service's answer, and the connection is closed. With `applied=False` the request never reaches
  the service; with `applied=True` it is forwarded, the proxy waits until the service starts answering
  (so the change is made), then answers the fault instead: the client cannot tell whether its write
  happened, as with a real 500 or a connection lost mid-response. With `stall=True` the request
  never reaches the service and is never answered (the client waits until it gives up or dies).
* `down()` makes the service unavailable until `up()`: open connections are cut and new ones are
  closed at once (the storage SDKs see connection errors and retry).
* `stall()` makes it a black hole until `up()`: connections are accepted and read, never answered
  (a network path that drops packets: the SDKs wait out their timeouts, then retry).

    proxy = FaultProxy(azurite.table_port, rule=lambda method, path: Fault(503) if ... else None)
    with proxy:
        connection_string(az.blob_port, az.queue_port, proxy.port)

Used by the crash/fault tests and `bench/conservation.py`; it never touches anything but loopback.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Callable

_REASONS = {400: "Bad Request", 403: "Forbidden", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass(frozen=True)
class Fault:
    status: int = 503
    applied: bool = False  # forward the request first: the service makes the change, the client sees the fault
    stall: bool = False    # neither forward nor answer it: the connection hangs until the client closes it


Rule = Callable[[str, str], "Fault | None"]


class FaultProxy:
    def __init__(self, target_port: int, *, rule: Rule | None = None, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.rule = rule
        self.port = 0
        self.injected = 0        # faults answered
        self.requests = 0        # requests seen (parsed)
        self._down = False
        self._stalled = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fault-proxy")
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> "FaultProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result()
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            self._cut_all()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- steering ----------------------------------------------------------------------------

    def down(self) -> None:
        """The service is unreachable from now on (open connections are cut)."""
        def go() -> None:
            self._down = True
            self._cut_all()

        self._loop.call_soon_threadsafe(go)

    def stall(self) -> None:
        """Requests are read and never answered from now on (open connections are cut)."""
        def go() -> None:
            self._stalled = True
            self._cut_all()

        self._loop.call_soon_threadsafe(go)

    def up(self) -> None:
        def go() -> None:
            if self._stalled:
                self._cut_all()   # the stalled ones: their clients retry on fresh connections
            self._down = self._stalled = False

        self._loop.call_soon_threadsafe(go)

    # -- the proxy ---------------------------------------------------------------------------

    def _cut_all(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        if self._down:
            client_writer.close()
            return
        if self._stalled:
            self._writers.add(client_writer)
            try:
                while await client_reader.read(65536):
                    pass
            except (ConnectionError, OSError):
                pass
            finally:
                self._writers.discard(client_writer)
                client_writer.close()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, upstream_writer}
        answered = asyncio.Event()   # the service started answering the last request
        muted = [False]              # drop the service's answer (a fault replaces it)

        async def downstream() -> None:
            try:
                while data := await upstream_reader.read(65536):
                    answered.set()
                    if not muted[0]:
                        client_writer.write(data)
                        await client_writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                client_writer.close()

        pipe = asyncio.create_task(downstream())
        try:
            await self._requests(client_reader, client_writer, upstream_writer, answered, muted)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            upstream_writer.close()
            client_writer.close()
            self._writers -= {client_writer, upstream_writer}
            pipe.cancel()

    async def _requests(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter,
                        upstream: asyncio.StreamWriter, answered: asyncio.Event, muted: list[bool]) -> None:
        # HTTP/1.1 clients here (aiohttp, urllib3) send one request and wait for its answer before the
        # next on the same connection, so a request starts where the previous one's body ended.
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path = (lines[0].split(" ") + ["", ""])[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            if "chunked" in headers.get("transfer-encoding", "").lower():
                # Not parsed: pass the rest of this connection through untouched.
                upstream.write(head)
                while data := await reader.read(65536):
                    upstream.write(data)
                    await upstream.drain()
                return
            body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
            self.requests += 1
            fault = self.rule(method, path) if self.rule else None
            if fault is None:
                answered.clear()
                upstream.write(head + body)
                await upstream.drain()
                continue
            self.injected += 1
            if fault.stall:
                while await reader.read(65536):
                    pass
                return
            if fault.applied:
                muted[0] = True
                answered.clear()
                upstream.write(head + body)
                await upstream.drain()
                try:
                    await asyncio.wait_for(answered.wait(), timeout=30)
                except asyncio.TimeoutError:
                    pass
            reason = _REASONS.get(fault.status, "Error")
            payload = f'{{"odata.error":{{"code":"InjectedFault","message":{{"lang":"en-US","value":"{reason}"}}}}}}'.encode()
            client.write(f"HTTP/1.1 {fault.status} {reason}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload)
            await client.drain()
            return
