"""nats-source and nats-sink against a real nats-server with JetStream: mapping, acks only of acknowledged
records, redelivery in order after a restart or a rewind, message ids that de-duplicate a retried batch."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import services_grpc, services_pb2
from etlrouter.connectors._nats import NatsOptions
from etlrouter.connectors.nats_sink import NatsSink
from etlrouter.connectors.nats_source import SUBJECT_HEADER, NatsSource
from etlrouter.sdk import Record, records_from_proto, serving
from tests.sdk.grpc_helpers import ack, channel_to, pull, write

_streams = itertools.count()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(nats_url)
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


@pytest.fixture
async def stream(js: Any) -> str:
    name = f"ORDERS{next(_streams)}"
    await js.add_stream(name=name, subjects=[f"{name.lower()}.>"])
    return name


async def publish(js: Any, stream: str, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        await js.publish(
            f"{stream.lower()}.new", f"order-{i}".encode(), headers={"Etl-Key": f"k{i}", "n": str(i)}
        )


def source(url: str, stream: str) -> NatsSource:
    return NatsSource(NatsOptions(url), stream, "etl")


async def test_messages_map_to_records_and_only_acknowledged_ones_are_acked(
    nats_url: str, js: Any, stream: str
) -> None:
    await publish(js, stream, 5)
    async with serving(source(nats_url, stream)) as host, channel_to(host.address) as channel:
        first = records_from_proto((await pull(channel, 3, wait_ms=1000)).batch.records)
        with pytest.raises(GRPCError) as refused:
            await ack(channel, 0, 4)  # sequence 4 was not handed out yet
        await ack(channel, 0, first[1].offset)
        info = await js.consumer_info(stream, "etl")
    assert [r.offset for r in first] == [1, 2, 3]
    assert first[0].key == b"k0" and first[0].value == b"order-0"
    assert first[0].headers == {"n": "0", SUBJECT_HEADER: f"{stream.lower()}.new"}
    assert first[0].event_time_ms > 1_700_000_000_000
    assert refused.value.status == Status.FAILED_PRECONDITION
    assert info.ack_floor.stream_seq == 2


async def test_a_restarted_source_delivers_everything_unacknowledged_again_in_order(
    nats_url: str, js: Any, stream: str
) -> None:
    await publish(js, stream, 6)
    async with serving(source(nats_url, stream)) as host, channel_to(host.address) as channel:
        first = records_from_proto((await pull(channel, 10, wait_ms=1000)).batch.records)
        await ack(channel, 0, 2)
    await publish(js, stream, 1, start=6)
    async with serving(source(nats_url, stream)) as host, channel_to(host.address) as channel:
        again = records_from_proto((await pull(channel, 10, wait_ms=1000)).batch.records)
    assert [r.offset for r in first] == [1, 2, 3, 4, 5, 6]
    assert [r.offset for r in again] == [3, 4, 5, 6, 7]


async def test_rewind_redelivers_from_the_ack_floor(nats_url: str, js: Any, stream: str) -> None:
    await publish(js, stream, 4)
    async with serving(source(nats_url, stream)) as host, channel_to(host.address) as channel:
        records_from_proto((await pull(channel, 10, wait_ms=1000)).batch.records)
        await ack(channel, 0, 1)
        request = services_pb2.PullRecordsRequest(max_records=10, wait_ms=1000, rewind=True)
        again = await services_grpc.SourceServiceStub(channel).PullRecords(request)
    assert [r.offset for r in records_from_proto(again.batch.records)] == [2, 3, 4]


async def test_sink_publishes_with_message_ids_so_a_retried_batch_is_stored_once(
    nats_url: str, js: Any, stream: str
) -> None:
    sink = NatsSink(NatsOptions(nats_url), f"{stream.lower()}.out", stream=stream)
    records = [Record(b"k1", b"one", {"h": "x"}, 5, 1), Record(b"", b"two", {}, 0, 2)]
    async with serving(sink) as host, channel_to(host.address) as channel:
        first = await write(channel, "st:orders/0/1-2", records)
        retry = await write(channel, "st:orders/0/1-2", records)
    assert (first.written, retry.written) == (2, 2)
    info = await js.stream_info(stream)
    assert info.state.messages == 2  # the retry's messages were duplicates
    one = await js.get_msg(stream, 1)
    assert one.data == b"one"
    assert one.headers is not None
    assert one.headers["Etl-Key"] == "k1" and one.headers["h"] == "x"
    assert one.headers["Nats-Msg-Id"] == "st:orders/0/1-2#0"
    # What the sink wrote, the source reads back with the same mapping.
    async with serving(source(nats_url, stream)) as host, channel_to(host.address) as channel:
        back = records_from_proto((await pull(channel, 10, wait_ms=1000)).batch.records)
    assert [(r.key, r.value, r.headers.get("h")) for r in back] == [(b"k1", b"one", "x"), (b"", b"two", None)]


async def test_sink_without_a_stream_for_the_subject_fails_as_retryable(nats_url: str) -> None:
    sink = NatsSink(NatsOptions(nats_url), "nobody.listens", timeout_s=2)
    async with serving(sink) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as failed:
            await write(channel, "b", [Record(b"", b"x", {}, 0, 1)])
    assert failed.value.status == Status.UNAVAILABLE
