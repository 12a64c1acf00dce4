"""Client-side helpers shared by the SDK and connector tests: real grpclib stubs over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from grpclib.client import Channel
from grpclib.health.v1 import health_pb2
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.core.grpc import open_channel
from etlrouter.sdk import Record, records_from_proto, records_to_proto


@asynccontextmanager
async def channel_to(address: str) -> AsyncIterator[Channel]:
    channel = open_channel(address)
    try:
        yield channel
    finally:
        channel.close()


async def list_services(channel: Channel) -> list[str]:
    """Service names the server lists through gRPC server reflection (v1)."""
    stub = ServerReflectionStub(channel)
    async with stub.ServerReflectionInfo.open() as stream:
        await stream.send_message(reflection_pb2.ServerReflectionRequest(list_services=""), end=True)
        response = await stream.recv_message()
    assert response is not None
    return sorted(s.name for s in response.list_services_response.service)


async def health_status(channel: Channel, service: str = "") -> int:
    response = await HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def pull(
    channel: Channel,
    max_records: int = 100,
    *,
    max_bytes: int = 0,
    wait_ms: int = 0,
    partitions: list[int] | None = None,
) -> services_pb2.PullRecordsResponse:
    return await services_grpc.SourceServiceStub(channel).PullRecords(
        services_pb2.PullRecordsRequest(
            max_records=max_records, max_bytes=max_bytes, wait_ms=wait_ms, partitions=partitions or []
        )
    )


async def ack(channel: Channel, partition: int, up_to_offset: int) -> None:
    await services_grpc.SourceServiceStub(channel).Acknowledge(
        services_pb2.AcknowledgeRequest(
            acks=[services_pb2.PartitionAck(partition=partition, up_to_offset=up_to_offset)]
        )
    )


def batch_of(records: list[Record], batch_id: str = "") -> records_pb2.RecordBatch:
    return records_pb2.RecordBatch(
        header=records_pb2.BatchHeader(batch_id=batch_id, record_count=len(records)),
        records=records_to_proto(records),
    )


async def process(
    channel: Channel, records: list[Record], options: dict[str, str] | None = None
) -> tuple[list[Record], list[records_pb2.RecordError]]:
    response = await services_grpc.TransformServiceStub(channel).ProcessBatch(
        services_pb2.ProcessBatchRequest(batch=batch_of(records), options=options or {})
    )
    # Every answer says how many records it holds: the sidecar takes that instead of counting them.
    assert response.batch.header.record_count == len(response.batch.records.records)
    return records_from_proto(response.batch.records), list(response.errors)


async def write(
    channel: Channel, batch_id: str, records: list[Record], options: dict[str, str] | None = None
) -> services_pb2.WriteBatchResponse:
    return await services_grpc.SinkServiceStub(channel).WriteBatch(
        services_pb2.WriteBatchRequest(batch=batch_of(records, batch_id), options=options or {})
    )


async def flush(channel: Channel) -> None:
    await services_grpc.SinkServiceStub(channel).Flush(services_pb2.FlushRequest())
