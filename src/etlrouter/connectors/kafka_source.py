"""`kafka-source`: reads one Kafka topic as a member of a consumer group (aiokafka).

    python -m etlrouter.connectors.kafka_source --port 50070 --bootstrap-servers 127.0.0.1:9092 \
        --topic orders --group etl [--start earliest|latest|committed]

Kafka partition N is source partition N, and a record's offset is its Kafka offset, so batch ids (which
name the source partition and offset range) are stable across restarts. Several replicas of the stage join
the same group and split the partitions between them; a replica joining or leaving triggers a rebalance.

Delivery: at-least-once. Offsets are committed to the group only from `Acknowledge` (the sidecar's ack
ledger, which releases a contiguous prefix per partition), as `up_to_offset + 1`, synchronously, before
the acknowledgement is answered; nothing is auto-committed. After a crash or kill -9 the group resumes at
the last committed offset, so every record not acknowledged is read again (duplicates possible, no loss).

Rebalance: when partitions are revoked, what was read but not handed out is dropped and acknowledgements
already received were committed; acknowledgements arriving later for a partition this member no longer
owns are abandoned (not committed: the new owner re-reads from the committed offset). A commit never moves
a partition's committed offset backwards, and never past an offset this process did not hand out.

Starting position, for a partition of the group without a committed offset: `earliest` (default),
`latest`, or `committed` (refuse to start such a partition: pulls fail with the partition named).

Record mapping: key = Kafka key (empty when null), value = Kafka value (empty when null), headers = Kafka
headers (values UTF-8, undecodable bytes as \\xNN; a repeated name keeps its last value), event time = the
Kafka timestamp (ms), offset = Kafka offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import click
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, NoOffsetForPartitionError

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors._kafka import (
    KafkaClientOptions,
    client_from_flags,
    client_options,
    headers_from_kafka,
)
from etlrouter.sdk import Capabilities, PermanentError, Pulled, Record, RetryableError, Source
from etlrouter.sdk.records import encoded_size

log = logging.getLogger(__name__)

STARTS = {"earliest": "earliest", "latest": "latest", "committed": "none"}


class _Owned:
    """What this member knows of a partition it is assigned (reset at every assignment)."""

    __slots__ = ("buffer", "committed", "first_delivered")

    def __init__(self, committed: int | None) -> None:
        self.buffer: deque[Record] = deque()  # read from Kafka, not yet handed out
        self.committed = committed  # the group's committed offset (next to read) as this member knows it
        self.first_delivered: int | None = None


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is unannotated
    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        self.source.revoked(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.source.assigned(assigned)


class KafkaSource(Source):
    def __init__(
        self,
        client: KafkaClientOptions,
        topic: str,
        group: str,
        *,
        start: str = "earliest",
        fetch_max_bytes: int = 16 * 1024 * 1024,
        max_partition_fetch_bytes: int = 1024 * 1024,
        session_timeout_ms: int = 10_000,
        isolation_level: str = "read_uncommitted",
    ) -> None:
        if start not in STARTS:
            raise ValueError(f"--start must be one of {', '.join(STARTS)}, got {start!r}")
        if not topic:
            raise ValueError("--topic must not be empty")
        if not group:
            raise ValueError("--group must not be empty (offsets are committed to a consumer group)")
        self.client = client
        self.topic = topic
        self.group = group
        self.start = start
        self.consumer_options: dict[str, Any] = {
            "fetch_max_bytes": fetch_max_bytes,
            "max_partition_fetch_bytes": max_partition_fetch_bytes,
            "session_timeout_ms": session_timeout_ms,
            "heartbeat_interval_ms": max(100, session_timeout_ms // 3),
            "isolation_level": isolation_level,
        }
        self.capabilities = Capabilities(
            name="kafka-source", version=VERSION, labels={"topic": topic, "group": group}
        )
        self.consumer: AIOKafkaConsumer | None = None
        self.owned: dict[int, _Owned] = {}
        # Highest offset ever handed out per partition by this process: an ack beyond it would commit records
        # nobody read. Kept across rebalances (an ack may arrive after the partition moved and came back).
        self.handed_out: dict[int, int] = {}
        self._next = 0  # round-robin start among partitions with buffered records
        self._commit_lock = asyncio.Lock()
        self._starting: asyncio.Future[None] | None = None

    async def open(self) -> None:
        self._start_consumer()

    def _start_consumer(self) -> None:
        consumer = AIOKafkaConsumer(
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset=STARTS[self.start],
            **self.consumer_options,
            **self.client.kwargs(),
        )
        consumer.subscribe([self.topic], listener=_Listener(self))
        self.consumer = consumer  # before start(): the first assignment may come while it runs
        # Joining the group can take seconds (the broker waits for other members): serve meanwhile, so the
        # sidecar discovers the service at once; pulls wait for the start (up to their wait_ms).
        self._starting = asyncio.ensure_future(consumer.start())

    async def _started(self, wait_ms: int) -> bool:
        starting = self._starting
        assert starting is not None
        if not starting.done():
            await asyncio.wait([starting], timeout=max(wait_ms, 0) / 1000)
            if not starting.done():
                return False
        exc = starting.exception()
        if exc is not None:
            # A consumer whose start failed is not reused: stop it and start a new one for the next pull.
            failed, self.consumer = self.consumer, None
            if failed is not None:
                with contextlib.suppress(Exception):
                    await failed.stop()
            self.owned.clear()
            self._start_consumer()
            raise RetryableError(
                f"kafka: cannot start the consumer ({self.client.bootstrap_servers}): {exc!r}"
            )
        return True

    async def close(self) -> None:
        if self._starting is not None:
            if not self._starting.done():
                self._starting.cancel()
            with contextlib.suppress(BaseException):  # also retrieves a failed start's exception
                await self._starting
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    def revoked(self, revoked: Sequence[TopicPartition]) -> None:
        for tp in revoked:
            if tp.topic == self.topic:
                self.owned.pop(tp.partition, None)  # buffered records go; acks arriving later are abandoned

    async def assigned(self, assigned: Sequence[TopicPartition]) -> None:
        assert self.consumer is not None
        for tp in assigned:
            if tp.topic != self.topic:
                continue
            try:
                committed = await self.consumer.committed(tp)
            except KafkaError as exc:
                log.warning("kafka: reading the committed offset of %s failed: %s", tp, exc)
                committed = None
            self.owned[tp.partition] = _Owned(committed)
        log.info("kafka: assigned partitions %s of %s", sorted(self.owned), self.topic)

    async def rewind(self) -> None:
        """A new sidecar session: read every owned partition again from its committed offset."""
        consumer = self.consumer
        assert consumer is not None
        for partition, state in list(self.owned.items()):
            state.buffer.clear()
            tp = TopicPartition(self.topic, partition)
            target = state.committed if state.committed is not None else state.first_delivered
            if target is None:
                continue  # nothing handed out since the assignment: the position is still the start
            try:
                consumer.seek(tp, target)
            except IllegalStateError:
                continue  # revoked meanwhile
            state.first_delivered = None

    def _take(self, partitions: Sequence[int], max_records: int, max_bytes: int) -> Pulled | None:
        candidates = [
            p for p in sorted(self.owned) if self.owned[p].buffer and (not partitions or p in partitions)
        ]
        if not candidates:
            return None
        partition = candidates[self._next % len(candidates)]
        self._next += 1
        state = self.owned[partition]
        taken: list[Record] = []
        size = 0
        while state.buffer and len(taken) < max_records:
            size += encoded_size(state.buffer[0])
            if max_bytes and taken and size > max_bytes:
                break
            taken.append(state.buffer.popleft())
        if state.first_delivered is None:
            state.first_delivered = taken[0].offset
        self.handed_out[partition] = max(self.handed_out.get(partition, -1), taken[-1].offset)
        return Pulled(taken, partition)

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        if not await self._started(wait_ms):
            return Pulled()
        consumer = self.consumer
        assert consumer is not None
        ready = self._take(partitions, max_records, max_bytes)
        if ready is not None:
            return ready
        wanted = [
            TopicPartition(self.topic, p) for p in sorted(self.owned) if not partitions or p in partitions
        ]
        if partitions and not wanted:
            return Pulled()
        try:
            fetched = await consumer.getmany(
                *wanted, timeout_ms=max(0, wait_ms), max_records=max(1, max_records)
            )
        except IllegalStateError:
            return Pulled()  # a partition asked for was revoked while we waited: the next pull asks anew
        except NoOffsetForPartitionError as exc:
            raise PermanentError(
                f"kafka: {exc}: group {self.group!r} has no committed offset there and --start is committed"
            ) from exc
        except KafkaError as exc:
            raise RetryableError(f"kafka: {type(exc).__name__}: {exc}") from exc
        for tp, messages in fetched.items():
            state = self.owned.get(tp.partition)
            if state is None or tp.topic != self.topic:
                continue  # revoked while the fetch was answered
            last = state.buffer[-1].offset if state.buffer else -1
            for m in messages:
                if m.offset <= last:
                    continue
                state.buffer.append(
                    Record(
                        m.key or b"",
                        m.value or b"",
                        headers_from_kafka(m.headers) if m.headers else {},
                        m.timestamp if m.timestamp and m.timestamp > 0 else 0,
                        m.offset,
                    )
                )
        return self._take(partitions, max_records, max_bytes) or Pulled()

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        consumer = self.consumer
        assert consumer is not None
        if up_to_offset > self.handed_out.get(partition, -1):
            raise PermanentError(
                f"acknowledgement of partition {partition} up to offset {up_to_offset}, but this source "
                f"handed out only up to {self.handed_out.get(partition, -1)}"
            )
        async with self._commit_lock:
            state = self.owned.get(partition)
            if state is None:
                log.info(
                    "kafka: ack of partition %d up to %d abandoned: the partition is no longer ours",
                    partition,
                    up_to_offset,
                )
                return
            offset = up_to_offset + 1
            if state.committed is not None and offset <= state.committed:
                return  # never move the committed offset backwards
            tp = TopicPartition(self.topic, partition)
            try:
                await consumer.commit({tp: offset})
            except (CommitFailedError, IllegalStateError) as exc:
                # The group rebalanced under us: the partition's new owner re-reads from the committed offset.
                log.info("kafka: commit of %s at %d abandoned (rebalance): %s", tp, offset, exc)
                return
            except KafkaError as exc:
                raise RetryableError(f"kafka: commit of {tp} at {offset} failed: {exc}") from exc
            if self.owned.get(partition) is state:
                state.committed = offset


@click.command(name="kafka-source")
@client_options
@click.option("--topic", required=True, help="Topic to read (its partitions are the source's partitions).")
@click.option("--group", required=True, help="Consumer group id; offsets are committed there.")
@click.option(
    "--start",
    type=click.Choice(list(STARTS)),
    default="earliest",
    show_default=True,
    help="Where a partition without a committed offset starts (committed = refuse).",
)
@click.option("--fetch-max-bytes", type=click.IntRange(min=1024), default=16 * 1024 * 1024, show_default=True)
@click.option(
    "--max-partition-fetch-bytes", type=click.IntRange(min=1024), default=1024 * 1024, show_default=True
)
@click.option("--session-timeout-ms", type=click.IntRange(min=1000), default=10_000, show_default=True)
@click.option(
    "--isolation-level",
    type=click.Choice(["read_uncommitted", "read_committed"]),
    default="read_uncommitted",
    show_default=True,
)
@server_options
def cli(
    topic: str,
    group: str,
    start: str,
    fetch_max_bytes: int,
    max_partition_fetch_bytes: int,
    session_timeout_ms: int,
    isolation_level: str,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
    **flags: Any,
) -> None:
    """Read a Kafka topic through a consumer group, committing only acknowledged offsets."""
    client = client_from_flags(flags)
    try:
        service = KafkaSource(
            client,
            topic,
            group,
            start=start,
            fetch_max_bytes=fetch_max_bytes,
            max_partition_fetch_bytes=max_partition_fetch_bytes,
            session_timeout_ms=session_timeout_ms,
            isolation_level=isolation_level,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.kafka_source")


if __name__ == "__main__":
    main()
