"""gRPC server and channel helpers: every server gets grpc.health.v1 Health and server reflection."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Collection, Sequence
from typing import Any

from grpclib.client import Channel
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.protocol import H2Protocol
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

from etlrouter.core import transport
from etlrouter.core.config import TransportConfig, split_address

log = logging.getLogger(__name__)


class GrpcServer:
    """A grpclib server with health and reflection, and an explicit start/drain/stop lifecycle.

    `status` is the overall health (the empty service name in grpc.health.v1); it starts SERVING and a role
    flips it to NOT_SERVING when it drains, so load balancers stop sending new calls first.
    """

    def __init__(
        self,
        services: Sequence[Any],
        *,
        host: str,
        port: int,
        transport_config: TransportConfig | None = None,
    ) -> None:
        self.transport_config = transport_config or TransportConfig()
        transport.install(self.transport_config)
        self.status = ServiceStatus()
        self.status.set(True)
        checks: dict[Any, list[ServiceStatus]] = {svc: [self.status] for svc in services}
        health = Health({**checks, OVERALL: [self.status]})
        self._all = ServerReflection.extend([*services, health])
        self._server = Server(self._all, config=transport.grpc_configuration(self.transport_config))
        # grpclib's Server.close() cancels running calls but leaves client connections open, so a stopped
        # server would keep half-dead connections that clients never notice. Track them to close them.
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        make_protocol = self._server._protocol_factory

        def tracked_protocol() -> H2Protocol:
            protocol = make_protocol()
            self._protocols.add(protocol)
            return protocol

        self._server._protocol_factory = tracked_protocol  # type: ignore[method-assign]
        self._host, self._requested_port = host, port
        self.port = port

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    async def start(self) -> None:
        await self._server.start(self._host, self._requested_port, reuse_address=True)
        sockets = getattr(self._server._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("gRPC server listening", extra={"fields": {"address": self.address}})

    def set_serving(self, serving: bool) -> None:
        self.status.set(serving)

    async def stop(self) -> None:
        """Stop accepting connections; wait for running calls (the caller bounds this with a deadline)."""
        self.set_serving(False)
        self._server.close()
        await self._server.wait_closed()
        for protocol in list(self._protocols):
            connection = getattr(protocol, "connection", None)
            if connection is not None:
                connection.close()


def service_names(services: Collection[Any]) -> list[str]:
    """Fully qualified gRPC service names a set of grpclib handlers exposes."""
    names: set[str] = set()
    for svc in services:
        for path in svc.__mapping__():
            names.add(path.split("/")[1])
    return sorted(names)


def open_channel(address: str, transport_config: TransportConfig | None = None) -> Channel:
    """A grpclib channel to HOST:PORT with the process's transport settings."""
    cfg = transport_config or TransportConfig()
    transport.install(cfg)
    host, port = split_address(address)
    return Channel(host, port, config=transport.grpc_configuration(cfg))
