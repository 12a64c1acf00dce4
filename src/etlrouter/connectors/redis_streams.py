"""`redis-streams` source: reads a Redis stream through a consumer group.

    python -m etlrouter.connectors.redis_streams --port 50068 --url redis://localhost:6379/0 \
        --stream orders --group etl [--consumer pod-1] [--key-field id] [--value-field payload]

Pulls are XREADGROUP (blocking up to wait_ms for new entries); acknowledgements are XACK of every entry of
this consumer's pending list up to the acknowledged offset (found with XPENDING), so an acknowledgement is
honoured even after a restart. Offsets: a stream id `MS-SEQ` becomes the offset `MS * 2^20 + SEQ`, which
increases strictly with the id and needs no state of its own (sequence numbers must stay below 2^20 per
millisecond, always true for ids Redis assigns at any realistic rate).

Redelivery: on start, and on a rewind (a new sidecar session), the source first re-reads this consumer's
pending entries (delivered before, never acknowledged) and only then new ones. With --redeliver-after-ms,
when acknowledgements make no progress for that long while entries are outstanding, it re-reads the
pending list again (covers a sidecar that vanished without a new session).

A record's value is the --value-field of the entry, or else all its fields as a JSON object of strings;
its key is the --key-field (or empty); its event time the entry id's milliseconds; header `redis.id`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

import click
import msgspec
import redis.asyncio as redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.sdk import Capabilities, PermanentError, Pulled, Record, RetryableError, Source
from etlrouter.sdk.records import encoded_size

SEQ_BITS = 20
SEQ_MASK = (1 << SEQ_BITS) - 1
ID_HEADER = "redis.id"


def id_to_offset(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    if int(seq) > SEQ_MASK:
        raise PermanentError(
            f"stream id {text} has a sequence number above {SEQ_MASK}: it cannot be an offset"
        )
    return (int(ms) << SEQ_BITS) | int(seq)


def offset_to_id(offset: int) -> str:
    return f"{offset >> SEQ_BITS}-{offset & SEQ_MASK}"


class RedisStreamsSource(Source):
    def __init__(
        self,
        url: str,
        stream: str,
        group: str,
        consumer: str | None = None,
        *,
        start_id: str = "0",
        key_field: str | None = None,
        value_field: str | None = None,
        redeliver_after_ms: int = 0,
    ) -> None:
        self.url = url
        self.stream = stream
        self.group = group
        self.consumer = consumer or socket.gethostname()
        self.start_id = start_id
        self.key_field = key_field.encode() if key_field else None
        self.value_field = value_field.encode() if value_field else None
        self.redeliver_after_s = redeliver_after_ms / 1000
        self.capabilities = Capabilities(
            name="redis-streams",
            version=VERSION,
            partitions=1,
            labels={"stream": stream, "group": group, "consumer": self.consumer},
        )
        self.client: Any = None
        self.pending_cursor: str | None = "0"  # re-reading our pending list from here; None = new entries
        self.buffer: list[Record] = []  # read but not yet handed out (over max_bytes)
        self.delivered = -1  # highest offset handed out
        self.acked = -1
        self.progress_at = 0.0
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        self.client = redis.Redis.from_url(self.url)
        try:
            await self.client.xgroup_create(self.stream, self.group, id=self.start_id, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self.progress_at = asyncio.get_running_loop().time()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    def _record(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Record:
        offset = id_to_offset(entry_id)
        if self.value_field is not None:
            value = fields.get(self.value_field, b"")
        else:
            text = {
                k.decode(errors="backslashreplace"): v.decode(errors="backslashreplace")
                for k, v in fields.items()
            }
            value = msgspec.json.encode(text)
        key = fields.get(self.key_field, b"") if self.key_field is not None else b""
        return Record(key, value, {ID_HEADER: entry_id.decode()}, offset >> SEQ_BITS, offset)

    async def _read(self, count: int, block_ms: int) -> list[Record]:
        cursor = self.pending_cursor
        response = await self.client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: cursor if cursor is not None else ">"},
            count=count,
            block=None if cursor is not None or block_ms <= 0 else block_ms,
        )
        entries = response[0][1] if response else []
        if cursor is not None:
            if not entries:
                self.pending_cursor = None  # the pending list is done: continue with new entries
                return []
            self.pending_cursor = entries[-1][0].decode()
        records: list[Record] = []
        deleted: list[bytes] = []
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending: nothing to deliver
                deleted.append(entry_id)
                continue
            records.append(self._record(entry_id, fields))
        if deleted:
            await self.client.xack(self.stream, self.group, *deleted)
        # Never hand out an offset twice in one run unless rewound (pending re-reads may overlap a buffer).
        return [r for r in records if r.offset > self.delivered]

    def _rewind_to_ack(self, now: float) -> None:
        """Re-read this consumer's pending list from just after the acknowledged entry."""
        self.pending_cursor = offset_to_id(self.acked) if self.acked >= 0 else "0"
        self.buffer.clear()
        self.delivered = self.acked
        self.progress_at = now

    def _rewind_if_stalled(self, now: float) -> None:
        if not self.redeliver_after_s or self.delivered <= self.acked:
            return
        if now - self.progress_at >= self.redeliver_after_s:
            self._rewind_to_ack(now)

    async def rewind(self) -> None:
        """A new sidecar session: deliver again every entry delivered and not acknowledged (the consumer's
        pending entries), then continue with new ones."""
        async with self._lock:
            self._rewind_to_ack(asyncio.get_running_loop().time())

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        if partitions and 0 not in partitions:
            return Pulled()
        loop = asyncio.get_running_loop()
        async with self._lock:
            self._rewind_if_stalled(loop.time())
            try:
                while not self.buffer:
                    rereading_pending = self.pending_cursor is not None
                    self.buffer = await self._read(max_records, wait_ms)
                    if not self.buffer and not rereading_pending:
                        break  # no new entries within wait_ms
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                raise RetryableError(f"redis: {exc}") from exc
            if not self.buffer:
                return Pulled()
            taken: list[Record] = []
            size = 0
            for record in self.buffer[:max_records]:
                size += encoded_size(record)
                if max_bytes and taken and size > max_bytes:
                    break
                taken.append(record)
            self.buffer = self.buffer[len(taken) :]
            if self.delivered <= self.acked:
                self.progress_at = loop.time()  # the redelivery clock starts with the first outstanding entry
            self.delivered = taken[-1].offset
            return Pulled(taken, 0)

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        if partition != 0:
            raise PermanentError(
                f"redis-streams has only partition 0, got an acknowledgement for {partition}"
            )
        if up_to_offset <= self.acked:
            return
        if self.buffer and up_to_offset >= self.buffer[0].offset:
            # Entries read from Redis but not handed out yet must not be acknowledged.
            raise PermanentError(
                f"acknowledgement up to offset {up_to_offset}, but offset {self.buffer[0].offset} "
                "was not delivered yet"
            )
        end_id = offset_to_id(up_to_offset)
        try:
            while True:
                pending = await self.client.xpending_range(
                    self.stream, self.group, min="-", max=end_id, count=1000, consumername=self.consumer
                )
                if not pending:
                    break
                await self.client.xack(self.stream, self.group, *[p["message_id"] for p in pending])
                if len(pending) < 1000:
                    break
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise RetryableError(f"redis: {exc}") from exc
        self.acked = up_to_offset
        self.progress_at = asyncio.get_running_loop().time()


@click.command(name="redis-streams")
@click.option("--url", required=True, envvar="ETLROUTER_REDIS_URL", help="redis://host:port/db")
@click.option("--stream", required=True, help="Stream key.")
@click.option("--group", required=True, help="Consumer group (created at the start id if missing).")
@click.option("--consumer", help="Consumer name in the group; default: the host name.")
@click.option("--start-id", default="0", show_default=True, help="Where a new group starts ('$' = new only).")
@click.option("--key-field", help="Entry field whose value is the record key.")
@click.option("--value-field", help="Entry field whose value is the record value (default: all as JSON).")
@click.option("--redeliver-after-ms", type=click.IntRange(min=0), default=0, show_default=True)
@server_options
def cli(
    url: str,
    stream: str,
    group: str,
    consumer: str | None,
    start_id: str,
    key_field: str | None,
    value_field: str | None,
    redeliver_after_ms: int,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Read a Redis stream through a consumer group."""
    service = RedisStreamsSource(
        url,
        stream,
        group,
        consumer,
        start_id=start_id,
        key_field=key_field,
        value_field=value_field,
        redeliver_after_ms=redeliver_after_ms,
    )
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.redis_streams")


if __name__ == "__main__":
    main()
