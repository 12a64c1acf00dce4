"""A small reverse proxy for the dashboard tests: serves a router under a path prefix (HTTP and WebSocket), as
an ingress would, and can be taken down and brought back to play an unreachable API."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator

import aiohttp
from aiohttp import WSMsgType, web

from tests.conftest import free_port

HOP_BY_HOP = {"connection", "upgrade", "host", "content-length", "transfer-encoding", "keep-alive"}


class PrefixProxy:
    """http://127.0.0.1:<port><prefix>/x -> http://127.0.0.1:<upstream>/x, on its own loop in a thread."""

    def __init__(self, upstream_port: int, prefix: str = "/etl") -> None:
        self.upstream = f"http://127.0.0.1:{upstream_port}"
        self.prefix = prefix
        self.port = free_port()
        self.down = False
        self.sockets: set[web.WebSocketResponse] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}/"

    def _run(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)  # type: ignore[arg-type]

    def start(self) -> None:
        self._thread.start()
        self._run(self._start())

    async def _start(self) -> None:
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90), auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", self.prefix + "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def set_down(self, down: bool) -> None:
        """Down: every proxied WebSocket is closed and new requests get 502, like a router gone away."""
        self.down = down
        if down:
            self._run(self._close_sockets())

    async def _close_sockets(self) -> None:
        for ws in list(self.sockets):
            await ws.close(code=1011, message=b"upstream gone")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return web.Response(status=502, text="bad gateway: upstream unreachable")
        path = "/" + request.match_info["tail"]
        if request.query_string:
            path += "?" + request.query_string
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request, path)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self.session.request(
            request.method, self.upstream + path, headers=headers, data=await request.read()
        ) as upstream:
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            return web.Response(status=upstream.status, body=body, headers=out)

    async def _websocket(self, request: web.Request, path: str) -> web.StreamResponse:
        protocols = tuple(
            p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p
        )
        upstream = await self.session.ws_connect(self.upstream + path, protocols=protocols)
        ws = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
        await ws.prepare(request)
        self.sockets.add(ws)

        async def pump(source: object, sink: object) -> None:
            async for message in source:  # type: ignore[attr-defined]
                if message.type == WSMsgType.TEXT:
                    await sink.send_str(message.data)  # type: ignore[attr-defined]
                elif message.type == WSMsgType.BINARY:
                    await sink.send_bytes(message.data)  # type: ignore[attr-defined]
                else:
                    break

        tasks = [asyncio.ensure_future(pump(ws, upstream)), asyncio.ensure_future(pump(upstream, ws))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            self.sockets.discard(ws)
            await upstream.close()
            await ws.close()
        return ws

    def stop(self) -> None:
        async def stop() -> None:
            await self._close_sockets()
            if self._runner is not None:
                await self._runner.cleanup()
            await self.session.close()

        with contextlib.suppress(Exception):
            self._run(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


@contextlib.contextmanager
def prefix_proxy(upstream_port: int, prefix: str = "/etl") -> Iterator[PrefixProxy]:
    proxy = PrefixProxy(upstream_port, prefix)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
