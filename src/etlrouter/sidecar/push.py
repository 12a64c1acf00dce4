"""Push sources: `SidecarDataPlane.PushRecords`, the receiving end of a source that hands batches in.

A push source is a source service that declares `Capabilities.push`; the sidecar discovers and registers it
like any source, but never pulls it. It opens a PushRecords stream to its sidecar (`PushOpen{source}`), and
the sidecar feeds every batch into the source stage(s) of the DAG(s) that read it, through the same path a
pulled batch takes (`SourceRunner.accept_pushed`: the in-flight bound, the ack ledger, the fan-out). The
sidecar answers on the stream with:

- credit grants from a receive window of `edge_buffer_records` / `edge_buffer_bytes`, given back as each
  batch is finished by every branch (so a stalled sink stops the pusher, exactly as it stops pulls);
- `accepted_batch_ids` once a batch is registered in the ledger;
- cumulative acks per partition (`up_to_offset`, inclusive) as the ledger releases them: every branch wrote
  the records or put them durably in a DLQ. The pusher keeps records until then and resends the rest after
  a reconnect; offsets already handed out in this sidecar session are recognised and not sent twice;
- `error` (with `refused_batch_id`) for a batch it refuses, and an error without a grant while no pipeline
  reads the source yet (the grant follows once one is assigned).

When the set of source stages reading the source changes on this sidecar (a pipeline applied or deleted, a
stage moved), the stream ends with UNAVAILABLE after the last acks: the pusher reconnects and resends what
is not acknowledged, so no batch is left waiting for an ack that would never come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import dataplane_pb2, records_pb2
from etlrouter.flow.credits import Credits, CreditViolation, ReceiveBuffer
from etlrouter.sidecar.engine import Engine
from etlrouter.sidecar.source import SourceRunner, is_push_source
from etlrouter.sidecar.wire import count_records

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a session looks for a changed assignment (and, at the latest, for new acks)


def push_runners(engine: Engine, source: str) -> list[SourceRunner]:
    """The local source stages that read `source` (one per DAG reading it), running and push-mode."""
    return [
        runner
        for dag in engine.dags.values()
        for runner in dag.runners.values()
        if isinstance(runner, SourceRunner)
        and runner.stage.service == source
        and runner.push_mode
        and not runner.stopping
    ]


def batch_problem(batch: records_pb2.RawRecordBatch, count: int) -> str:
    """Why a pushed batch cannot be routed ("" if it can). `count` is the number of records it holds."""
    header = batch.header
    if count == 0:
        return "the batch holds no records"
    if header.record_count and header.record_count != count:
        return f"the header says {header.record_count} records, the batch holds {count}"
    if header.last_offset < header.first_offset:
        return f"last_offset {header.last_offset} is below first_offset {header.first_offset}"
    if header.last_offset - header.first_offset + 1 < count:
        return (
            f"offsets {header.first_offset}..{header.last_offset} cannot hold {count} records "
            "(offsets must strictly increase within a partition)"
        )
    return ""


async def serve_push(engine: Engine, stream: Any) -> None:
    """Handle one PushRecords stream (a `grpclib.server.Stream[RawPushFrame, PushReply]`)."""
    first = await stream.recv_message()
    if first is None or not first.HasField("open"):
        raise GRPCError(Status.INVALID_ARGUMENT, "the first PushFrame must be `open` naming the source")
    source = first.open.source
    service = engine.services.get(source)
    if service is None or service.kind != "source":
        here = ", ".join(sorted(s.name for s in engine.services.values() if s.kind == "source")) or "none"
        raise GRPCError(
            Status.NOT_FOUND,
            f"no source service {source!r} is registered through sidecar {engine.sidecar_id} "
            f"(sources here: {here})",
        )
    if not is_push_source(service):
        raise GRPCError(
            Status.FAILED_PRECONDITION,
            f"source {source!r} is pulled (its Capabilities do not declare push = true); it cannot push",
        )
    await PushSession(engine, stream, source).run()


class PushSession:
    def __init__(self, engine: Engine, stream: Any, source: str) -> None:
        self.engine = engine
        self.stream = stream
        self.source = source
        config = engine.config
        self.buffer = ReceiveBuffer(Credits(config.edge_buffer_records, config.edge_buffer_bytes))
        self.runners: tuple[SourceRunner, ...] = ()
        self.partitions: set[int] = set()
        self.sent_acks: dict[int, int] = {}
        self.wake = asyncio.Event()  # a runner released acks
        self._send_lock = asyncio.Lock()
        self._completions: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        reader = asyncio.ensure_future(self._read())
        watcher = asyncio.ensure_future(self._watch())
        try:
            done, _ = await asyncio.wait({reader, watcher}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a protocol error or the end of the session (GRPCError) surfaces here
            if reader in done and self._completions:
                # The pusher closed its side: finish what it sent so its last acks reach it.
                await asyncio.wait(self._completions)
                await self._send(dataplane_pb2.PushReply(acks=self._new_acks()))
        finally:
            for task in (reader, watcher, *self._completions):
                task.cancel()
            for task in (reader, watcher, *self._completions):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for runner in self.runners:
                runner.ack_listeners.discard(self.wake.set)

    async def _send(self, reply: dataplane_pb2.PushReply) -> None:
        async with self._send_lock:
            await self.stream.send_message(reply)

    def _new_acks(self) -> list[dataplane_pb2.PushAck]:
        """Acks not sent yet: per partition this session pushed, the lowest offset every DAG released."""
        acks = []
        for partition in sorted(self.partitions):
            offset = min(runner.acked(partition) for runner in self.runners) if self.runners else -1
            if offset > self.sent_acks.get(partition, -1):
                self.sent_acks[partition] = offset
                acks.append(dataplane_pb2.PushAck(partition=partition, up_to_offset=offset))
        return acks

    async def _watch(self) -> None:
        announced_missing = False
        while True:
            current = push_runners(self.engine, self.source)
            if self.runners:
                if {id(r) for r in current} != {id(r) for r in self.runners}:
                    await self._end_changed()
            elif current:
                self.runners = tuple(current)
                for runner in self.runners:
                    runner.ack_listeners.add(self.wake.set)
                initial = self.buffer.open()
                await self._send(
                    dataplane_pb2.PushReply(
                        grant=records_pb2.Credits(records=initial.records, bytes=initial.nbytes)
                    )
                )
            elif not announced_missing:
                announced_missing = True
                await self._send(
                    dataplane_pb2.PushReply(
                        error=f"no pipeline reads source {self.source!r} on sidecar {self.engine.sidecar_id} "
                        "yet; credits follow once one is assigned"
                    )
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), POLL_S)
            self.wake.clear()
            if self.runners and (acks := self._new_acks()):
                await self._send(dataplane_pb2.PushReply(acks=acks))

    async def _end_changed(self) -> None:
        """The stages reading the source changed: let what is in flight finish (bounded by the drain
        timeout), send the last acks, and end the stream so the pusher resends the rest elsewhere."""
        if self._completions:
            await asyncio.wait(self._completions, timeout=self.engine.config.drain_timeout_ms / 1000)
        acks = self._new_acks()
        if acks:
            await self._send(dataplane_pb2.PushReply(acks=acks))
        raise GRPCError(
            Status.UNAVAILABLE,
            f"the pipelines reading source {self.source!r} changed on sidecar {self.engine.sidecar_id}; "
            "reconnect and resend what is not acknowledged",
        )

    async def _read(self) -> None:
        async for frame in self.stream:
            if frame.HasField("open"):
                raise GRPCError(Status.INVALID_ARGUMENT, "a push stream is opened once; got a second `open`")
            if frame.HasField("batch"):
                await self._accept(frame.batch)

    async def _accept(self, batch: records_pb2.RawRecordBatch) -> None:
        header = batch.header
        batch_id = (
            header.batch_id or f"{self.source}/{header.partition}/{header.first_offset}-{header.last_offset}"
        )
        if not self.runners:
            # Nothing was granted yet, so a well-behaved pusher does not get here; refuse, keep nothing.
            await self._send(
                dataplane_pb2.PushReply(
                    error=f"no pipeline reads source {self.source!r} yet; batch refused",
                    refused_batch_id=batch_id,
                )
            )
            return
        try:
            count = count_records(batch.records)
            problem = batch_problem(batch, count)
        except DecodeError as e:
            count, problem = header.record_count, f"the records do not decode: {e}"
        nbytes = len(batch.records)
        try:
            self.buffer.on_received(count, nbytes)
        except CreditViolation as e:
            raise GRPCError(
                Status.RESOURCE_EXHAUSTED, f"batch {batch_id} exceeds the granted credits: {e}"
            ) from e
        if problem:
            grant = self.buffer.on_consumed(count, nbytes)
            await self._send(
                dataplane_pb2.PushReply(
                    grant=records_pb2.Credits(records=grant.records, bytes=grant.nbytes),
                    error=f"batch {batch_id} refused: {problem}",
                    refused_batch_id=batch_id,
                )
            )
            return
        if any(runner.stopping for runner in self.runners):
            raise GRPCError(Status.UNAVAILABLE, f"the source stage of {self.source!r} is stopping; reconnect")
        header.record_count, header.source_id, header.batch_id = count, self.source, batch_id
        self.partitions.add(header.partition)
        tasks: list[asyncio.Task[None]] = []
        for index, runner in enumerate(self.runners):
            copy = batch
            if index < len(self.runners) - 1:  # each DAG's runner may trim its copy
                copy = records_pb2.RawRecordBatch()
                copy.CopyFrom(batch)
            task = await runner.accept_pushed(copy)
            if task is not None:
                tasks.append(task)
        await self._send(dataplane_pb2.PushReply(accepted_batch_ids=[batch_id]))
        completion = asyncio.ensure_future(self._complete(tasks, count, nbytes))
        self._completions.add(completion)
        completion.add_done_callback(self._completions.discard)

    async def _complete(self, tasks: list[asyncio.Task[None]], count: int, nbytes: int) -> None:
        if tasks:
            await asyncio.wait(tasks)
        grant = self.buffer.on_consumed(count, nbytes)
        acks = self._new_acks()
        if acks or not grant.is_zero:
            await self._send(
                dataplane_pb2.PushReply(
                    grant=records_pb2.Credits(records=grant.records, bytes=grant.nbytes), acks=acks
                )
            )
