"""What every long-running role shares: a gRPC server (health + reflection) and an HTTP server
(/metrics, /healthz, /readyz), started and stopped together."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from etlrouter import __version__
from etlrouter.core.config import ListenConfig, TransportConfig
from etlrouter.core.grpc import FeedsCheck, GrpcServer
from etlrouter.core.http import HttpServer, ReadinessCheck, build_app
from etlrouter.core.metrics import BUILD_INFO
from etlrouter.security.context import Security

log = logging.getLogger(__name__)


# The roles whose listen ports are also command-line flags (cli.py: --grpc-port, --http-port).
_PORT_FLAGS = ("router", "sidecar")


def listen_setting(role: str, server: str) -> str:
    """The config key (and flag) that chose a role's listen address, for a bind error."""
    key = f"{role}.{server}.host/port"
    return f"{key} or --{server}-port" if role in _PORT_FLAGS else key


class RoleRuntime:
    """The shared servers of a role. Roles subclass it or hand it their gRPC services and HTTP routes."""

    def __init__(
        self,
        role: str,
        *,
        grpc_listen: ListenConfig,
        http_listen: ListenConfig,
        transport_config: TransportConfig,
        grpc_services: Sequence[Any] = (),
        readiness: ReadinessCheck | None = None,
        security: Security | None = None,
        feeds: FeedsCheck | None = None,
    ) -> None:
        self.role = role
        self.security = security or Security.insecure()
        self.grpc = GrpcServer(
            grpc_services,
            host=grpc_listen.host,
            port=grpc_listen.port,
            transport_config=transport_config,
            setting=listen_setting(role, "grpc"),
            security=self.security,
            feeds=feeds,
        )
        self.app: web.Application = build_app(
            readiness or (lambda: (True, "serving")), security=self.security
        )
        self.http = HttpServer(
            self.app,
            host=http_listen.host,
            port=http_listen.port,
            setting=listen_setting(role, "http"),
            ssl_context=self.security.http_server_context(),
            handshake_timeout_s=self.security.tls_config.handshake_timeout_ms / 1000,
        )
        self._done = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        BUILD_INFO.labels(version=__version__, role=role).set(1)

    async def start(self) -> None:
        await self.grpc.start()
        await self.start_http()

    def _watch_credentials(self) -> None:
        self.security.warn_if_plaintext(f"the {self.role}")
        if self.security.enabled and self._watch is None:
            self._watch = asyncio.ensure_future(self.security.watch())

    async def start_http(self) -> None:
        """Start the HTTP server: the last step of starting (roles that must bind gRPC before starting
        their core call grpc.start(), start the core, then this)."""
        await self.http.start()
        self._watch_credentials()
        log.info(
            "%s started",
            self.role,
            extra={"fields": {"grpc": self.grpc.address, "http": self.http.address, "version": __version__}},
        )

    async def wait(self) -> None:
        await self._done.wait()

    async def drain(self) -> None:
        self.grpc.set_serving(False)

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.grpc.stop()
        await self.http.stop()
        self._done.set()
        log.info("%s stopped", self.role)
