"""`postgres` sink: batch insert or upsert into a table, idempotent by batch id.

    python -m etlrouter.connectors.postgres --port 50067 --dsn postgresql://etl@db/etl --table events \
        [--mode insert|upsert] [--value-type bytea|jsonb|text] [--create-table]

Rows: (key bytea, value <value-type>, headers jsonb, event_time_ms bigint, source_offset bigint,
batch_id text). One WriteBatch is one transaction that first inserts the batch id into
`etlrouter_batches(batch_id primary key)`; if the id is already there the batch was written before (or is
being written by a concurrent retry, which the primary key makes wait) and nothing is written again. The
records go in with one `INSERT ... SELECT FROM unnest(...)` round trip; upsert mode adds
`ON CONFLICT (key) DO UPDATE` (the last record of a key in a batch wins). If the database refuses the
bulk insert for data reasons (a constraint, a value it cannot store), the records are retried one by one
inside savepoints and only the refused ones are reported, as REJECTED with the database's message.
A commit is durable, so the sink does not require Flush. Lost connections and serialization failures are
retryable (UNAVAILABLE).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import click
import msgspec

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.sdk import Capabilities, ErrorClass, Record, RecordError, RetryableError, Sink, Written

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_BIGINT = 2**63 - 1
VALUE_TYPES = ("bytea", "jsonb", "text")

# Failures worth retrying: the connection, the server's availability, transaction conflicts.
_RETRYABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)
# Failures caused by the data of some record.
_DATA_ERRORS = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


def quote_table(name: str) -> str:
    """`schema.table` or `table` as a quoted SQL identifier; anything else is refused."""
    parts = name.split(".")
    if len(parts) > 2 or not all(_IDENTIFIER.match(p) for p in parts):
        raise ValueError(f"table name {name!r} must be NAME or SCHEMA.NAME of letters, digits and '_'")
    return ".".join(f'"{p}"' for p in parts)


class PostgresSink(Sink):
    def __init__(
        self,
        dsn: str,
        table: str,
        *,
        mode: str = "insert",
        value_type: str = "bytea",
        batches_table: str = "etlrouter_batches",
        create_table: bool = False,
        pool_size: int = 4,
    ) -> None:
        if mode not in ("insert", "upsert"):
            raise ValueError(f"mode must be insert or upsert, got {mode!r}")
        if value_type not in VALUE_TYPES:
            raise ValueError(f"value type must be one of {', '.join(VALUE_TYPES)}, got {value_type!r}")
        self.dsn = dsn
        self.table = quote_table(table)
        self.batches_table = quote_table(batches_table)
        self.mode = mode
        self.value_type = value_type
        self.create_table = create_table
        self.pool_size = pool_size
        self.capabilities = Capabilities(
            name="postgres",
            version=VERSION,
            idempotent_writes=True,
            max_concurrency=pool_size,
            labels={"table": table, "mode": mode},
        )
        self.pool: Any = None
        columns = "key, value, headers, event_time_ms, source_offset, batch_id"
        conflict = ""
        if mode == "upsert":
            updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns.split(", ") if c != "key")
            conflict = f" ON CONFLICT (key) DO UPDATE SET {updates}"
        # Values travel as text (jsonb) or bytea arrays and are cast on the server.
        wire_type = "bytea" if value_type == "bytea" else "text"
        self._bulk_sql = (
            f"INSERT INTO {self.table} ({columns}) "
            f"SELECT k, v::{value_type}, h::jsonb, t, o, $6 "
            f"FROM unnest($1::bytea[], $2::{wire_type}[], $3::text[], $4::int8[], $5::int8[]) "
            "AS u(k, v, h, t, o)"
            f"{conflict}"
        )
        self._row_sql = (
            f"INSERT INTO {self.table} ({columns}) "
            f"VALUES ($1, $2::{wire_type}::{value_type}, $3::jsonb, $4, $5, $6)"
            f"{conflict}"
        )

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        async with self.pool.acquire() as conn:
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.batches_table} "
                "(batch_id text PRIMARY KEY, record_count integer NOT NULL, "
                "written_at timestamptz NOT NULL DEFAULT now())"
            )
            if self.create_table:
                key = "bytea PRIMARY KEY" if self.mode == "upsert" else "bytea NOT NULL"
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.table} (key {key}, value {self.value_type}, "
                    "headers jsonb NOT NULL, event_time_ms bigint NOT NULL, source_offset bigint NOT NULL, "
                    "batch_id text NOT NULL)"
                )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    def _row(self, record: Record) -> tuple[bytes, Any, str, int, int]:
        """The column values of a record; raises ValueError naming what the table cannot hold."""
        value: Any = record.value
        if self.value_type != "bytea":
            try:
                value = record.value.decode()
            except UnicodeDecodeError:
                raise ValueError(f"value is not UTF-8 text (needed for a {self.value_type} column)") from None
            if "\x00" in value:
                raise ValueError(f"value contains a NUL character, which {self.value_type} cannot store")
            if self.value_type == "jsonb":
                try:
                    msgspec.json.decode(record.value)
                except msgspec.DecodeError as exc:
                    raise ValueError(f"value is not valid JSON: {exc}") from None
        if record.offset > _MAX_BIGINT:
            raise ValueError(f"offset {record.offset} does not fit a bigint column")
        headers = msgspec.json.encode(record.headers).decode()
        return record.key, value, headers, record.event_time_ms, record.offset

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        rows: list[tuple[int, tuple[bytes, Any, str, int, int]]] = []
        errors: list[RecordError] = []
        for index, record in enumerate(records):
            try:
                rows.append((index, self._row(record)))
            except ValueError as exc:
                errors.append(RecordError(index, ErrorClass.REJECTED, str(exc)))
        if self.mode == "upsert":
            # One statement may not update the same key twice: the last record of a key wins.
            latest = {row[0]: (index, row) for index, row in rows}
            rows = sorted(latest.values(), key=lambda item: item[0])
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if batch_id:
                    first_time = await conn.fetchval(
                        f"INSERT INTO {self.batches_table} (batch_id, record_count) VALUES ($1, $2) "
                        "ON CONFLICT (batch_id) DO NOTHING RETURNING true",
                        batch_id,
                        len(records),
                    )
                    if not first_time:
                        return Written(len(records))  # written by an earlier attempt
                errors += await self._insert(conn, batch_id, rows)
        except _RETRYABLE as exc:
            raise RetryableError(f"postgres: {type(exc).__name__}: {exc}") from exc
        errors.sort(key=lambda e: e.index)
        return Written(len(records) - len(errors), errors)

    async def _insert(
        self, conn: Any, batch_id: str, rows: list[tuple[int, tuple[Any, ...]]]
    ) -> list[RecordError]:
        if not rows:
            return []
        columns = list(zip(*(row for _, row in rows), strict=True))
        try:
            async with conn.transaction():  # a savepoint: a refused bulk insert leaves the batch id row
                await conn.execute(self._bulk_sql, *columns, batch_id)
            return []
        except _DATA_ERRORS:
            pass
        errors: list[RecordError] = []
        for index, row in rows:
            try:
                async with conn.transaction():
                    await conn.execute(self._row_sql, *row, batch_id)
            except _DATA_ERRORS as exc:
                errors.append(
                    RecordError(index, ErrorClass.REJECTED, f"postgres: {type(exc).__name__}: {exc}")
                )
        return errors


@click.command(name="postgres")
@click.option("--dsn", required=True, envvar="ETLROUTER_POSTGRES_DSN", help="postgresql://user@host:port/db")
@click.option("--table", required=True, help="Target table (NAME or SCHEMA.NAME).")
@click.option("--mode", type=click.Choice(["insert", "upsert"]), default="insert", show_default=True)
@click.option("--value-type", type=click.Choice(VALUE_TYPES), default="bytea", show_default=True)
@click.option("--batches-table", default="etlrouter_batches", show_default=True)
@click.option("--create-table/--no-create-table", default=False, help="Create the target table if missing.")
@click.option("--pool-size", type=click.IntRange(min=1), default=4, show_default=True)
@server_options
def cli(
    dsn: str,
    table: str,
    mode: str,
    value_type: str,
    batches_table: str,
    create_table: bool,
    pool_size: int,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Write records into a PostgreSQL table, idempotently by batch id."""
    try:
        service = PostgresSink(
            dsn,
            table,
            mode=mode,
            value_type=value_type,
            batches_table=batches_table,
            create_table=create_table,
            pool_size=pool_size,
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.postgres")


if __name__ == "__main__":
    main()
