"""Serving SDK services: a grpclib server with health and reflection, and graceful SIGTERM handling."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from etlrouter.core.config import TracingConfig, TransportConfig
from etlrouter.core.grpc import GrpcServer
from etlrouter.core.lifecycle import run_loop, serve
from etlrouter.core.logging import setup_logging
from etlrouter.sdk.adapters import CallGate, grpc_handlers
from etlrouter.sdk.services import Service

log = logging.getLogger(__name__)


class ServiceHost:
    """Runs user services on one gRPC server; a `core.lifecycle.Component` (start/wait/drain/stop).

    Start opens the services, then listens. Drain turns health NOT_SERVING, answers new data calls with
    UNAVAILABLE and waits for the running ones to finish (the caller bounds it with a deadline). Stop closes
    the server (cancelling calls still running), then the services (a sink's close should flush).
    """

    def __init__(
        self,
        *services: Service,
        host: str = "127.0.0.1",
        port: int = 0,
        transport_config: TransportConfig | None = None,
    ) -> None:
        if not services:
            raise ValueError("ServiceHost needs at least one service")
        self.services = services
        self.gate = CallGate()
        handlers: list[Any] = [
            handler for service in services for handler in grpc_handlers(service, self.gate)
        ]
        self.server = GrpcServer(handlers, host=host, port=port, transport_config=transport_config)
        self._stopped = asyncio.Event()
        self._opened: list[Service] = []
        self._server_stopped = False
        self._listening = False

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        for service in self.services:
            await service.open()
            self._opened.append(service)
        await self.server.start()
        self._listening = True

    async def wait(self) -> None:
        await self._stopped.wait()

    async def drain(self) -> None:
        self.server.set_serving(False)
        await self.gate.close()
        await self._stop_server()

    async def stop(self) -> None:
        await self._stop_server()
        while self._opened:
            service = self._opened.pop()
            try:
                await service.close()
            except Exception:
                log.exception("closing %s failed", type(service).__name__)
        self._stopped.set()

    async def _stop_server(self) -> None:
        if self._listening and not self._server_stopped:
            self._server_stopped = True
            await self.server.stop()


@contextlib.asynccontextmanager
async def serving(
    *services: Service,
    host: str = "127.0.0.1",
    port: int = 0,
    transport_config: TransportConfig | None = None,
) -> AsyncIterator[ServiceHost]:
    """Serve in the current event loop for the duration of the block (port 0 picks a free port)."""
    host_ = ServiceHost(*services, host=host, port=port, transport_config=transport_config)
    try:
        await host_.start()
        yield host_
    finally:
        await host_.stop()


async def serve_async(
    *services: Service,
    host: str = "127.0.0.1",
    port: int = 50051,
    drain_deadline_s: float = 10.0,
    transport_config: TransportConfig | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain within the deadline and stop."""
    host_ = ServiceHost(*services, host=host, port=port, transport_config=transport_config)
    await serve(host_, drain_deadline_s=drain_deadline_s)


def run(
    *services: Service,
    host: str = "127.0.0.1",
    port: int = 50051,
    drain_deadline_s: float = 10.0,
    log_level: str = "info",
    log_format: str = "auto",
    transport_config: TransportConfig | None = None,
) -> None:
    """Blocking entry point for a `main`: set up logging, serve until SIGTERM/SIGINT, drain, stop."""
    name = services[0].capabilities.name if services else ""
    setup_logging(name or "service", log_level, log_format)
    from etlrouter.core import tracing

    # The standard OTEL_* variables (OTEL_EXPORTER_OTLP_ENDPOINT, ...); the service's name by default.
    tracing.setup_tracing(tracing.resolve(TracingConfig(), os.environ, "service", name))
    try:
        run_loop(
            lambda: serve_async(
                *services,
                host=host,
                port=port,
                drain_deadline_s=drain_deadline_s,
                transport_config=transport_config,
            )
        )
    finally:
        tracing.shutdown_tracing()
