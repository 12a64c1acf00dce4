"""`kafka-sink`: produces records to one Kafka topic (aiokafka producer, acks=all).

    python -m etlrouter.connectors.kafka_sink --port 50071 --bootstrap-servers 127.0.0.1:9092 \
        --topic orders-out [--no-idempotent] [--compression gzip] [--linger-ms 5]

Record mapping (the source's, reversed): Kafka key = record key (null when empty, so Kafka's partitioner
spreads keyless records), value = record value, headers = record headers (UTF-8), timestamp = event time
(the broker's time when 0). The partition is Kafka's default partitioner's choice (murmur2 of the key).

Delivery: a WriteBatch is answered only after the broker acknowledged every record of the batch with
acks=all (the in-sync replicas have it). The idempotent producer (default; needs a broker that answers
InitProducerId) removes duplicates from the producer's own internal retries; a WriteBatch the sidecar
retries (its answer lost, the sink restarted) is produced again: at-least-once, duplicates possible. A
record the broker refuses for good (too large, invalid) is REJECTED to the DLQ with Kafka's error; a
broker that is unreachable fails the call as retryable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import click
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors._kafka import (
    KafkaClientOptions,
    client_from_flags,
    client_options,
    headers_to_kafka,
)
from etlrouter.sdk import Capabilities, ErrorClass, Record, RecordError, RetryableError, Sink, Written

COMPRESSIONS = ("none", "gzip")


class KafkaSink(Sink):
    def __init__(
        self,
        client: KafkaClientOptions,
        topic: str,
        *,
        idempotent: bool = True,
        compression: str = "none",
        linger_ms: int = 5,
        max_request_size: int = 1024 * 1024,
        request_timeout_ms: int = 30_000,
    ) -> None:
        if not topic:
            raise ValueError("--topic must not be empty")
        if compression not in COMPRESSIONS:
            raise ValueError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
        self.client = client
        self.topic = topic
        self.producer_options: dict[str, Any] = {
            "acks": "all",
            "enable_idempotence": idempotent,
            "compression_type": None if compression == "none" else compression,
            "linger_ms": linger_ms,
            "max_request_size": max_request_size,
            "request_timeout_ms": request_timeout_ms,
        }
        self.capabilities = Capabilities(
            name="kafka-sink", version=VERSION, max_concurrency=4, labels={"topic": topic}
        )
        self.producer: AIOKafkaProducer | None = None

    async def open(self) -> None:
        producer = AIOKafkaProducer(**self.producer_options, **self.client.kwargs())
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise RetryableError(
                f"kafka: cannot start the producer against {self.client.bootstrap_servers}: {exc!r}"
                + (" (a broker without InitProducerId needs --no-idempotent)" if self._idempotent else "")
            ) from exc
        self.producer = producer

    @property
    def _idempotent(self) -> bool:
        return bool(self.producer_options["enable_idempotence"])

    async def close(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
            self.producer = None

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        producer = self.producer
        assert producer is not None
        sends: list[tuple[int, asyncio.Future[Any]]] = []
        errors: list[RecordError] = []
        for index, r in enumerate(records):
            try:
                future = await producer.send(
                    self.topic,
                    r.value,
                    key=r.key or None,
                    headers=headers_to_kafka(r.headers) if r.headers else None,
                    timestamp_ms=r.event_time_ms or None,
                )
            except KafkaError as exc:
                if exc.retriable:
                    raise RetryableError(f"kafka: {type(exc).__name__}: {exc}") from exc
                errors.append(RecordError(index, ErrorClass.REJECTED, f"kafka: {type(exc).__name__}: {exc}"))
                continue
            sends.append((index, future))
        results = await asyncio.gather(*(f for _, f in sends), return_exceptions=True)
        for (index, _), result in zip(sends, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, KafkaError) or result.retriable:
                    raise RetryableError(f"kafka: record {index} of the batch: {result!r}") from result
                errors.append(
                    RecordError(index, ErrorClass.REJECTED, f"kafka: {type(result).__name__}: {result}")
                )
        errors.sort(key=lambda e: e.index)
        return Written(len(records) - len(errors), errors)


@click.command(name="kafka-sink")
@client_options
@click.option("--topic", required=True, help="Topic to produce to.")
@click.option(
    "--idempotent/--no-idempotent",
    default=True,
    show_default=True,
    help="The idempotent producer (acks=all).",
)
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True)
@click.option("--linger-ms", type=click.IntRange(min=0), default=5, show_default=True)
@click.option("--max-request-size", type=click.IntRange(min=1024), default=1024 * 1024, show_default=True)
@click.option("--request-timeout-ms", type=click.IntRange(min=1000), default=30_000, show_default=True)
@server_options
def cli(
    topic: str,
    idempotent: bool,
    compression: str,
    linger_ms: int,
    max_request_size: int,
    request_timeout_ms: int,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
    **flags: Any,
) -> None:
    """Produce records to a Kafka topic; a batch is answered after the broker acknowledged it (acks=all)."""
    client = client_from_flags(flags)
    try:
        service = KafkaSink(
            client,
            topic,
            idempotent=idempotent,
            compression=compression,
            linger_ms=linger_ms,
            max_request_size=max_request_size,
            request_timeout_ms=request_timeout_ms,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.kafka_sink")


if __name__ == "__main__":
    main()
