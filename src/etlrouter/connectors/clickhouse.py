"""`clickhouse` sink: batched `INSERT INTO table FORMAT JSONEachRow` over ClickHouse's HTTP interface.

    python -m etlrouter.connectors.clickhouse --port 50072 --url http://127.0.0.1:8123 --table events \
        [--database default] [--batch-id-column _batch_id] [--offset-column _offset] [--key-column _key] \
        [--event-time-column _event_time_ms]

Column mapping: a record's value must be a JSON object; its fields are the row's columns (by name). The
optional metadata columns are added to every row: the record key (UTF-8 text), source offset, event time
(ms) and the sink batch id. A value that is not a JSON object is REJECTED without asking the server.

One WriteBatch is one INSERT (one block: ClickHouse inserts it into a MergeTree table atomically). When the
server refuses it for its data (a field that does not parse as the column's type, an unknown field, ...),
the sink finds the refused rows by inserting halves of the batch into a `Null`-engine copy of the table
(`<table>__etlrouter_probe`, created on start; nothing is stored there), reports each refused row as
REJECTED with the server's message (to the DLQ), and inserts the rest in one INSERT.

Retries without duplicates: with --batch-id-column the sink first asks whether rows of that batch id are
already in the table (the first attempt's INSERT was atomic, so present means complete) and then writes
nothing again; ClickHouse 18.16 has neither `insert_deduplication_token` nor deduplication for
non-replicated tables, so this check is what makes the sink idempotent there (a concurrent retry of a batch
whose first attempt is still running is not covered). Without that column a retried batch is inserted
again (at-least-once). Connection failures and server errors that are not about the data (a missing table,
memory limits, too many parts) fail the call as retryable, with the server's message.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import click
import msgspec

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.sdk import Capabilities, ErrorClass, Record, RecordError, RetryableError, Sink, Written

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE = re.compile(r"Code: (\d+)")
MAX_ERROR_BYTES = 16 * 1024  # a server error message is read up to this size
# ClickHouse error codes caused by the data of some row (parsing, types, unknown fields, NULLs).
DATA_ERROR_CODES = frozenset({6, 25, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 130, 349, 386})

_decode_object = msgspec.json.Decoder(dict[str, Any])
_encode = msgspec.json.Encoder()


class ClickHouseError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        match = _CODE.search(message)
        self.code = int(match.group(1)) if match else None

    @property
    def about_data(self) -> bool:
        return self.code in DATA_ERROR_CODES


def identifier(name: str, option: str) -> str:
    if not _IDENTIFIER.match(name):
        raise ValueError(f"{option} {name!r} must be a name of letters, digits and '_'")
    return f"`{name}`"


def quote_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


class ClickHouseSink(Sink):
    def __init__(
        self,
        url: str,
        table: str,
        *,
        database: str = "default",
        user: str | None = None,
        password: str | None = None,
        batch_id_column: str | None = None,
        offset_column: str | None = None,
        key_column: str | None = None,
        event_time_column: str | None = None,
        skip_unknown_fields: bool = False,
        timeout_s: float = 30.0,
        concurrency: int = 2,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--url must be an http:// or https:// URL of the HTTP interface, got {url!r}")
        self.url = url.rstrip("/") + "/"
        self.table = f"{identifier(database, '--database')}.{identifier(table, '--table')}"
        self.probe_table = (
            f"{identifier(database, '--database')}.{identifier(table + '__etlrouter_probe', '--table')}"
        )
        self.columns: list[tuple[str, str]] = []  # (attribute of the record, column)
        for attribute, column, option in (
            ("batch_id", batch_id_column, "--batch-id-column"),
            ("offset", offset_column, "--offset-column"),
            ("key", key_column, "--key-column"),
            ("event_time_ms", event_time_column, "--event-time-column"),
        ):
            if column:
                identifier(column, option)
                self.columns.append((attribute, column))
        self.batch_id_column = batch_id_column
        self.auth = aiohttp.BasicAuth(user, password or "") if user else None
        self.settings = {"input_format_skip_unknown_fields": "1" if skip_unknown_fields else "0"}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.capabilities = Capabilities(
            name="clickhouse",
            version=VERSION,
            idempotent_writes=bool(batch_id_column),
            max_concurrency=concurrency,
            labels={"table": f"{database}.{table}"},
        )
        self.session: aiohttp.ClientSession | None = None
        self.probe_ready = False

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(auth=self.auth, timeout=self.timeout)

    async def _ensure_probe_table(self) -> None:
        # Made on first use, not in open(): a server that is down at start only delays writes.
        if self.probe_ready:
            return
        query = f"CREATE TABLE IF NOT EXISTS {self.probe_table} AS {self.table} ENGINE = Null"
        try:
            await self._query(query)
        except ClickHouseError as exc:
            raise RetryableError(
                f"clickhouse: cannot create the probe table {self.probe_table}: {exc}"
            ) from exc
        self.probe_ready = True

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def _query(self, query: str, body: bytes | None = None, settings: Mapping[str, str] = {}) -> bytes:
        """Run a query (with `body` as its data); raises ClickHouseError with the server's message, or
        RetryableError when the server cannot be reached."""
        assert self.session is not None
        params = {"query": query, **settings}
        try:
            async with self.session.post(
                self.url, params=params, data=body if body is not None else b""
            ) as r:
                if r.status == 200:
                    return await r.content.read(1024 * 1024)  # answers we read are small (a count)
                text = (await r.content.read(MAX_ERROR_BYTES)).decode("utf-8", "replace").strip()
                raise ClickHouseError(r.status, text)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise RetryableError(f"clickhouse: {self.url}: {type(exc).__name__}: {exc}") from exc

    def _row(self, record: Record, batch_id: str) -> bytes:
        row = _decode_object.decode(record.value)  # ValidationError/DecodeError: not a JSON object
        for attribute, column in self.columns:
            if attribute == "batch_id":
                row[column] = batch_id
            elif attribute == "key":
                row[column] = record.key.decode("utf-8", "backslashreplace")
            else:
                row[column] = getattr(record, attribute)
        return _encode.encode(row) + b"\n"

    async def _insert(self, table: str, rows: Sequence[bytes]) -> None:
        await self._query(f"INSERT INTO {table} FORMAT JSONEachRow", b"".join(rows), self.settings)

    async def _refused(
        self, rows: list[tuple[int, bytes]], error: ClickHouseError | None
    ) -> list[RecordError]:
        """The rows among `rows` the server refuses for their data (probed against the Null table), each with
        the server's message; `error` is what the whole of `rows` got, when known."""
        await self._ensure_probe_table()
        if error is None:
            try:
                await self._insert(self.probe_table, [line for _, line in rows])
                return []
            except ClickHouseError as exc:
                if not exc.about_data:
                    raise RetryableError(f"clickhouse: {exc}") from exc
                error = exc
        if len(rows) == 1:
            return [RecordError(rows[0][0], ErrorClass.REJECTED, f"clickhouse: {error}")]
        middle = len(rows) // 2
        return await self._refused(rows[:middle], None) + await self._refused(rows[middle:], None)

    async def _already_written(self, batch_id: str) -> bool:
        assert self.batch_id_column is not None
        query = f"SELECT count() FROM {self.table} WHERE `{self.batch_id_column}` = {quote_string(batch_id)}"
        try:
            return int(await self._query(query)) > 0
        except ClickHouseError as exc:
            raise RetryableError(f"clickhouse: checking batch {batch_id!r}: {exc}") from exc

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        rows: list[tuple[int, bytes]] = []
        errors: list[RecordError] = []
        for index, record in enumerate(records):
            try:
                rows.append((index, self._row(record, batch_id)))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                errors.append(RecordError(index, ErrorClass.REJECTED, f"value is not a JSON object: {exc}"))
        if self.batch_id_column and batch_id and rows and await self._already_written(batch_id):
            # Written by an earlier attempt; find its refused rows again so they still reach the DLQ.
            errors += await self._refused(rows, None)
            errors.sort(key=lambda e: e.index)
            return Written(len(records) - len(errors), errors)
        if rows:
            try:
                await self._insert(self.table, [line for _, line in rows])
            except ClickHouseError as exc:
                if not exc.about_data:
                    raise RetryableError(f"clickhouse: {exc}") from exc
                refused = await self._refused(rows, exc)
                bad = {e.index for e in refused}
                good = [line for index, line in rows if index not in bad]
                if good:
                    try:
                        await self._insert(self.table, good)
                    except ClickHouseError as again:
                        raise RetryableError(f"clickhouse: inserting the accepted rows: {again}") from again
                errors += refused
        errors.sort(key=lambda e: e.index)
        return Written(len(records) - len(errors), errors)


