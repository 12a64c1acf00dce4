"""gRPC server and channel helpers: every server gets grpc.health.v1 Health and server reflection."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.client import Channel
from grpclib.const import Handler, Status
from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec, _googleapis_available
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.protocol import H2Protocol
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

from etlrouter.core import transport
from etlrouter.core.config import TransportConfig, split_address
from etlrouter.core.lifecycle import listen_error
from etlrouter.core.metrics import MALFORMED_REQUESTS

log = logging.getLogger(__name__)

MALFORMED_LOG_INTERVAL_S = 60.0  # per method: one warning, then at most one a minute with a count


class MalformedMessageError(GRPCError):
    """A request message that does not parse: the caller's fault, answered INVALID_ARGUMENT."""


class ValidatingProtoCodec(ProtoCodec):
    """grpclib's protobuf codec, but a message that does not decode is the caller's error, not ours.

    grpclib turns any exception of a handler into `UNKNOWN: Internal Server Error` and logs a traceback;
    a GRPCError instead goes back to the caller with its status and is not logged by grpclib.
    """

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            name = message_type.DESCRIPTOR.full_name
            raise MalformedMessageError(Status.INVALID_ARGUMENT, f"malformed {name}: {error}") from None


class _MalformedLog:
    """Rate-limited warnings for malformed requests, per method: a peer sending garbage in a loop must
    not flood the log."""

    def __init__(self, interval_s: float = MALFORMED_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def report(self, method: str, error: GRPCError) -> None:
        MALFORMED_REQUESTS.labels(method=method).inc()
        now = time.monotonic()
        last = self._last.get(method)
        if last is not None and now - last < self.interval_s:
            self._suppressed[method] = self._suppressed.get(method, 0) + 1
            return
        self._last[method] = now
        suppressed = self._suppressed.pop(method, 0)
        log.warning(
            "malformed request refused",
            extra={"fields": {"method": method, "error": error.message, "suppressed_since_last": suppressed}},
        )


_malformed_log = _MalformedLog()


def _guarded(method: str, func: Callable[[Any], Coroutine[Any, Any, None]]) -> Callable[[Any], Any]:
    async def handle(stream: Any) -> None:
        try:
            await func(stream)
        except MalformedMessageError as error:
            _malformed_log.report(method, error)
            raise

    return handle


class _GuardedMapping:
    """The handlers of all services, each wrapped to report malformed requests once per method."""

    def __init__(self, services: Sequence[Any]) -> None:
        self._mapping: dict[str, Handler] = {}
        for svc in services:
            for path, handler in svc.__mapping__().items():
                self._mapping[path] = handler._replace(func=_guarded(path, handler.func))

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


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
        setting: str = "the gRPC listen address",
    ) -> None:
        self.setting = setting  # what to name when the port cannot be bound, e.g. "router.grpc.port"
        self.transport_config = transport_config or TransportConfig()
        transport.install(self.transport_config)
        self.status = ServiceStatus()
        self.status.set(True)
        checks: dict[Any, list[ServiceStatus]] = {svc: [self.status] for svc in services}
        health = Health({**checks, OVERALL: [self.status]})
        self._all = ServerReflection.extend([*services, health])
        self._server = Server(
            [_GuardedMapping(self._all)],
            codec=ValidatingProtoCodec(),
            # What grpclib picks itself when it chooses the codec (rich error details, when installed).
            status_details_codec=ProtoStatusDetailsCodec() if _googleapis_available() else None,
            config=transport.grpc_configuration(self.transport_config),
        )
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
        try:
            await self._server.start(self._host, self._requested_port, reuse_address=True)
        except OSError as error:
            raise listen_error(self.address, self.setting, error) from None
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
