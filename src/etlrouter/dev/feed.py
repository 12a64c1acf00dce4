"""The feeder of `etlrouter dev --example seed`: orders produced into a Kafka topic at a steady rate.

    python -m etlrouter.dev.feed --bootstrap-servers 127.0.0.1:9092 --topic orders [--rate 200] [--limit N]

Order i is `{"id": i, "amount": ..., "country": ...}` with key `u{i % 97}`; every tenth has a negative
amount (the example's filter drops it). Runs until SIGTERM/SIGINT (or --limit orders), then flushes what
it produced and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time

import click
import msgspec

COUNTRIES = ("DE", "FR", "NL", "PL", "SE", "US")


def order(i: int) -> bytes:
    amount = -1.0 if i % 10 == 0 else (i * 7919 % 100_000) / 100
    return msgspec.json.encode({"id": i, "amount": amount, "country": COUNTRIES[i % len(COUNTRIES)]})


async def feed(bootstrap: str, topic: str, rate: float, limit: int) -> int:
    from aiokafka import AIOKafkaProducer

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    sent = 0
    started = time.monotonic()
    try:
        while not stop.is_set() and (not limit or sent < limit):
            if rate > 0:
                due = started + sent / rate
                delay = due - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=delay)
                    continue
            await producer.send(topic, order(sent), key=f"u{sent % 97}".encode())
            sent += 1
            if sent % 1000 == 0:
                print(f"produced {sent} orders into {topic}", flush=True)
    finally:
        await producer.stop()  # flushes what was sent
    print(f"produced {sent} orders into {topic}; stopped", flush=True)
    return 0


@click.command()
@click.option("--bootstrap-servers", required=True)
@click.option("--topic", default="orders", show_default=True)
@click.option("--rate", type=click.FloatRange(min=0), default=200.0, show_default=True, help="0: unlimited")
@click.option("--limit", type=click.IntRange(min=0), default=0, help="Stop after N orders (0: never).")
def main(bootstrap_servers: str, topic: str, rate: float, limit: int) -> None:
    sys.exit(asyncio.run(feed(bootstrap_servers, topic, rate, limit)))


if __name__ == "__main__":
    main()
