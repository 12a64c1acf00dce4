"""`Pusher`: how a push source hands records to its sidecar (SidecarDataPlane.PushRecords).

    async with Pusher("127.0.0.1:7600", "clicks") as pusher:
        ticket = await pusher.push([Record(b"k", b"v")])   # waits for credits, then sends
        await ticket.accepted                               # in the source's ack ledger
        await ticket.delivered                              # written by every branch (or dead-lettered)

The pusher gives every record an offset (strictly increasing within its partition), keeps each batch until
the sidecar acknowledges it (cumulative acks per partition), never sends beyond the credits the sidecar
granted, and after a broken stream reconnects and resends, in order, every batch not acknowledged yet (the
sidecar skips what it already has). Offsets start at the wall clock in microseconds unless `first_offset`
is given, so a restarted pusher does not reuse the offsets (and batch ids) of its previous run.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec
from grpclib.exceptions import GRPCError, StreamTerminatedError

from etlrouter._proto.v1 import dataplane_grpc, dataplane_pb2, records_pb2
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.flow.credits import Credits, CreditSender
from etlrouter.flow.gate import AsyncCreditGate
from etlrouter.flow.retry import Backoff
from etlrouter.sdk.records import Record, source_batch
from etlrouter.security.context import Security, security_from_environment
from etlrouter.security.identity import SIDECAR

log = logging.getLogger(__name__)


class PushRefusedError(Exception):
    """The sidecar refused a batch (the message says why); it will not be resent."""


class PusherClosedError(Exception):
    """The pusher was closed before the batch was acknowledged."""


def _quiet_future() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # A ticket nobody awaits must not log "exception was never retrieved".
    future.add_done_callback(lambda f: f.cancelled() or f.exception())
    return future


@dataclass(eq=False)
class PushTicket:
    """One pushed batch: `sent` (on the wire), `accepted` (in the ledger), `delivered` (acknowledged)."""

    batch_id: str
    partition: int
    first_offset: int
    last_offset: int
    records: int
    sent: asyncio.Future[None] = field(default_factory=_quiet_future)
    accepted: asyncio.Future[None] = field(default_factory=_quiet_future)
    delivered: asyncio.Future[None] = field(default_factory=_quiet_future)


@dataclass(eq=False)
class _Pending:
    batch: records_pb2.RecordBatch
    ticket: PushTicket
    nbytes: int


class Pusher:
    """An async client of `PushRecords` for one source and partition (see the module docstring)."""

    def __init__(
        self,
        sidecar: str,
        source: str,
        *,
        partition: int = 0,
        first_offset: int | None = None,
        max_unacked_records: int = 100_000,
        reconnect_max_s: float = 2.0,
        transport_config: TransportConfig | None = None,
        security: Security | None = None,
    ) -> None:
        if not source:
            raise ValueError("Pusher needs the source service name")
        if max_unacked_records < 1:
            raise ValueError(f"max_unacked_records must be at least 1, got {max_unacked_records}")
        if reconnect_max_s <= 0:
            raise ValueError(f"reconnect_max_s must be positive, got {reconnect_max_s}")
        self.sidecar = sidecar
        self.source = source
        self.partition = partition
        self.max_unacked_records = max_unacked_records
        self.reconnect_max_s = reconnect_max_s
        # 0.1 s doubling up to reconnect_max_s; no jitter: each pusher has its own sidecar, there is no herd.
        self._reconnect = Backoff(base=min(0.1, reconnect_max_s), cap=reconnect_max_s, jitter=0.0)
        self.transport_config = transport_config
        # Pushing needs the pod's identity when the sidecar runs TLS: by default the ETLROUTER_TLS__*
        # settings of the environment (the sidecar's certificate, shared by its pod).
        self.security = security if security is not None else security_from_environment()
        self.next_offset = time.time_ns() // 1000 if first_offset is None else first_offset
        self.acked = -1  # highest offset acknowledged
        self.last_error = ""  # why the pusher cannot send now (no sidecar, no pipeline), "" when it can
        self.connected = False
        self.reconnects = 0
        self._unacked: collections.OrderedDict[str, _Pending] = collections.OrderedDict()
        self._unacked_records = 0
        self._queue: collections.deque[tuple[str, bool]] = collections.deque()  # (batch id, credits taken)
        self._queued = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._gate: AsyncCreditGate | None = None
        self._task: asyncio.Task[None] | None = None
        self._channel: Any = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self._channel = open_channel(self.sidecar, self.transport_config, self.security, SIDECAR)
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop; batches not acknowledged yet fail with PusherClosedError (they are not resent)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pending in self._unacked.values():
            for future in (pending.ticket.sent, pending.ticket.accepted, pending.ticket.delivered):
                if not future.done():
                    future.set_exception(PusherClosedError(f"pusher closed before {pending.ticket.batch_id}"))
        self._unacked.clear()
        if self._channel is not None:
            self._channel.close()

    async def __aenter__(self) -> Pusher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- state ----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Connected and granted a window: a pipeline reads the source."""
        return self.connected and self._gate is not None

    @property
    def credits(self) -> Credits:
        """Credits available right now (zero when not ready)."""
        return self._gate.sender.available if self._gate is not None else Credits(0, 0)

    @property
    def unacked_records(self) -> int:
        return self._unacked_records

    async def wait_ready(self, timeout: float) -> None:
        """Wait until a pipeline reads the source (raises TimeoutError with the last error)."""
        deadline = time.monotonic() + timeout
        while not self.ready:
            if time.monotonic() > deadline:
                why = self.last_error or "connecting"
                raise TimeoutError(f"push source {self.source!r} not ready: {why}")
            await asyncio.sleep(0.05)

    async def wait_acked(self, timeout: float) -> None:
        """Wait until everything pushed so far is acknowledged."""
        async with asyncio.timeout(timeout):
            while self._unacked:
                await next(reversed(self._unacked.values())).ticket.delivered

    # -- pushing --------------------------------------------------------------------------------------

    def _prepare(self, records: Sequence[Record]) -> _Pending:
        if not records:
            raise ValueError("push needs at least one record")
        first = self.next_offset
        numbered = [msgspec.structs.replace(r, offset=first + i) for i, r in enumerate(records)]
        self.next_offset = first + len(records)
        batch = source_batch(numbered, self.partition)
        batch.header.source_id = self.source
        batch.header.batch_id = f"{self.source}/{self.partition}/{first}-{self.next_offset - 1}"
        ticket = PushTicket(batch.header.batch_id, self.partition, first, self.next_offset - 1, len(records))
        return _Pending(batch, ticket, batch.header.byte_size)

    def _enqueue(self, pending: _Pending, credits_taken: bool) -> PushTicket:
        self._unacked[pending.ticket.batch_id] = pending
        self._unacked_records += pending.ticket.records
        if self._unacked_records >= self.max_unacked_records:
            self._room.clear()
        self._queue.append((pending.ticket.batch_id, credits_taken))
        self._queued.set()
        return pending.ticket

    async def push(self, records: Sequence[Record]) -> PushTicket:
        """Send a batch, waiting for room (max_unacked_records) and credits; returns once it is sent."""
        if self._closed:
            raise PusherClosedError("the pusher is closed")
        while self._unacked_records and self._unacked_records + len(records) > self.max_unacked_records:
            await self._room.wait()
        ticket = self._enqueue(self._prepare(records), credits_taken=False)
        await asyncio.shield(ticket.sent)
        return ticket

    def offer(self, records: Sequence[Record]) -> PushTicket | None:
        """Send a batch only if it can go at once: ready, nothing queued, room and credits for it now;
        None otherwise (the caller answers "busy", e.g. HTTP 429). The credits are taken here."""
        gate = self._gate
        if self._closed or not self.ready or gate is None or self._queue:
            return None
        if self._unacked_records and self._unacked_records + len(records) > self.max_unacked_records:
            return None
        pending = self._prepare(records)
        if not gate.sender.try_acquire(pending.ticket.records, pending.nbytes, time.monotonic()):
            self.next_offset = pending.ticket.first_offset  # never used: give the offsets back
            return None
        return self._enqueue(pending, credits_taken=True)

    # -- the stream -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._closed:
            sender: asyncio.Task[None] | None = None
            try:
                method = dataplane_grpc.SidecarDataPlaneStub(self._channel).PushRecords
                async with method.open() as stream:
                    await stream.send_message(
                        dataplane_pb2.PushFrame(open=dataplane_pb2.PushOpen(source=self.source))
                    )
                    self.connected = True
                    # Everything not acknowledged goes again, in order, within the new window.
                    self._queue = collections.deque((batch_id, False) for batch_id in self._unacked)
                    while (reply := await stream.recv_message()) is not None:
                        attempt = 0
                        if self._handle(reply) and sender is None:
                            sender = asyncio.ensure_future(self._send_loop(stream))
                    self.last_error = f"sidecar {self.sidecar} ended the push stream"
            except (GRPCError, StreamTerminatedError, OSError, ConnectionError) as e:
                message = e.message if isinstance(e, GRPCError) and e.message else repr(e)
                self.last_error = f"push stream to sidecar {self.sidecar}: {message}"
            finally:
                self.connected = False
                self._gate = None
                if sender is not None:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await sender
            if self._closed:
                break
            attempt += 1
            self.reconnects += 1
            if attempt == 1 or attempt % 50 == 0:
                log.warning("%s; reconnecting", self.last_error)
            await asyncio.sleep(self._reconnect.delay(attempt))

    def _handle(self, reply: dataplane_pb2.PushReply) -> bool:
        """Apply one reply; True when it opened the window (the first grant of this stream)."""
        opened = False
        if reply.grant.records or reply.grant.bytes:
            if self._gate is None:  # the first grant says how large the window is
                window = Credits(reply.grant.records, reply.grant.bytes)
                self._gate = AsyncCreditGate(CreditSender(window))
                opened = True
                self.last_error = ""
            self._gate.grant(reply.grant.records, reply.grant.bytes)
        for batch_id in reply.accepted_batch_ids:
            pending = self._unacked.get(batch_id)
            if pending is not None and not pending.ticket.accepted.done():
                pending.ticket.accepted.set_result(None)
        if reply.error:
            if reply.refused_batch_id:
                self._refuse(reply.refused_batch_id, reply.error)
            else:
                self.last_error = reply.error
        for ack in reply.acks:
            if ack.partition == self.partition:
                self._acknowledge(ack.up_to_offset)
        return opened

    def _refuse(self, batch_id: str, error: str) -> None:
        pending = self._unacked.pop(batch_id, None)
        if pending is None:
            return
        log.warning("the sidecar refused batch %s: %s", batch_id, error)
        self._forget(pending)
        for future in (pending.ticket.accepted, pending.ticket.delivered):
            if not future.done():
                future.set_exception(PushRefusedError(error))

    def _acknowledge(self, offset: int) -> None:
        self.acked = max(self.acked, offset)
        while self._unacked:
            pending = next(iter(self._unacked.values()))
            if pending.ticket.last_offset > offset:
                break
            del self._unacked[pending.ticket.batch_id]
            self._forget(pending)
            for future in (pending.ticket.sent, pending.ticket.accepted, pending.ticket.delivered):
                if not future.done():
                    future.set_result(None)

    def _forget(self, pending: _Pending) -> None:
        self._unacked_records -= pending.ticket.records
        if self._unacked_records < self.max_unacked_records:
            self._room.set()

    async def _send_loop(self, stream: Any) -> None:
        gate = self._gate
        assert gate is not None
        while True:
            while not self._queue:
                self._queued.clear()
                await self._queued.wait()
            batch_id, credits_taken = self._queue[0]
            pending = self._unacked.get(batch_id)
            if pending is None:  # acknowledged or refused meanwhile
                self._queue.popleft()
                continue
            if not credits_taken:
                await gate.acquire(pending.ticket.records, pending.nbytes)
            await stream.send_message(dataplane_pb2.PushFrame(batch=pending.batch))
            self._queue.popleft()
            if not pending.ticket.sent.done():
                pending.ticket.sent.set_result(None)
