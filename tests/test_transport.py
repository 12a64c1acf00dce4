"""Transport limits and tuning, over real sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.core import transport
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import GrpcServer, open_channel


class Echo(services_grpc.TransformServiceBase):
    async def ProcessBatch(self, stream: Stream[services_pb2.ProcessBatchRequest, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(services_pb2.ProcessBatchResponse(batch=request.batch))

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await stream.send_message(records_pb2.GetCapabilitiesResponse())


def batch_of(n: int, value_size: int) -> services_pb2.ProcessBatchRequest:
    request = services_pb2.ProcessBatchRequest()
    for i in range(n):
        request.batch.records.records.add(key=str(i).encode(), value=b"x" * value_size)
    return request


@pytest.fixture
def restore_transport() -> Iterator[None]:
    yield
    transport.install(TransportConfig())


async def test_oversized_message_is_refused_before_buffering(restore_transport: None) -> None:
    config = TransportConfig(max_message_bytes=64 * 1024)
    server = GrpcServer([Echo()], host="127.0.0.1", port=0, transport_config=config)
    await server.start()
    channel = open_channel(server.address, config)
    try:
        stub = services_grpc.TransformServiceStub(channel)
        small = await stub.ProcessBatch(batch_of(10, 100), timeout=5)
        assert len(small.batch.records.records) == 10
        with pytest.raises(GRPCError) as info:
            await stub.ProcessBatch(batch_of(100, 1000), timeout=5)
        assert info.value.status == Status.RESOURCE_EXHAUSTED
        assert "exceeds the 65536 byte limit" in str(info.value.message)
        # The connection stays usable after a refused message.
        again = await stub.ProcessBatch(batch_of(3, 10), timeout=5)
        assert len(again.batch.records.records) == 3
    finally:
        channel.close()
        await server.stop()


@pytest.mark.parametrize("tuned", [True, False])
async def test_tuning_sets_frame_size_and_batches_round_trip(tuned: bool, restore_transport: None) -> None:
    config = TransportConfig(h2_tuning=tuned)
    server = GrpcServer([Echo()], host="127.0.0.1", port=0, transport_config=config)
    await server.start()
    channel = open_channel(server.address, config)
    try:
        reply = await services_grpc.TransformServiceStub(channel).ProcessBatch(
            batch_of(1000, 250), timeout=10
        )
        assert len(reply.batch.records.records) == 1000
        h2_conn = channel._protocol.connection._connection  # type: ignore[union-attr]
        expected = 1 << 20 if tuned else 16_384
        assert h2_conn.max_outbound_frame_size == expected  # what the server advertised
        assert h2_conn.local_settings.max_frame_size == expected  # what the client advertised
    finally:
        channel.close()
        await server.stop()


async def test_stopped_server_closes_client_connections() -> None:
    server = GrpcServer([Echo()], host="127.0.0.1", port=0)
    await server.start()
    channel = open_channel(server.address)
    stub = services_grpc.TransformServiceStub(channel)
    try:
        assert len((await stub.ProcessBatch(batch_of(1, 1), timeout=5)).batch.records.records) == 1
        await server.stop()
        # grpclib alone leaves the connection open, and a stopped server would go on answering calls on it.
        with pytest.raises((StreamTerminatedError, ConnectionError, GRPCError)):
            await stub.ProcessBatch(batch_of(1, 1), timeout=5)
    finally:
        channel.close()
