"""redis-streams source against a real Redis server: XREADGROUP pulls, XACK acks, redelivery."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as redis
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import services_grpc, services_pb2
from etlrouter.connectors.redis_streams import ID_HEADER, RedisStreamsSource, id_to_offset, offset_to_id
from etlrouter.sdk import PermanentError, Record, records_from_proto, serving
from tests.sdk.grpc_helpers import ack, channel_to, pull

_streams = itertools.count()


@pytest.fixture
def stream() -> str:
    return f"orders-{next(_streams)}"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    try:
        yield c
    finally:
        await c.aclose()


async def add(client: redis.Redis, stream: str, n: int, start: int = 0) -> list[str]:
    ids = [await client.xadd(stream, {"id": f"o{i}", "amount": str(i * 10)}) for i in range(start, start + n)]
    return [i.decode() if isinstance(i, bytes) else i for i in ids]


def test_offsets_follow_stream_ids() -> None:
    assert id_to_offset("1700000000000-0") < id_to_offset("1700000000000-1") < id_to_offset("1700000000001-0")
    assert offset_to_id(id_to_offset("1700000000123-45")) == "1700000000123-45"
    with pytest.raises(PermanentError, match="sequence number above"):
        id_to_offset(f"1-{2**20}")


async def test_pull_maps_entries_to_records_and_ack_clears_the_pending_list(
    redis_url: str, client: redis.Redis, stream: str
) -> None:
    ids = await add(client, stream, 5)
    source = RedisStreamsSource(redis_url, stream, "etl", "c1", key_field="id")
    async with serving(source) as host, channel_to(host.address) as channel:
        first = await pull(channel, 3)
        rest = await pull(channel, 10)
        await ack(channel, 0, first.batch.header.last_offset)
        pending = await client.xpending(stream, "etl")
    records = records_from_proto(first.batch.records) + records_from_proto(rest.batch.records)
    assert [r.headers[ID_HEADER] for r in records] == ids
    assert [r.offset for r in records] == [id_to_offset(i) for i in ids]
    assert [r.key for r in records] == [b"o0", b"o1", b"o2", b"o3", b"o4"]
    assert msgspec.json.decode(records[2].value) == {"id": "o2", "amount": "20"}
    assert records[0].event_time_ms == int(ids[0].split("-")[0])
    assert first.batch.header.first_offset == id_to_offset(ids[0])
    assert pending["pending"] == 2  # o3 and o4 were delivered but not acknowledged
    assert pending["min"].decode() == ids[3]


async def test_a_long_poll_returns_entries_added_while_waiting(
    redis_url: str, client: redis.Redis, stream: str
) -> None:
    source = RedisStreamsSource(redis_url, stream, "etl", "c1", value_field="amount")
    async with serving(source) as host, channel_to(host.address) as channel:
        empty = await pull(channel, 10, wait_ms=10)
        waiting = asyncio.ensure_future(pull(channel, 10, wait_ms=5000))
        await asyncio.sleep(0.1)
        async with client.pipeline(transaction=True) as both:  # both entries appear at once
            both.xadd(stream, {"amount": "0"})
            both.xadd(stream, {"amount": "10"})
            await both.execute()
        got = await asyncio.wait_for(waiting, 5)
    assert empty.batch.header.record_count == 0 and not empty.end_of_stream
    assert [r.value for r in records_from_proto(got.batch.records)] == [b"0", b"10"]


async def test_a_restarted_source_redelivers_what_was_not_acknowledged(
    redis_url: str, client: redis.Redis, stream: str
) -> None:
    await add(client, stream, 4)
    async with (
        serving(RedisStreamsSource(redis_url, stream, "etl", "c1")) as host,
        channel_to(host.address) as channel,
    ):
        first = records_from_proto((await pull(channel, 4)).batch.records)
        await ack(channel, 0, first[1].offset)
    await add(client, stream, 1, start=4)
    async with serving(RedisStreamsSource(redis_url, stream, "etl", "c1")) as host:
        async with channel_to(host.address) as channel:
            again = records_from_proto((await pull(channel, 10)).batch.records)
            new = records_from_proto((await pull(channel, 10)).batch.records)
            await ack(channel, 0, new[-1].offset)
        pending = await client.xpending(stream, "etl")
    assert again == first[2:]
    assert [msgspec.json.decode(r.value)["id"] for r in new] == ["o4"]
    assert pending["pending"] == 0


async def test_unacknowledged_entries_are_redelivered_after_the_timeout(
    redis_url: str, client: redis.Redis, stream: str
) -> None:
    await add(client, stream, 3)
    source = RedisStreamsSource(redis_url, stream, "etl", "c1", redeliver_after_ms=500)
    async with serving(source) as host, channel_to(host.address) as channel:
        first = records_from_proto((await pull(channel, 10)).batch.records)
        await ack(channel, 0, first[0].offset)
        too_soon = await pull(channel, 10)
        await asyncio.sleep(0.6)
        again = records_from_proto((await pull(channel, 10)).batch.records)
    assert too_soon.batch.header.record_count == 0
    assert again == first[1:]


async def test_max_bytes_keeps_the_rest_for_the_next_pull_and_refuses_acks_beyond_delivery(
    redis_url: str, client: redis.Redis, stream: str
) -> None:
    ids = await add(client, stream, 3)
    source = RedisStreamsSource(redis_url, stream, "etl", "c1")
    async with serving(source) as host, channel_to(host.address) as channel:
        one = records_from_proto((await pull(channel, 10, max_bytes=10)).batch.records)
        with pytest.raises(GRPCError) as err:
            await ack(channel, 0, id_to_offset(ids[1]))
        rest = records_from_proto((await pull(channel, 10)).batch.records)
    assert len(one) == 1 and len(rest) == 2
    assert [r.offset for r in one + rest] == sorted(r.offset for r in one + rest)
    assert err.value.status == Status.FAILED_PRECONDITION
    assert "was not delivered yet" in str(err.value.message)


async def test_two_consumers_of_a_group_share_the_stream(
    redis_url: str, client: redis.Redis, stream: str
) -> None:
    await add(client, stream, 4)
    async with (
        serving(RedisStreamsSource(redis_url, stream, "etl", "a")) as a,
        serving(RedisStreamsSource(redis_url, stream, "etl", "b")) as b,
        channel_to(a.address) as channel_a,
        channel_to(b.address) as channel_b,
    ):
        from_a = records_from_proto((await pull(channel_a, 2)).batch.records)
        from_b = records_from_proto((await pull(channel_b, 10)).batch.records)
    ids: list[Record] = from_a + from_b
    assert sorted(r.headers[ID_HEADER] for r in ids) == sorted({r.headers[ID_HEADER] for r in ids})
    assert (len(from_a), len(from_b)) == (2, 2)


async def test_rewind_rereads_the_pending_entries_then_continues_with_new_ones(
    redis_url: str, client: redis.Redis, stream: str
) -> None:
    await add(client, stream, 5)
    async with (
        serving(RedisStreamsSource(redis_url, stream, "etl", "c1")) as host,
        channel_to(host.address) as channel,
    ):
        first = records_from_proto((await pull(channel, 3)).batch.records)
        await ack(channel, 0, first[0].offset)
        # A new sidecar session: PullRecords with rewind, without a restart of the source.
        request = services_pb2.PullRecordsRequest(max_records=10, rewind=True)
        again = records_from_proto(
            (await services_grpc.SourceServiceStub(channel).PullRecords(request)).batch.records
        )
        rest = records_from_proto((await pull(channel, 10)).batch.records)
        await ack(channel, 0, rest[-1].offset)
        pending = await client.xpending(stream, "etl")
    assert again == first[1:]
    assert [msgspec.json.decode(r.value)["id"] for r in rest] == ["o3", "o4"]
    assert pending["pending"] == 0
