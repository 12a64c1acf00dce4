"""`nats-sink`: publishes records to a NATS JetStream subject, with a message id for de-duplication.

    python -m etlrouter.connectors.nats_sink --port 50075 --url nats://127.0.0.1:4222 \
        --subject orders.out [--stream ORDERS_OUT]

Each record is one message: data = value, headers = record headers plus the key under --key-header
(default `Etl-Key`, omitted when empty) and `Nats-Msg-Id: <batch id>#<index in batch>`. A WriteBatch is
answered once JetStream acknowledged every message (stored in the stream). A retried batch publishes the
same message ids, which the stream drops as duplicates within its duplicate window (`duplicate_window`,
2 minutes by default): effectively exactly-once for retries inside that window, at-least-once beyond it.
No stream for the subject, a wrong --stream, or no acknowledgement within --timeout-s fails the call as
retryable; a message over the server's max_payload is REJECTED to the DLQ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import click
import nats
from nats.errors import Error as NatsError
from nats.errors import MaxPayloadError

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.connectors._nats import KEY_HEADER, NatsOptions, nats_from_flags, nats_options
from etlrouter.sdk import Capabilities, ErrorClass, Record, RecordError, RetryableError, Sink, Written

MSG_ID_HEADER = "Nats-Msg-Id"


class NatsSink(Sink):
    def __init__(
        self,
        client: NatsOptions,
        subject: str,
        *,
        stream: str | None = None,
        key_header: str = KEY_HEADER,
        timeout_s: float = 10.0,
    ) -> None:
        if not subject:
            raise ValueError("--subject must not be empty")
        self.client = client
        self.subject = subject
        self.stream = stream
        self.key_header = key_header
        self.timeout_s = timeout_s
        self.capabilities = Capabilities(
            name="nats-sink",
            version=VERSION,
            idempotent_writes=True,
            max_concurrency=4,
            labels={"subject": subject},
        )
        self.nc: Any = None
        self.js: Any = None

    async def open(self) -> None:
        try:
            self.nc = await nats.connect(**self.client.kwargs())
        except (NatsError, OSError) as exc:
            raise RetryableError(f"nats: cannot connect to {self.client.servers}: {exc!r}") from exc
        self.js = self.nc.jetstream(publish_async_max_pending=8000)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()
            self.nc = None

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        futures: list[asyncio.Future[Any]] = []
        errors: list[RecordError] = []
        try:
            for index, r in enumerate(records):
                headers = dict(r.headers)
                if r.key:
                    headers[self.key_header] = r.key.decode("utf-8", "backslashreplace")
                if batch_id:
                    headers[MSG_ID_HEADER] = f"{batch_id}#{index}"
                try:
                    future = await self.js.publish_async(
                        self.subject, r.value, stream=self.stream, headers=headers, wait_stall=self.timeout_s
                    )
                except MaxPayloadError as exc:
                    errors.append(RecordError(index, ErrorClass.REJECTED, f"nats: {exc!r}"))
                    continue
                futures.append(future)
            await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s)
        except (NatsError, OSError, TimeoutError) as exc:
            for future in futures:
                future.cancel()
            raise RetryableError(f"nats: publishing to {self.subject}: {exc!r}") from exc
        return Written(len(records) - len(errors), errors)


@click.command(name="nats-sink")
@nats_options
@click.option("--subject", required=True, help="Subject to publish to (a stream must capture it).")
@click.option("--stream", help="Expected stream: refuse to publish into any other.")
@click.option("--timeout-s", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@server_options
def cli(
    subject: str,
    stream: str | None,
    timeout_s: float,
    key_header: str,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
    **flags: Any,
) -> None:
    """Publish records to NATS JetStream with a message id per record (de-duplicated retries)."""
    client = nats_from_flags(flags)
    try:
        service = NatsSink(client, subject, stream=stream, key_header=key_header, timeout_s=timeout_s)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.nats_sink")


if __name__ == "__main__":
    main()
