"""The lifecycle the local HTTP stand-ins share (Graph, managed identity, Key Vault): an aiohttp
application served on 127.0.0.1 from its own event-loop thread, started and stopped from tests
or a CLI. A subclass builds the application; this class runs it."""

from __future__ import annotations

import asyncio
import ssl
import threading
from typing import Any

from aiohttp import web


class BackgroundHttpServer:
    thread_name = "http-standin"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._bound_port = 0

    # -- for subclasses --------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        raise NotImplementedError

    def ssl_context(self) -> ssl.SSLContext | None:
        return None  # plain HTTP unless a subclass serves HTTPS

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._bound_port

    def start(self) -> Any:
        if self._thread is not None:
            raise RuntimeError(f"{self.thread_name} already running")
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start_server())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup() if self._runner else asyncio.sleep(0))
            loop.close()

        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            self._thread = None
            raise failure[0]
        return self

    async def _start_server(self) -> None:
        self._runner = web.AppRunner(self.build_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port, ssl_context=self.ssl_context())
        await site.start()
        self._bound_port = self._runner.addresses[0][1]

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._thread = None
        self._loop = None

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
