"""SidecarDataPlane: the receiving end of edges between sidecars.

Per stream: the sender opens with EdgeOpen (which DAG and stage), we grant credits from a bounded receive
buffer, hand every batch to the engine, and answer with its outcome plus the credits it frees. Batches of
one stream are handled concurrently (the credit window bounds how many), outcomes go back as they finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from etlrouter._proto.v1 import dataplane_grpc, dataplane_pb2, records_pb2, services_pb2
from etlrouter.flow.credits import Credits, ReceiveBuffer
from etlrouter.sidecar.engine import Engine
from etlrouter.sidecar.push import serve_push
from etlrouter.sidecar.wire import ServiceClient

log = logging.getLogger(__name__)

DLQ_WRITE_TIMEOUT_S = 5.0  # one WriteBatch of dead letters; the sender falls back to its local store


class DataPlaneService(dataplane_grpc.SidecarDataPlaneBase):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def ReceiveRecords(
        self, stream: Stream[dataplane_pb2.DataFrame, dataplane_pb2.ControlFrame]
    ) -> None:
        first = await stream.recv_message()
        if first is None or not first.HasField("open"):
            raise GRPCError(Status.INVALID_ARGUMENT, "the first DataFrame of an edge must be `open`")
        edge = first.open
        if edge.dlq_sink:
            await self._receive_dead_letters(stream, edge)
            return
        if not self.engine.runs(edge.dag_id, edge.stage_id):
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"stage {edge.stage_id} of {edge.dag_id} does not run on sidecar {self.engine.sidecar_id}",
            )
        config = self.engine.config
        buffer = ReceiveBuffer(Credits(config.edge_buffer_records, config.edge_buffer_bytes))
        send_lock = asyncio.Lock()
        tasks: set[asyncio.Task[None]] = set()
        initial = buffer.open()
        await stream.send_message(
            dataplane_pb2.ControlFrame(
                grant=records_pb2.Credits(records=initial.records, bytes=initial.nbytes)
            )
        )

        async def handle(batch: records_pb2.RawRecordBatch, nbytes: int) -> None:
            result = await self.engine.receive(
                edge.dag_id, edge.stage_id, batch, sender=f"{edge.sender_sidecar_id}/{edge.from_stage_id}"
            )
            grant = buffer.on_consumed(batch.header.record_count, nbytes)
            frame = dataplane_pb2.ControlFrame(
                grant=records_pb2.Credits(records=grant.records, bytes=grant.nbytes),
                outcomes=[
                    dataplane_pb2.BatchOutcome(
                        batch_id=batch.header.batch_id,
                        status=dataplane_pb2.BATCH_STATUS_DONE
                        if result.done
                        else dataplane_pb2.BATCH_STATUS_RETRY,
                        dead_lettered=result.dead_lettered,
                        error=result.error,
                    )
                ],
            )
            async with send_lock:
                await stream.send_message(frame)

        try:
            async for frame in stream:
                if frame.HasField("batch"):
                    batch = frame.batch
                    nbytes = len(batch.records)  # reading `records` copies them (upb): once per batch
                    # A sender beyond its credits raises CreditViolation: a protocol bug, ends the edge.
                    buffer.on_received(batch.header.record_count, nbytes)
                    task = asyncio.ensure_future(handle(batch, nbytes))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                elif frame.HasField("close"):
                    break
            if tasks:
                await asyncio.wait(tasks)
        finally:
            pending = list(tasks)  # done-callbacks shrink `tasks` while we wait
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def PushRecords(self, stream: Stream[Any, Any]) -> None:
        await serve_push(self.engine, stream)

    def __mapping__(self) -> dict[str, Handler]:
        mapping = super().__mapping__()
        # Pushed batches are parsed with their records left encoded, like every batch the sidecar routes.
        push = "/etlrouter.v1.SidecarDataPlane/PushRecords"
        mapping[push] = Handler(
            self.PushRecords, Cardinality.STREAM_STREAM, dataplane_pb2.RawPushFrame, dataplane_pb2.PushReply
        )
        return mapping

    async def _receive_dead_letters(
        self,
        stream: Stream[dataplane_pb2.DataFrame, dataplane_pb2.ControlFrame],
        edge: dataplane_pb2.EdgeOpen,
    ) -> None:
        """Dead letters of another stage for a local sink service (a stage's `dlq` option): each batch is
        written once; the outcome is DONE only when the sink wrote every record, else RETRY with why, and the
        sender keeps them in its local store. No retries here: the sender is waiting, bounded."""
        service = self.engine.services.get(edge.dlq_sink)
        if service is None or service.kind != "sink":
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"no sink service {edge.dlq_sink!r} is registered through sidecar {self.engine.sidecar_id}",
            )
        config = self.engine.config
        buffer = ReceiveBuffer(Credits(config.edge_buffer_records, config.edge_buffer_bytes))
        initial = buffer.open()
        await stream.send_message(
            dataplane_pb2.ControlFrame(
                grant=records_pb2.Credits(records=initial.records, bytes=initial.nbytes)
            )
        )
        client = ServiceClient(self.engine.channel_for(service.endpoint))
        async for frame in stream:
            if frame.HasField("close"):
                break
            if not frame.HasField("batch"):
                continue
            batch = frame.batch
            buffer.on_received(batch.header.record_count, len(batch.records))
            error = ""
            try:
                reply = await asyncio.wait_for(
                    client.write(services_pb2.RawWriteBatchRequest(batch=batch)), DLQ_WRITE_TIMEOUT_S
                )
                if reply.errors:
                    first_error = reply.errors[0].message
                    error = f"the DLQ sink {edge.dlq_sink} refused {len(reply.errors)} records: {first_error}"
                elif service.capabilities.requires_flush:
                    await asyncio.wait_for(client.flush(services_pb2.FlushRequest()), DLQ_WRITE_TIMEOUT_S)
            except (GRPCError, StreamTerminatedError, OSError) as e:  # OSError covers TimeoutError
                error = f"writing to the DLQ sink {edge.dlq_sink} failed: {e!r}"
            grant = buffer.on_consumed(batch.header.record_count, len(batch.records))
            status = dataplane_pb2.BATCH_STATUS_RETRY if error else dataplane_pb2.BATCH_STATUS_DONE
            await stream.send_message(
                dataplane_pb2.ControlFrame(
                    grant=records_pb2.Credits(records=grant.records, bytes=grant.nbytes),
                    outcomes=[
                        dataplane_pb2.BatchOutcome(batch_id=batch.header.batch_id, status=status, error=error)
                    ],
                )
            )
