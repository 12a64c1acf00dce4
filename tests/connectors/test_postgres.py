"""postgres sink against a real PostgreSQL server: insert, upsert, idempotency by batch id, rejects."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import msgspec
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import records_pb2
from etlrouter.connectors.postgres import PostgresSink, quote_table
from etlrouter.sdk import Record, serving
from tests.conftest import free_port
from tests.sdk.grpc_helpers import channel_to, write

_tables = itertools.count()


@pytest.fixture
def table() -> str:
    return f"events_{next(_tables)}"


@pytest.fixture
async def db(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()


def order(offset: int, key: bytes, amount: int) -> Record:
    return Record(key, msgspec.json.encode({"amount": amount}), {"src": "test"}, 1_000 + offset, offset)


async def test_insert_is_idempotent_by_batch_id(
    postgres_dsn: str, db: asyncpg.Connection, table: str
) -> None:
    sink = PostgresSink(postgres_dsn, table, value_type="jsonb", create_table=True)
    records = [order(1, b"a", 5), order(2, b"b", 7)]
    async with serving(sink) as host, channel_to(host.address) as channel:
        first = await write(channel, "batch-1", records)
        retry = await write(channel, "batch-1", records)
        second = await write(channel, "batch-2", records[:1])
    assert (first.written, retry.written, second.written) == (2, 2, 1)
    rows = await db.fetch(
        f"SELECT key, value, headers, event_time_ms, source_offset, batch_id FROM {table} ORDER BY 6, 5"
    )
    assert [(r["key"], r["source_offset"], r["batch_id"]) for r in rows] == [
        (b"a", 1, "batch-1"),
        (b"b", 2, "batch-1"),
        (b"a", 1, "batch-2"),
    ]
    assert msgspec.json.decode(rows[0]["value"]) == {"amount": 5}
    assert msgspec.json.decode(rows[0]["headers"]) == {"src": "test"}
    assert rows[0]["event_time_ms"] == 1_001
    counts = await db.fetch(
        "SELECT batch_id, record_count FROM etlrouter_batches WHERE batch_id LIKE 'batch-%'"
    )
    assert {(r["batch_id"], r["record_count"]) for r in counts} >= {("batch-1", 2), ("batch-2", 1)}


async def test_upsert_keeps_the_last_value_per_key(
    postgres_dsn: str, db: asyncpg.Connection, table: str
) -> None:
    sink = PostgresSink(postgres_dsn, table, mode="upsert", value_type="jsonb", create_table=True)
    async with serving(sink) as host, channel_to(host.address) as channel:
        await write(channel, f"{table}-1", [order(1, b"a", 1), order(2, b"b", 2), order(3, b"a", 3)])
        await write(channel, f"{table}-2", [order(4, b"b", 4)])
    rows = await db.fetch(f"SELECT key, value->>'amount' AS amount, source_offset FROM {table} ORDER BY key")
    assert [(r["key"], r["amount"], r["source_offset"]) for r in rows] == [(b"a", "3", 3), (b"b", "4", 4)]


async def test_records_the_table_refuses_are_rejected_one_by_one(
    postgres_dsn: str, db: asyncpg.Connection, table: str
) -> None:
    await db.execute(
        f"CREATE TABLE {table} (key bytea, value jsonb CHECK ((value->>'amount')::int >= 0), headers jsonb, "
        "event_time_ms bigint, source_offset bigint, batch_id text)"
    )
    sink = PostgresSink(postgres_dsn, table, value_type="jsonb")
    records = [order(1, b"a", 5), Record(b"b", b"not json", {}, 0, 2), order(3, b"c", -1), order(4, b"d", 9)]
    async with serving(sink) as host, channel_to(host.address) as channel:
        response = await write(channel, f"{table}-1", records)
    assert response.written == 2
    assert [(e.index, e.error_class) for e in response.errors] == [
        (1, records_pb2.ERROR_CLASS_REJECTED),
        (2, records_pb2.ERROR_CLASS_REJECTED),
    ]
    assert "not valid JSON" in response.errors[0].message
    assert "CheckViolationError" in response.errors[1].message
    assert [r["source_offset"] for r in await db.fetch(f"SELECT source_offset FROM {table} ORDER BY 1")] == [
        1,
        4,
    ]


class CuttableProxy:
    """A TCP proxy to the database that the test can cut (connections dropped, new ones refused)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._connect, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_a_lost_database_is_unavailable_and_the_retry_succeeds(
    postgres_dsn: str, db: asyncpg.Connection, table: str
) -> None:
    target = urlsplit(postgres_dsn)
    assert target.port is not None
    proxy = CuttableProxy(target.port)
    await proxy.start()
    sink = PostgresSink(postgres_dsn.replace(f":{target.port}/", f":{proxy.port}/"), table, create_table=True)
    async with serving(sink) as host, channel_to(host.address) as channel:
        await write(channel, f"{table}-1", [order(1, b"a", 1)])
        await proxy.cut()
        with pytest.raises(GRPCError) as err:
            await write(channel, f"{table}-2", [order(2, b"b", 2)])
        await proxy.start()
        retried = await write(channel, f"{table}-2", [order(2, b"b", 2)])
        await proxy.cut()
    assert err.value.status == Status.UNAVAILABLE
    assert str(err.value.message).startswith("WriteBatch: postgres: ")
    assert retried.written == 1
    assert await db.fetchval(f"SELECT count(*) FROM {table}") == 2


def test_table_names_are_checked() -> None:
    assert quote_table("public.events") == '"public"."events"'
    with pytest.raises(ValueError, match=r"must be NAME or SCHEMA\.NAME"):
        quote_table("events; DROP TABLE x")