@click.command(name="clickhouse")
@click.option(
    "--url", required=True, envvar="ETLROUTER_CLICKHOUSE_URL", help="HTTP interface, http://host:8123"
)
@click.option("--database", default="default", show_default=True)
@click.option("--table", required=True, help="Target table (must exist).")
@click.option("--user", envvar="ETLROUTER_CLICKHOUSE_USER")
@click.option("--password", envvar="ETLROUTER_CLICKHOUSE_PASSWORD", help="Prefer the env var.")
@click.option("--batch-id-column", help="String column for the sink batch id: makes retries idempotent.")
@click.option("--offset-column", help="UInt64 column for the source offset.")
@click.option("--key-column", help="String column for the record key.")
@click.option("--event-time-column", help="Int64/UInt64 column for the event time in ms.")
@click.option("--skip-unknown-fields/--no-skip-unknown-fields", default=False, show_default=True)
@click.option("--timeout-s", type=click.FloatRange(min=0.1), default=30.0, show_default=True)
@click.option("--concurrency", type=click.IntRange(min=1), default=2, show_default=True)
@server_options
def cli(
    url: str,
    database: str,
    table: str,
    user: str | None,
    password: str | None,
    batch_id_column: str | None,
    offset_column: str | None,
    key_column: str | None,
    event_time_column: str | None,
    skip_unknown_fields: bool,
    timeout_s: float,
    concurrency: int,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Insert records (JSON objects) into a ClickHouse table over HTTP."""
    try:
        service = ClickHouseSink(
            url,
            table,
            database=database,
            user=user,
            password=password,
            batch_id_column=batch_id_column,
            offset_column=offset_column,
            key_column=key_column,
            event_time_column=event_time_column,
            skip_unknown_fields=skip_unknown_fields,
            timeout_s=timeout_s,
            concurrency=concurrency,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.clickhouse")


if __name__ == "__main__":
    main()
