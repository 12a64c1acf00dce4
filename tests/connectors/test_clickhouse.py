"""clickhouse sink against a real ClickHouse server (Debian's 18.16): JSONEachRow inserts with metadata
columns, retries that do not duplicate a batch, schema-mismatch rows rejected with the server's message."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import aiohttp
import msgspec
import pytest

from etlrouter._proto.v1 import records_pb2
from etlrouter.connectors.clickhouse import ClickHouseSink
from etlrouter.sdk import Record, serving
from tests.sdk.grpc_helpers import channel_to, write

_tables = itertools.count()


class Client:
    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session

    async def query(self, sql: str) -> str:
        async with self.session.post(self.url, data=sql.encode()) as r:
            text = await r.text()
            assert r.status == 200, text
            return text

    async def rows(self, sql: str) -> list[dict[str, object]]:
        text = await self.query(sql + " FORMAT JSONEachRow")
        return [msgspec.json.decode(line) for line in text.splitlines() if line]


@pytest.fixture
async def ch(clickhouse_url: str) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        yield Client(clickhouse_url, session)


@pytest.fixture
async def table(ch: Client) -> str:
    name = f"events_{next(_tables)}"
    await ch.query(
        f"CREATE TABLE {name} (id UInt64, country String, amount Float64, _batch String, _offset UInt64, "
        "_key String, _time Int64) ENGINE = MergeTree ORDER BY (id)"
    )
    return name


def order(offset: int, **fields: object) -> Record:
    return Record(f"k{offset}".encode(), msgspec.json.encode(fields), {}, 1_700_000_000_000 + offset, offset)


def sink(url: str, table: str) -> ClickHouseSink:
    return ClickHouseSink(
        url,
        table,
        batch_id_column="_batch",
        offset_column="_offset",
        key_column="_key",
        event_time_column="_time",
    )


async def test_rows_carry_the_value_fields_and_the_metadata_columns(
    clickhouse_url: str, ch: Client, table: str
) -> None:
    records = [order(1, id=1, country="DE", amount=2.5), order(2, id=2, country="FR", amount=1)]
    async with serving(sink(clickhouse_url, table)) as host, channel_to(host.address) as channel:
        reply = await write(channel, "s:orders/0/1-2", records)
    assert reply.written == 2 and not reply.errors
    assert await ch.rows(f"SELECT * FROM {table} ORDER BY id") == [
        {"id": "1", "country": "DE", "amount": 2.5, "_batch": "s:orders/0/1-2", "_offset": "1",
         "_key": "k1", "_time": "1700000000001"},
        {"id": "2", "country": "FR", "amount": 1, "_batch": "s:orders/0/1-2", "_offset": "2",
         "_key": "k2", "_time": "1700000000002"},
    ]  # fmt: skip


async def test_a_retried_batch_is_not_inserted_twice(clickhouse_url: str, ch: Client, table: str) -> None:
    records = [order(i, id=i, country="DE", amount=i) for i in range(5)]
    async with serving(sink(clickhouse_url, table)) as host, channel_to(host.address) as channel:
        first = await write(channel, "batch-1", records)
        retry = await write(channel, "batch-1", records)
        other = await write(channel, "batch-2", records[:2])
    assert (first.written, retry.written, other.written) == (5, 5, 2)
    assert await ch.rows(f"SELECT _batch, count() AS n FROM {table} GROUP BY _batch ORDER BY _batch") == [
        {"_batch": "batch-1", "n": "5"},
        {"_batch": "batch-2", "n": "2"},
    ]


async def test_schema_mismatch_rows_are_rejected_with_the_servers_message_and_the_rest_inserted(
    clickhouse_url: str, ch: Client, table: str
) -> None:
    records = [
        order(0, id=0, country="DE", amount=1),
        order(1, id="not a number", country="FR", amount=2),
        order(2, id=2, country="US", amount=3),
        order(3, id=3, country="JP", amount=4, colour="red"),  # no such column
        Record(b"", b"[1, 2]", {}, 0, 4),  # not an object
        order(5, id=5, country="BR", amount=6),
    ]
    async with serving(sink(clickhouse_url, table)) as host, channel_to(host.address) as channel:
        reply = await write(channel, "mixed", records)
        retry = await write(channel, "mixed", records)  # already written: the same rejects, nothing added
    errors = {e.index: e for e in reply.errors}
    assert reply.written == 3 and sorted(errors) == [1, 3, 4]
    assert all(e.error_class == records_pb2.ERROR_CLASS_REJECTED for e in reply.errors)
    assert "Code: 27" in errors[1].message and "Cannot parse input" in errors[1].message
    assert "Unknown field found while parsing JSONEachRow format: colour" in errors[3].message
    assert "not a JSON object" in errors[4].message
    assert (retry.written, [e.index for e in retry.errors]) == (3, [1, 3, 4])
    assert [r["id"] for r in await ch.rows(f"SELECT id FROM {table} ORDER BY id")] == ["0", "2", "5"]


async def test_a_missing_table_fails_the_call_as_retryable(clickhouse_url: str) -> None:
    from grpclib.const import Status
    from grpclib.exceptions import GRPCError

    async with serving(sink(clickhouse_url, "no_such_table")) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as failed:
            await write(channel, "b", [order(0, id=0)])
    assert failed.value.status == Status.UNAVAILABLE
    assert "Code: 60" in str(failed.value.message)
