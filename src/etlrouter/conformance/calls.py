"""The I/O edge of the kit: one grpclib channel to the service under test, every call timed.

Every call gets the safety deadline (the pipeline's timeout plus a margin) so a slow service still answers
the checks that are not about time; how long each call took is kept, and the `deadlines` check compares
it with the timeout a pipeline stage would give the service (30 s by default, the sidecar's).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.const import Status as GrpcStatus
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1 import health_grpc, health_pb2

from etlrouter._proto.v1 import records_pb2, services_grpc
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.sidecar import discovery

T = TypeVar("T")

STUBS: dict[str, Any] = {
    "source": services_grpc.SourceServiceStub,
    "transform": services_grpc.TransformServiceStub,
    "sink": services_grpc.SinkServiceStub,
    "lookup": services_grpc.LookupServiceStub,
}


class CallFailed(Exception):
    """A call ended without an answer: a gRPC status, a broken stream or no answer in time."""

    def __init__(self, method: str, status: str, message: str) -> None:
        super().__init__(f"{method}: {status}" + (f" ({message})" if message else ""))
        self.method = method
        self.status = status
        self.message = message


@dataclass
class Timing:
    method: str
    seconds: float


@dataclass
class Session:
    address: str
    timeout_s: float  # what a pipeline stage gives the service per call
    transport_config: TransportConfig | None = None
    margin_s: float = 10.0  # beyond the timeout, so that "slow" is told apart from "no answer"
    channel: Channel = field(init=False)
    timings: list[Timing] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channel = open_channel(self.address, self.transport_config)

    def close(self) -> None:
        self.channel.close()

    def stub(self, kind: str) -> Any:
        return STUBS[kind](self.channel)

    async def call(
        self, kind: str, method: str, request: Any, *, timeout: float | None = None, timed: bool = True
    ) -> Any:
        """Call `method` of the `kind` service; raises CallFailed. `timed` calls count for `deadlines`."""
        name = f"{kind}.{method}"
        started = time.monotonic()
        limit = self.timeout_s + self.margin_s if timeout is None else timeout
        try:
            return await getattr(self.stub(kind), method)(request, timeout=limit)
        except GRPCError as e:
            raise CallFailed(name, e.status.name, e.message or "") from None
        except TimeoutError:
            raise CallFailed(
                name, GrpcStatus.DEADLINE_EXCEEDED.name, f"no answer within {limit:g} s"
            ) from None
        except (StreamTerminatedError, OSError) as e:
            raise CallFailed(name, type(e).__name__, str(e)) from None
        finally:
            if timed:
                self.timings.append(Timing(name, time.monotonic() - started))

    async def capabilities(self, kind: str) -> records_pb2.Capabilities | None:
        """The declared capabilities; None when GetCapabilities is UNIMPLEMENTED (the defaults apply)."""
        try:
            reply = await self.call(kind, "GetCapabilities", records_pb2.GetCapabilitiesRequest())
        except CallFailed as e:
            if e.status == GrpcStatus.UNIMPLEMENTED.name:
                return None
            raise
        return reply.capabilities if reply.HasField("capabilities") else records_pb2.Capabilities()

    async def health(self) -> str:
        """The overall status of grpc.health.v1 Health/Check (the empty service name)."""
        stub = health_grpc.HealthStub(self.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.timeout_s)
        except GRPCError as e:
            raise CallFailed("grpc.health.v1.Health.Check", e.status.name, e.message or "") from None
        except (TimeoutError, StreamTerminatedError, OSError) as e:
            raise CallFailed("grpc.health.v1.Health.Check", type(e).__name__, str(e)) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    async def reflected_services(self) -> list[str] | None:
        """The gRPC service names server reflection lists (the sidecar's discovery code asks the same way);
        None when the server has no reflection. Raises CallFailed when it cannot be asked."""
        host, _, port = self.address.rpartition(":")
        try:
            # The sidecar's discovery: the HTTP/2 handshake first, then reflection v1, else v1alpha.
            await discovery.http2_handshake(host.strip("[]"), int(port), self.timeout_s)
            return await discovery.list_services(self.channel, self.timeout_s)
        except (discovery.Unanswered, discovery.NotHttp2, OSError) as e:
            raise CallFailed("grpc.reflection.ServerReflectionInfo", type(e).__name__, str(e)) from None

    async def cancelled_calls(self, calls: Sequence[Callable[[], Awaitable[Any]]], after_s: float) -> None:
        """Start the calls, give up on them after `after_s` (the client cancels the streams: grpclib sends
        RST_STREAM), and return without their answers."""
        tasks = [asyncio.ensure_future(call()) for call in calls]
        await asyncio.sleep(after_s)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


def classify(names: list[str]) -> list[str]:
    return list(discovery.classify(names))
