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


def _connected_pair(connection_class: type[Any]) -> tuple[Any, Any]:
    """A client and a server H2Connection that have exchanged prefaces and settings, in memory."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection

    client = connection_class(H2Configuration(client_side=True))
    server = H2Connection(H2Configuration(client_side=False))
    client.initiate_connection()
    server.initiate_connection()
    for _ in range(2):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    return client, server


def test_a_message_sent_in_parts_is_the_same_frames_h2_would_write() -> None:
    tuned = transport._tuned_connection_class(1 << 20)
    ours, _ = _connected_pair(tuned)
    theirs, _ = _connected_pair(tuned)
    for connection in (ours, theirs):
        connection.send_headers(
            1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")]
        )
    body = bytes(range(256)) * 40
    # Queued frames (the HEADERS above) go out first, then the parts, as they are.
    ours.send_data_parts(1, [body[:5], memoryview(body)[5:]], end_stream=True)
    chunks = ours.chunks_to_send()
    assert any(chunk is body[:5] or isinstance(chunk, memoryview) for chunk in chunks)
    theirs.send_data(1, body, end_stream=True)
    assert b"".join(chunks) == theirs.data_to_send()
    assert ours.local_flow_control_window(1) == theirs.local_flow_control_window(1)
    assert ours.outbound_flow_control_window == theirs.outbound_flow_control_window
    assert ours.streams[1].state_machine.state == theirs.streams[1].state_machine.state
    # Nothing left behind; a caller asking for bytes while parts are queued gets them in order.
    assert ours.chunks_to_send() == []
    ours.send_headers(3, [(":method", "POST"), (":path", "/y"), (":scheme", "http"), (":authority", "a")])
    ours.send_data_parts(3, [b"abc"], end_stream=False)
    joined = ours.data_to_send()
    assert joined.endswith(b"\x00\x00\x03\x00\x00\x00\x00\x00\x03abc")


def test_parts_beyond_the_window_or_frame_size_are_refused_like_h2() -> None:
    import h2.exceptions

    ours, _ = _connected_pair(transport._tuned_connection_class(1 << 20))
    ours.send_headers(1, [(":method", "POST"), (":path", "/x"), (":scheme", "http"), (":authority", "a")])
    window = ours.local_flow_control_window(1)  # the peer's 64 KiB default
    with pytest.raises(h2.exceptions.FlowControlError):
        ours.send_data_parts(1, [b"x" * window, b"y"], end_stream=False)
    assert ours.local_flow_control_window(1) == window


async def test_a_message_larger_than_a_frame_and_the_window_arrives_whole(restore_transport: None) -> None:
    # 64 KiB windows and 16 KiB frames: a 2.5 MB batch is split across many frames and window updates.
    config = TransportConfig(
        max_frame_size=16_384, stream_window_bytes=65_535, connection_window_bytes=65_535
    )
    server = GrpcServer([Echo()], host="127.0.0.1", port=0, transport_config=config)
    await server.start()
    channel = open_channel(server.address, config)
    try:
        request = batch_of(10_000, 250)
        reply = await services_grpc.TransformServiceStub(channel).ProcessBatch(request, timeout=20)
        assert reply.batch == request.batch
    finally:
        channel.close()
        await server.stop()
