"""gRPC server and channel helpers: every server gets grpc.health.v1 Health and server reflection."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import weakref
from collections.abc import Callable, Collection, Coroutine, Sequence
from typing import Any, NoReturn

from google.protobuf.message import DecodeError
from grpclib.client import Channel
from grpclib.const import Handler, Status
from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec, _googleapis_available
from grpclib.events import SendRequest, listen
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
from etlrouter.security import authz
from etlrouter.security.connections import PeerLimit
from etlrouter.security.context import CALLER, Security, Unauthenticated
from etlrouter.security.identity import ANONYMOUS, Identity, Kind

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


# A check of a call's first request message, after the caller passed the method's rule: for
# sidecars="upstream", whether the calling sidecar runs a stage that feeds the one it sends to (None:
# cannot tell yet, the caller acts on a newer assignment; answered UNAVAILABLE, which it retries).
FeedsCheck = Callable[[str, Any], bool | None]


def _field(message: Any, path: str) -> Any:
    for part in path.split("."):
        message = getattr(message, part)
    return message


def _checked_first_message(
    stream: Any,
    method: str,
    identity: Identity,
    then: str,
    rule: authz.Rule,
    security: Security,
    feeds: FeedsCheck | None,
) -> None:
    """Check the first request message against the parts of the rule that depend on it."""
    receive = stream.recv_message

    async def recv_message() -> Any:
        stream.recv_message = receive  # only the first message
        message = await receive()
        if message is None:
            return message
        if rule.self_field:
            claimed = _field(message, rule.self_field)
            if claimed != identity.name:
                _deny(identity, method, f"the caller's own sidecar id (the request names {claimed!r})")
        elif then == "self" and identity.name != security.name:
            _deny(identity, method, f"the identity of sidecar {security.name!r} (this pod's)")
        if then == "upstream":
            verdict = feeds(identity.name, message) if feeds is not None else False
            if verdict is None:  # this side's view of the DAG is older than the caller's: it retries
                raise GRPCError(
                    Status.UNAVAILABLE, f"{method}: this sidecar does not know that assignment yet"
                )
            if not verdict:
                _deny(identity, method, "an upstream sidecar: the caller runs no stage that feeds this one")
        return message

    stream.recv_message = recv_message


def _deny(identity: Identity, method: str, missing: str) -> NoReturn:
    authz.DENIALS.report(identity, method, missing, api="grpc")
    raise GRPCError(
        Status.PERMISSION_DENIED, f"{method}: permission denied for {identity}: requires {missing}"
    )


def _guarded(
    method: str,
    func: Callable[[Any], Coroutine[Any, Any, None]],
    security: Security,
    feeds: FeedsCheck | None,
) -> Callable[[Any], Any]:
    rule = authz.rule_for(method)

    async def handle(stream: Any) -> None:
        token = None
        if security.enabled:
            try:
                identity = security.authenticate(stream.peer.cert(), stream.metadata.get("authorization"))
            except Unauthenticated as e:
                authz.DENIALS.report(ANONYMOUS, method, str(e), api="grpc", reason="unauthenticated")
                raise GRPCError(Status.UNAUTHENTICATED, f"{method}: {e}") from None
            decision = authz.decide(rule, identity)
            if not decision.allowed:
                _deny(identity, method, decision.missing)
            if decision.then:
                assert rule is not None
                _checked_first_message(stream, method, identity, decision.then, rule, security, feeds)
            token = CALLER.set(identity)
        try:
            await func(stream)
        except MalformedMessageError as error:
            _malformed_log.report(method, error)
            raise
        finally:
            if token is not None:
                CALLER.reset(token)

    return handle


class _GuardedMapping:
    """The handlers of all services, each wrapped to authenticate and authorize the caller (when TLS is
    on) and to report malformed requests once per method."""

    def __init__(self, services: Sequence[Any], security: Security, feeds: FeedsCheck | None) -> None:
        self._mapping: dict[str, Handler] = {}
        for svc in services:
            for path, handler in svc.__mapping__().items():
                self._mapping[path] = handler._replace(func=_guarded(path, handler.func, security, feeds))

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
        security: Security | None = None,
        feeds: FeedsCheck | None = None,
    ) -> None:
        self.setting = setting  # what to name when the port cannot be bound, e.g. "router.grpc.port"
        self.security = security or Security.insecure()
        self.transport_config = transport_config or TransportConfig()
        transport.install(self.transport_config)
        self.status = ServiceStatus()
        self.status.set(True)
        checks: dict[Any, list[ServiceStatus]] = {svc: [self.status] for svc in services}
        health = Health({**checks, OVERALL: [self.status]})
        self._all = ServerReflection.extend([*services, health])
        self._server = Server(
            [_GuardedMapping(self._all, self.security, feeds)],
            codec=ValidatingProtoCodec(),
            # What grpclib picks itself when it chooses the codec (rich error details, when installed).
            status_details_codec=ProtoStatusDetailsCodec() if _googleapis_available() else None,
            config=transport.grpc_configuration(self.transport_config),
        )
        # grpclib's Server.close() cancels running calls but leaves client connections open, so a stopped
        # server would keep half-dead connections that clients never notice. Track them to close them.
        self._protocols: weakref.WeakSet[H2Protocol] = weakref.WeakSet()
        make_protocol = self._server._protocol_factory

        self._per_peer = PeerLimit(self.security.tls_config.max_connections_per_peer)

        def tracked_protocol() -> H2Protocol:
            protocol = make_protocol()
            self._protocols.add(protocol)
            if self.security.enabled:
                self._per_peer.watch(protocol)
            return protocol

        self._server._protocol_factory = tracked_protocol  # type: ignore[method-assign]
        self._host, self._requested_port = host, port
        self.port = port

    @property
    def address(self) -> str:
        return f"{self._host}:{self.port}"

    async def start(self) -> None:
        ssl_context = self.security.grpc_server_context()
        try:
            if ssl_context is None:
                await self._server.start(self._host, self._requested_port, reuse_address=True)
            else:
                # grpclib's start() cannot bound the handshake: open the listener as it does, with a timeout.
                loop = asyncio.get_running_loop()
                self._server._server = await loop.create_server(
                    self._server._protocol_factory,
                    self._host,
                    self._requested_port,
                    ssl=ssl_context,
                    ssl_handshake_timeout=self.security.tls_config.handshake_timeout_ms / 1000,
                    reuse_address=True,
                )
                self._server._server_closed_fut = loop.create_future()
        except OSError as error:
            raise listen_error(self.address, self.setting, error) from None
        sockets = getattr(self._server._server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info(
            "gRPC server listening",
            extra={"fields": {"address": self.address, "tls": "mutual" if ssl_context else "off"}},
        )

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


class _VerifyingChannel(Channel):
    """A TLS channel that checks who answered: a party of our trust domain, of the expected kind."""

    def __init__(self, *args: Any, security: Security, expect: Collection[Kind], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._security, self._expect = security, expect

    async def _create_connection(self) -> H2Protocol:
        protocol = await super()._create_connection()
        try:
            self._security.verify_server(protocol.connection.get_peer().cert(), self._expect)
        except ssl.SSLError:
            protocol.connection.close()
            raise
        return protocol


def open_channel(
    address: str,
    transport_config: TransportConfig | None = None,
    security: Security | None = None,
    expect: Collection[Kind] = (),
) -> Channel:
    """A grpclib channel to HOST:PORT with the process's transport settings; with TLS on, mutual TLS to a
    server whose certificate names one of the `expect`ed kinds (any party of the trust domain if empty)."""
    cfg = transport_config or TransportConfig()
    transport.install(cfg)
    host, port = split_address(address)
    config = transport.grpc_configuration(cfg)
    ssl_context = security.client_context() if security is not None else None
    if ssl_context is None or security is None:
        return Channel(host, port, config=config)
    channel = _VerifyingChannel(host, port, ssl=ssl_context, config=config, security=security, expect=expect)
    if security.client_token:
        authorization = f"Bearer {security.client_token}"

        async def add_token(event: SendRequest) -> None:
            event.metadata["authorization"] = authorization

        listen(channel, SendRequest, add_token)
    return channel
