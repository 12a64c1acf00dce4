"""Edges: how a stage hands a batch to one replica of a child stage, within the credit window the child
grants (flow/credits.py). A `LocalEdge` is an in-process call (both stages on this sidecar), a `RemoteEdge`
a SidecarDataPlane.ReceiveRecords stream to the sidecar running the child; both answer with the child's
BatchResult once its whole subtree has handled the batch."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from grpclib.exceptions import GRPCError, StreamTerminatedError
from prometheus_client import Counter, Gauge

from etlrouter._proto.v1 import dataplane_pb2, records_pb2
from etlrouter.core import tracing
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.core.metrics import REGISTRY
from etlrouter.flow.credits import Credits, CreditSender, ReceiveBuffer
from etlrouter.flow.gate import AsyncCreditGate
from etlrouter.security.context import Security
from etlrouter.security.identity import SIDECAR
from etlrouter.sidecar.model import BatchResult

CREDITS_AVAILABLE = Gauge(
    "etlrouter_edge_credits_available_records",
    "Credits (records) available on an edge.",
    ["dag", "edge"],
    registry=REGISTRY,
)
STARVED = Counter(
    "etlrouter_edge_starved_seconds_total",
    "Time a sender waited for credits on an edge.",
    ["dag", "edge"],
    registry=REGISTRY,
)

STARVED_FOR = Gauge(
    "etlrouter_edge_starved_for_seconds",
    "How long senders on an edge have been waiting for credits without a break (0 = not waiting): a stalled"
    " child shows here at once, while etlrouter_edge_starved_seconds_total grows only as waits end.",
    ["dag", "edge"],
    registry=REGISTRY,
)


class EdgeBrokenError(Exception):
    """The edge cannot deliver right now (stream broke, target gone); the sender retries."""


class Edge:
    """Credit-controlled delivery to one child replica. `deliver` returns the child's BatchResult."""

    def __init__(self, dag_id: str, name: str, sidecar_id: str = "") -> None:
        self.dag_id = dag_id
        self.name = name
        self.sidecar_id = sidecar_id  # where the child replica runs
        # For the stage reports (the dashboard's per-edge view): see EdgeReport in control.proto.
        self.records_sent = 0
        self._starved_s = 0.0  # closed spans during which at least one sender waited for credits
        self._waiters = 0
        self._wait_started = 0.0
        self._sent_at: dict[int, float] = {}  # unanswered batches: token -> when sent (monotonic)
        self._tokens = itertools.count()
        # Computed at scrape time: nothing on the hot path.
        STARVED_FOR.labels(dag_id, name).set_function(lambda: self.starved_for(time.monotonic()))

    async def deliver(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        raise NotImplementedError

    def credits_available(self) -> int:
        return 0

    def in_flight(self) -> int:
        return 0

    def oldest_in_flight(self, now: float) -> float:
        return now - min(self._sent_at.values()) if self._sent_at else 0.0

    def _sending(self) -> int:
        token = next(self._tokens)
        self._sent_at[token] = time.monotonic()
        return token

    async def acquire(self, gate: AsyncCreditGate, records: int, nbytes: int) -> None:
        """Wait for credits on `gate`, accounting the wait: starved time is a span during which at least one
        sender waited (concurrent waits overlap, they do not add up), the metric the sum of the waits."""
        started = time.monotonic()
        if self._waiters == 0:
            self._wait_started = started
        self._waiters += 1
        try:
            await gate.acquire(records, nbytes)
        finally:
            now = time.monotonic()
            self._waiters -= 1
            if self._waiters == 0:
                self._starved_s += now - self._wait_started
            waited = now - started
            if waited > 0.001:
                STARVED.labels(self.dag_id, self.name).inc(waited)
                tracing.add_event(
                    "credits.waited", {"etlrouter.edge": self.name, "etlrouter.waited_s": waited}
                )

    def starved_for(self, now: float) -> float:
        """Seconds the current wait for credits has lasted (0 when no sender waits)."""
        return now - self._wait_started if self._waiters else 0.0

    def starved_seconds(self, now: float) -> float:
        """Starved time so far, the ongoing wait included: a stalled child shows at once, not when it ends."""
        return self._starved_s + (now - self._wait_started if self._waiters else 0.0)

    async def close(self) -> None:
        forget_edge(self)


def forget_edge(edge: Edge) -> None:
    """Drop a closed edge's series (a replica that moved would otherwise keep reporting)."""
    with contextlib.suppress(KeyError):
        STARVED_FOR.remove(edge.dag_id, edge.name)


class LocalEdge(Edge):
    """Both stages on this sidecar: an in-process call, with the same credit window as a remote edge."""

    def __init__(
        self,
        dag_id: str,
        name: str,
        target: Callable[[records_pb2.RawRecordBatch], Awaitable[BatchResult]],
        window: Credits,
    ) -> None:
        super().__init__(dag_id, name)
        self.target = target
        self.buffer = ReceiveBuffer(window)
        self.gate = AsyncCreditGate(CreditSender(window))
        first = self.buffer.open()
        self.gate.grant(first.records, first.nbytes)
        self._in_flight = 0

    def credits_available(self) -> int:
        return self.gate.sender.available.records

    def in_flight(self) -> int:
        return self._in_flight

    async def deliver(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        records, nbytes = batch.header.record_count, len(batch.records)
        await self.acquire(self.gate, records, nbytes)
        self.buffer.on_received(records, nbytes)
        self.records_sent += records
        self._in_flight += 1
        token = self._sending()
        try:
            return await self.target(batch)
        finally:
            self._in_flight -= 1
            del self._sent_at[token]
            grant = self.buffer.on_consumed(records, nbytes)
            if not grant.is_zero:
                self.gate.grant(grant.records, grant.nbytes)
            CREDITS_AVAILABLE.labels(self.dag_id, self.name).set(self.gate.sender.available.records)


class RemoteEdge(Edge):
    """A SidecarDataPlane.ReceiveRecords stream to the sidecar running the child replica."""

    def __init__(
        self,
        dag_id: str,
        name: str,
        address: str,
        open_frame: dataplane_pb2.EdgeOpen,
        transport_config: TransportConfig,
        security: Security | None = None,
    ) -> None:
        super().__init__(dag_id, name)
        self.address = address
        self.open_frame = open_frame
        self.transport_config = transport_config
        # The window is the receiver's: its first grant on every new stream says how large it is.
        self.gate = AsyncCreditGate(CreditSender(Credits(1, 1)))
        self._channel = open_channel(address, transport_config, security, SIDECAR)
        self._stream: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[BatchResult]] = {}
        self._connect_lock = asyncio.Lock()

    def credits_available(self) -> int:
        return self.gate.sender.available.records

    def in_flight(self) -> int:
        return len(self._pending)

    async def _connect(self) -> None:
        async with self._connect_lock:
            if self._stream is not None and self._reader is not None and not self._reader.done():
                return
            from etlrouter._proto.v1 import dataplane_grpc

            stream = dataplane_grpc.SidecarDataPlaneStub(self._channel).ReceiveRecords.open()
            try:
                await stream.__aenter__()
                await stream.send_message(dataplane_pb2.DataFrame(open=self.open_frame))
                first = await stream.recv_message()
                if first is None or not (first.grant.records and first.grant.bytes):
                    raise EdgeBrokenError(f"edge {self.name} to {self.address}: no initial credit grant")
            except (GRPCError, StreamTerminatedError, OSError, EdgeBrokenError) as e:
                with contextlib.suppress(Exception):
                    await stream.__aexit__(None, None, None)
                raise EdgeBrokenError(f"cannot open edge {self.name} to {self.address}: {e!r}") from e
            window = Credits(first.grant.records, first.grant.bytes)
            gate = AsyncCreditGate(CreditSender(window))
            gate.grant(window.records, window.nbytes)
            self.gate = gate
            self._stream = stream
            self._reader = asyncio.ensure_future(self._read(stream))

    async def _read(self, stream: Any) -> None:
        error = "edge stream closed"
        try:
            while (frame := await stream.recv_message()) is not None:
                if frame.grant.records or frame.grant.bytes:
                    self.gate.grant(frame.grant.records, frame.grant.bytes)
                    CREDITS_AVAILABLE.labels(self.dag_id, self.name).set(self.gate.sender.available.records)
                for outcome in frame.outcomes:
                    fut = self._pending.pop(outcome.batch_id, None)
                    if fut is not None and not fut.done():
                        done = outcome.status == dataplane_pb2.BATCH_STATUS_DONE
                        fut.set_result(BatchResult(done, outcome.dead_lettered, outcome.error))
        except (GRPCError, StreamTerminatedError, OSError, ConnectionError) as e:
            error = f"edge stream to {self.address} broke: {e!r}"
        finally:
            self._stream = None
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_result(BatchResult.retry(error))
            self._pending.clear()

    async def deliver(self, batch: records_pb2.RawRecordBatch) -> BatchResult:
        await self._connect()
        records, nbytes = batch.header.record_count, len(batch.records)
        reader = self._reader
        assert reader is not None
        # Wait for credits, unless the stream dies first (the receiver refused the edge, or went away):
        # then the caller retries, reconnecting, instead of waiting for credits that will never come.
        gate = self.gate
        acquire = asyncio.ensure_future(self.acquire(gate, records, nbytes))
        try:
            await asyncio.wait({acquire, reader}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Given up on (a shed deadline): the wait for credits must end too, or it would take credits
            # later for a batch never sent, and the edge would leak them until it had none left.
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
            if not acquire.cancelled() and acquire.exception() is None:
                gate.grant(records, nbytes)  # taken just before the cancellation: give them back
            raise
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await acquire
            raise EdgeBrokenError(f"edge {self.name} to {self.address} closed while waiting for credits")
        acquire.result()
        stream = self._stream
        if stream is None:
            raise EdgeBrokenError(f"edge {self.name} to {self.address} closed while waiting for credits")
        fut: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        self._pending[batch.header.batch_id] = fut
        self.records_sent += records
        token = self._sending()
        try:
            try:
                await stream.send_message(dataplane_pb2.DataFrame(batch=batch))
            except (GRPCError, StreamTerminatedError, OSError) as e:
                raise EdgeBrokenError(f"sending on edge {self.name} failed: {e!r}") from e
            return await fut
        finally:  # answered, failed, or given up on (a shed deadline): no longer pending either way
            del self._sent_at[token]
            if self._pending.get(batch.header.batch_id) is fut:
                del self._pending[batch.header.batch_id]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.cancel()
        self._channel.close()
        forget_edge(self)
