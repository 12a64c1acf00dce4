"""`nats-source`: reads a NATS JetStream stream through a durable pull consumer (nats-py).

    python -m etlrouter.connectors.nats_source --port 50074 --url nats://127.0.0.1:4222 \
        --stream ORDERS --durable etl [--subject 'orders.>'] [--ack-wait-s 60]

One source partition (0); a record's offset is the message's stream sequence, so batch ids are stable
across restarts. The consumer uses AckPolicy `all`: one acknowledgement acks every message up to it.

Delivery: at-least-once. `Acknowledge(up_to)` acks (synchronously, the server confirms) the last message
handed out at or below `up_to`, which acks everything before it; nothing is acked otherwise. On start and on
a rewind (a new sidecar session) the source reads the consumer's ack floor and re-creates the durable
consumer to start just after it, so everything not acknowledged is delivered again, in stream order (a
consumer whose ack_wait expired would otherwise redeliver out of order, while sequences must increase). A
kill -9 between the delete and the create leaves no consumer: the next start delivers the stream from its
beginning (duplicates, no loss). Because of that re-creation, run one replica per durable; messages the
server redelivers on its own (ack_wait expired while in flight) are recognised by their sequence and not
handed out twice.

Record mapping: key = the --key-header header (default `Etl-Key`, as the nats-sink writes it), value = the
message data, headers = the message headers plus `nats.subject`, event time = the time JetStream stored the
message (ms).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

import click
import nats
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors._nats import KEY_HEADER, NatsOptions, nats_from_flags, nats_options
from etlrouter.sdk import Capabilities, PermanentError, Pulled, Record, RetryableError, Source
from etlrouter.sdk.records import encoded_size

log = logging.getLogger(__name__)
SUBJECT_HEADER = "nats.subject"


class NatsSource(Source):
    def __init__(
        self,
        client: NatsOptions,
        stream: str,
        durable: str,
        *,
        subject: str | None = None,
        key_header: str = KEY_HEADER,
        ack_wait_s: float = 60.0,
        max_ack_pending: int = 20_000,
    ) -> None:
        if not stream or not durable:
            raise ValueError("--stream and --durable must not be empty")
        self.client = client
        self.stream = stream
        self.durable = durable
        self.subject = subject
        self.key_header = key_header
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self.capabilities = Capabilities(
            name="nats-source", version=VERSION, partitions=1, labels={"stream": stream, "durable": durable}
        )
        self.nc: Any = None
        self.js: Any = None
        self.sub: Any = None
        self.buffer: deque[tuple[Record, Any]] = deque()  # fetched, not handed out
        self.held: OrderedDict[int, Any] = OrderedDict()  # handed out, not acked: offset -> message
        self.delivered = 0  # highest stream sequence handed out (or acked)
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        try:
            self.nc = await nats.connect(**self.client.kwargs())
        except (NatsError, OSError) as exc:
            raise RetryableError(f"nats: cannot connect to {self.client.servers}: {exc!r}") from exc
        self.js = self.nc.jetstream()
        await self._restart_consumer()

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()
            self.nc = None

    async def _restart_consumer(self) -> None:
        """Re-create the durable consumer after its ack floor: what was not acked comes again, in order."""
        floor = 0
        try:
            info = await self.js.consumer_info(self.stream, self.durable)
            floor = info.ack_floor.stream_seq if info.ack_floor else 0
            await self.js.delete_consumer(self.stream, self.durable)
        except NotFoundError:
            pass
        except (NatsError, OSError) as exc:
            raise RetryableError(f"nats: reading consumer {self.durable} of {self.stream}: {exc!r}") from exc
        config = ConsumerConfig(
            durable_name=self.durable,
            ack_policy=AckPolicy.ALL,
            ack_wait=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.subject,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if floor else DeliverPolicy.ALL,
            opt_start_seq=floor + 1 if floor else None,
        )
        try:
            await self.js.add_consumer(self.stream, config)
            if self.sub is not None:
                await self.sub.unsubscribe()
            self.sub = await self.js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
        except (NatsError, OSError) as exc:
            raise RetryableError(f"nats: creating consumer {self.durable} of {self.stream}: {exc!r}") from exc
        self.buffer.clear()
        self.held.clear()
        self.delivered = floor
        log.info("nats: consumer %s of %s starts after sequence %d", self.durable, self.stream, floor)

    async def rewind(self) -> None:
        async with self._lock:
            await self._restart_consumer()

    def _record(self, msg: Any) -> Record:
        meta = msg.metadata
        headers = dict(msg.headers) if msg.headers else {}
        key = headers.pop(self.key_header, "")
        headers[SUBJECT_HEADER] = msg.subject
        event_time = int(meta.timestamp.timestamp() * 1000) if meta.timestamp else 0
        return Record(key.encode(), msg.data or b"", headers, event_time, meta.sequence.stream)

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        if partitions and 0 not in partitions:
            return Pulled()
        async with self._lock:
            if not self.buffer:
                try:
                    fetched = await self.sub.fetch(batch=max(1, max_records), timeout=max(wait_ms, 50) / 1000)
                except NatsTimeoutError:
                    return Pulled()
                except (NatsError, OSError) as exc:
                    raise RetryableError(f"nats: fetch from {self.durable}: {exc!r}") from exc
                last = self.buffer[-1][0].offset if self.buffer else self.delivered
                for msg in fetched:
                    record = self._record(msg)
                    if record.offset <= last:
                        continue  # redelivered by the server while still ours: handed out already
                    self.buffer.append((record, msg))
                    last = record.offset
            taken: list[Record] = []
            size = 0
            while self.buffer and len(taken) < max_records:
                size += encoded_size(self.buffer[0][0])
                if max_bytes and taken and size > max_bytes:
                    break
                record, msg = self.buffer.popleft()
                taken.append(record)
                self.held[record.offset] = msg
            if not taken:
                return Pulled()
            self.delivered = taken[-1].offset
            return Pulled(taken, 0)

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        if partition != 0:
            raise PermanentError(f"nats-source has only partition 0, got an acknowledgement for {partition}")
        if up_to_offset > self.delivered:
            raise PermanentError(
                f"acknowledgement up to sequence {up_to_offset}, "
                f"but only up to {self.delivered} was handed out"
            )
        last = None
        for offset in self.held:
            if offset > up_to_offset:
                break
            last = offset
        if last is None:
            return  # acknowledged already (or handed out before a rewind)
        try:
            await self.held[last].ack_sync(timeout=5)
        except (NatsError, OSError) as exc:
            raise RetryableError(f"nats: ack of sequence {last}: {exc!r}") from exc
        while self.held and next(iter(self.held)) <= last:
            self.held.popitem(last=False)


@click.command(name="nats-source")
@nats_options
@click.option("--stream", required=True, help="JetStream stream name.")
@click.option("--durable", required=True, help="Durable consumer name (one replica per durable).")
@click.option("--subject", help="Filter subject within the stream (default: all).")
@click.option("--ack-wait-s", type=click.FloatRange(min=1), default=60.0, show_default=True)
@click.option("--max-ack-pending", type=click.IntRange(min=1), default=20_000, show_default=True)
@server_options
def cli(
    stream: str,
    durable: str,
    subject: str | None,
    ack_wait_s: float,
    max_ack_pending: int,
    key_header: str,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
    **flags: Any,
) -> None:
    """Read a JetStream stream through a durable pull consumer, acking only acknowledged records."""
    client = nats_from_flags(flags)
    try:
        service = NatsSource(
            client,
            stream,
            durable,
            subject=subject,
            key_header=key_header,
            ack_wait_s=ack_wait_s,
            max_ack_pending=max_ack_pending,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.nats_source")


if __name__ == "__main__":
    main()
