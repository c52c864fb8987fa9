"""A TCP proxy on 127.0.0.1 that adds a fixed one-way delay in both directions: a stand-in for the
network between the relay and Exchange Online (or Azure Storage) in benchmarks. Bytes pass
through unchanged (TLS included) and in order; only their arrival is delayed by rtt/2 each way.
"""

from __future__ import annotations

import asyncio
import threading


class LatencyProxy:
    def __init__(self, target_port: int, rtt_ms: float, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.one_way = rtt_ms / 2000.0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="latency-proxy")
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> "LatencyProxy":
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop).result()
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def close() -> None:
            self._server.close()
            # Connections still piped are ended here, not left to a stopped loop's garbage collector.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Each chunk is released one_way seconds after it was read; a queue keeps the order.
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def release() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()

        releaser = asyncio.create_task(release())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((loop.time() + self.one_way, data))
        except (ConnectionError, OSError):
            pass
        queue.put_nowait((loop.time() + self.one_way, b""))
        try:
            await releaser
        except (ConnectionError, OSError):
            pass
        try:
            writer.close()
        except Exception:
            pass
