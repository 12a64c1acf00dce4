"""The contract services of `contract` served by grpclib in the test's own event loop, broken as asked.

`serve(kind, broken, tmp_path)` yields the address. Besides the rules of `contract`, these are broken here:
"health" (no grpc.health.v1), "reflection" (no server reflection) and "cancellation" (a source whose long
poll, once cancelled by the caller, keeps holding the source for its whole wait_ms).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server, Stream

from etlrouter._proto.v1 import records_pb2, services_grpc
from etlrouter.core.grpc import GrpcServer
from tests.conformance import contract


@contextlib.contextmanager
def _aborts() -> Any:
    try:
        yield
    except contract.Abort as e:
        raise GRPCError(Status[e.code], e.message) from None


class _Capabilities:
    kind = ""
    broken: frozenset[str] = frozenset()

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        with _aborts():
            caps = contract.capabilities(self.kind, self.broken)
        await stream.send_message(records_pb2.GetCapabilitiesResponse(capabilities=caps))


class Source(_Capabilities, services_grpc.SourceServiceBase):
    kind = "source"

    def __init__(self, broken: Iterable[str]) -> None:
        self.broken = frozenset(broken)
        self.logic = contract.SourceLogic(self.broken)
        self.lock = asyncio.Lock()  # one pull at a time, long polls included (as the generator does)

    async def PullRecords(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        async with self.lock:
            with _aborts():
                reply, wait = self.logic.pull(request)
            if wait:
                try:
                    await asyncio.sleep(wait)
                except asyncio.CancelledError:
                    if "cancellation" in self.broken:
                        await asyncio.sleep(wait)  # swallows the cancellation, keeps the lock
                    raise
        await stream.send_message(reply)

    async def Acknowledge(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        with _aborts():
            reply = self.logic.acknowledge(request)
        await stream.send_message(reply)


class Transform(_Capabilities, services_grpc.TransformServiceBase):
    kind = "transform"

    def __init__(self, broken: Iterable[str]) -> None:
        self.broken = frozenset(broken)
        self.logic = contract.TransformLogic(self.broken)

    async def ProcessBatch(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        with _aborts():
            reply = self.logic.process(request)
        await stream.send_message(reply)


class Sink(_Capabilities, services_grpc.SinkServiceBase):
    kind = "sink"

    def __init__(self, broken: Iterable[str], path: Path) -> None:
        self.broken = frozenset(broken)
        self.logic = contract.SinkLogic(path, self.broken)
        self.later: set[asyncio.Task[None]] = set()

    async def WriteBatch(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        with _aborts():
            reply, lazy = self.logic.write(request)
        if lazy:
            task = asyncio.create_task(self._commit_later(request))
            self.later.add(task)
            task.add_done_callback(self.later.discard)
        await stream.send_message(reply)

    async def _commit_later(self, request: Any) -> None:
        await asyncio.sleep(contract.LAZY_WRITE_S)
        self.logic.commit(request)

    async def Flush(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        with _aborts():
            reply = self.logic.flush(request)
        await stream.send_message(reply)


class Lookup(_Capabilities, services_grpc.LookupServiceBase):
    kind = "lookup"

    def __init__(self, broken: Iterable[str]) -> None:
        self.broken = frozenset(broken)
        self.logic = contract.LookupLogic(self.broken)

    async def Lookup(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        with _aborts():
            reply = self.logic.lookup(request)
        await stream.send_message(reply)

    async def BatchLookup(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        with _aborts():
            reply, delay = self.logic.batch_lookup(request)
        await asyncio.sleep(delay)
        await stream.send_message(reply)


def make(kind: str, broken: Iterable[str], tmp_path: Path) -> Any:
    if kind == "source":
        return Source(broken)
    if kind == "transform":
        return Transform(broken)
    if kind == "sink":
        return Sink(broken, tmp_path / "sink.jsonl")
    return Lookup(broken)


@contextlib.asynccontextmanager
async def serve(kind: str, broken: Iterable[str], tmp_path: Path) -> AsyncIterator[tuple[str, Any]]:
    """Serve one service on a free loopback port; yields (address, service)."""
    broken = frozenset(broken)
    service = make(kind, broken, tmp_path)
    if broken & {"health", "reflection"}:
        handlers: list[Any] = [service]
        if "health" not in broken:
            handlers.append(Health())
        if "reflection" not in broken:
            handlers = ServerReflection.extend(handlers)
        server = Server(handlers)
        await server.start("127.0.0.1", 0)
        port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield f"127.0.0.1:{port}", service
        finally:
            server.close()
            await server.wait_closed()
        return
    grpc_server = GrpcServer([service], host="127.0.0.1", port=0)
    await grpc_server.start()
    try:
        yield grpc_server.address, service
    finally:
        await grpc_server.stop()
