"""The aiohttp side of every role: /metrics, /healthz, /readyz, plus whatever routes the role adds."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from etlrouter.core.lifecycle import listen_error
from etlrouter.core.metrics import REGISTRY
from etlrouter.security.context import Security
from etlrouter.security.http import make_guard

# The process's Security, for the HTTP guard (api/auth.py) and the handlers.
SECURITY: web.AppKey[Security] = web.AppKey("etlrouter_security", Security)

log = logging.getLogger(__name__)

# Returns (ready, reason). Cheap and synchronous: probes call it every few seconds.
ReadinessCheck = Callable[[], tuple[bool, str]]


def build_app(
    readiness: ReadinessCheck, *, client_max_size: int = 1 << 20, security: Security | None = None
) -> web.Application:
    """An aiohttp app with the shared endpoints. Request bodies are bounded by client_max_size."""
    security = security or Security.insecure()
    app = web.Application(client_max_size=client_max_size, middlewares=[make_guard(security)])
    app[SECURITY] = security

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, reason = readiness()
        return web.json_response({"ready": ready, "reason": reason}, status=200 if ready else 503)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", make_aiohttp_handler(REGISTRY))
    return app


class HttpServer:
    def __init__(
        self,
        app: web.Application,
        *,
        host: str,
        port: int,
        setting: str = "the HTTP listen address",
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        self.setting = setting
        self.ssl_context = ssl_context
        self.handshake_timeout_s = handshake_timeout_s
        self._tls_server: asyncio.AbstractServer | None = None
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._host, self._requested_port = host, port
        self.port = port

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        try:
            if self.ssl_context is None:
                site = web.TCPSite(self._runner, self._host, self._requested_port, reuse_address=True)
                await site.start()
                server = site._server
            else:
                # HTTPS gets the gRPC listener's handshake timeout, which TCPSite cannot set. The runner's
                # low-level server is the protocol factory (aiohttp documents it for create_server).
                factory = self._runner.server
                assert factory is not None
                self._tls_server = server = await asyncio.get_running_loop().create_server(
                    factory,
                    self._host,
                    self._requested_port,
                    ssl=self.ssl_context,
                    ssl_handshake_timeout=self.handshake_timeout_s,
                    reuse_address=True,
                )
        except OSError as error:
            raise listen_error(self.address, self.setting, error) from None
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "HTTP server listening",
            extra={"fields": {"address": self.address, "tls": "on" if self.ssl_context else "off"}},
        )

    async def stop(self) -> None:
        if self._tls_server is not None:
            self._tls_server.close()
        await self._runner.cleanup()
