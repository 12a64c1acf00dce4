"""`generator` source: deterministic synthetic records for demos, tests and benchmarks.

    python -m etlrouter.connectors.generator --port 50060 --seed 7 --partitions 2 --limit 10000 --rate 500

Record n of partition p (offset n, from 0) is a pure function of (seed, p, n): the same seed gives the same
records, in any order of pulls. Its value is a JSON object {"id", "partition", "amount", "country", "pad"}
padded to --record-size bytes, its key `key-NNNNNNNN` from a space of --key-space keys, its event time
start + global_sequence * step minus a pseudo-random skew of up to --event-time-skew-ms.

Redelivery: because records are recomputable, the generator only keeps per partition the next offset to
hand out and the acknowledged low-water mark. With --state-file the acknowledged offsets survive a restart
and the generator resumes after the last ack (everything delivered but not acknowledged is delivered
again). With --redeliver-after-ms, a partition whose acknowledgements make no progress for that long is
rewound to its first unacknowledged offset (like a visibility timeout), which covers a sidecar restart.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Sequence
from hashlib import blake2b
from pathlib import Path

import click
import msgspec

from etlrouter.connectors._common import VERSION, invoke, serve_service, server_options
from etlrouter.sdk import Capabilities, PermanentError, Pulled, Record, Source
from etlrouter.sdk.records import encoded_size

COUNTRIES = ("DE", "FR", "US", "JP", "BR", "IN", "GB", "ES")
_PAD_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_PAD_FRAME = len(',"pad":""}')
_CENTS = tuple(repr(c / 100)[1:] for c in range(100))  # ".0", ".01", ... ".1", ... ".99"


class GeneratorConfig(msgspec.Struct, frozen=True, kw_only=True):
    seed: int = 0
    rate: float = 0.0  # records per second over all partitions; 0 = as fast as pulled
    record_size: int = 200  # bytes of each value (at least the JSON fields need)
    key_space: int = 1000
    partitions: int = 1
    limit: int = 0  # total records over all partitions; 0 = unbounded
    event_time_start_ms: int = 1_700_000_000_000
    event_time_step_ms: int = 1
    event_time_skew_ms: int = 0
    redeliver_after_ms: int = 0  # 0 = never rewind on its own

    def __post_init__(self) -> None:
        for name in (
            "record_size",
            "limit",
            "event_time_skew_ms",
            "redeliver_after_ms",
            "event_time_step_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.rate < 0:
            raise ValueError(f"rate must not be negative, got {self.rate}")
        if self.key_space < 1:
            raise ValueError(f"key_space must be at least 1, got {self.key_space}")
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {self.partitions}")


def make_record(config: GeneratorConfig, partition: int, offset: int) -> Record:
    """Record `offset` of `partition`: a pure function of the configuration."""
    digest = blake2b(b"%d:%d:%d" % (config.seed, partition, offset), digest_size=16).digest()
    h = int.from_bytes(digest, "little")
    sequence = offset * config.partitions + partition
    skew = (h >> 64) % (config.event_time_skew_ms + 1) if config.event_time_skew_ms else 0
    event_time = config.event_time_start_ms + sequence * config.event_time_step_ms - skew
    cents = (h >> 16) % 100_000
    country = COUNTRIES[(h >> 40) % len(COUNTRIES)]
    # The amount as Python prints cents / 100 (123.45, 5.0, 7.1), without formatting a float.
    amount = f"{cents // 100}{_CENTS[cents % 100]}"
    head = f'{{"id":{sequence},"partition":{partition},"amount":{amount},"country":"{country}"'
    pad_len = config.record_size - len(head) - _PAD_FRAME
    if pad_len > 0:
        value = f'{head},"pad":"{_pads(config.record_size)[h % len(_PAD_ALPHABET)][:pad_len]}"}}'
    else:
        value = head + "}"
    key = b"key-%08d" % (h % config.key_space)
    return Record(key, value.encode(), {"content-type": "application/json"}, event_time, offset)


@functools.lru_cache(maxsize=8)
def _pads(record_size: int) -> tuple[str, ...]:
    """The pad alphabet rotated to each start, repeated to at least `record_size` characters."""
    count = record_size // len(_PAD_ALPHABET) + 2
    return tuple((_PAD_ALPHABET[s:] + _PAD_ALPHABET[:s]) * count for s in range(len(_PAD_ALPHABET)))


class GeneratorCore:
    """The generator's state and decisions, with time passed in (no I/O, no clock): easy to test."""

    def __init__(
        self, config: GeneratorConfig, *, acked: dict[int, int] | None = None, now: float = 0.0
    ) -> None:
        self.config = config
        # acked[p] = highest acknowledged offset, -1 when none; next_offset[p] = next offset to hand out.
        self.acked = {p: -1 for p in range(config.partitions)}
        for partition, offset in (acked or {}).items():
            if partition in self.acked:
                self.acked[partition] = offset
        self.next_offset = {p: self.acked[p] + 1 for p in self.acked}
        self.high_water = dict(self.next_offset)  # one past the highest offset ever handed out
        self.progress_at = dict.fromkeys(self.acked, now)  # last ack progress (or first delivery)
        self.tokens = 0.0
        self.tokens_at = now
        self._cursor = 0

    def partition_size(self, partition: int) -> int | None:
        """How many records the partition has in total (None = unbounded)."""
        limit, parts = self.config.limit, self.config.partitions
        if not limit:
            return None
        return limit // parts + (1 if partition < limit % parts else 0)

    def _available(self, partition: int) -> bool:
        size = self.partition_size(partition)
        return size is None or self.next_offset[partition] < size

    def exhausted(self, partitions: Sequence[int]) -> bool:
        return not any(self._available(p) for p in partitions)

    def owned(self, requested: Sequence[int]) -> list[int]:
        if not requested:
            return list(range(self.config.partitions))
        return [p for p in requested if p in self.acked]

    def _refill(self, now: float) -> None:
        rate = self.config.rate
        # At most one second of burst after an idle period.
        self.tokens = min(max(rate, 1.0), self.tokens + (now - self.tokens_at) * rate)
        self.tokens_at = now

    def seconds_until_token(self, now: float) -> float:
        if not self.config.rate:
            return 0.0
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.config.rate

    def rewind_stalled(self, now: float) -> None:
        """Rewind partitions whose delivered records have not been acknowledged for redeliver_after_ms."""
        timeout = self.config.redeliver_after_ms / 1000
        if not timeout:
            return
        for p, acked in self.acked.items():
            if self.next_offset[p] > acked + 1 and now - self.progress_at[p] >= timeout:
                self.next_offset[p] = acked + 1
                self.progress_at[p] = now

    def rewind_all(self, now: float) -> None:
        """Hand out again everything after the last acknowledged offset (the puller restarted)."""
        for p, acked in self.acked.items():
            self.next_offset[p] = acked + 1
            self.progress_at[p] = now

    def take(
        self, partitions: Sequence[int], max_records: int, max_bytes: int, now: float
    ) -> tuple[int, list[Record]]:
        """The next records of one owned partition (round robin), within the limits and the rate."""
        self.rewind_stalled(now)
        owned = self.owned(partitions)
        if not owned:
            return 0, []
        budget = max_records
        if self.config.rate:
            self._refill(now)
            budget = min(budget, int(self.tokens))
        for i in range(len(owned)):
            partition = owned[(self._cursor + i) % len(owned)]
            if not self._available(partition):
                continue
            self._cursor = (self._cursor + i + 1) % len(owned)
            size = self.partition_size(partition)
            start = self.next_offset[partition]
            end = start + budget if size is None else min(size, start + budget)
            records: list[Record] = []
            total = 0
            for offset in range(start, end):
                record = make_record(self.config, partition, offset)
                if max_bytes:
                    total += encoded_size(record)
                    if records and total > max_bytes:
                        break
                records.append(record)
            if records:
                if self.next_offset[partition] == self.acked[partition] + 1:
                    self.progress_at[partition] = now  # the redelivery clock starts with the first delivery
                self.next_offset[partition] = start + len(records)
                self.high_water[partition] = max(self.high_water[partition], start + len(records))
                self.tokens -= len(records) if self.config.rate else 0
            return partition, records
        return 0, []

    def acknowledge(self, partition: int, up_to_offset: int, now: float) -> bool:
        """Record an acknowledgement; True if the low-water mark moved."""
        if partition not in self.acked:
            raise PermanentError(
                f"partition {partition} does not exist (the generator has {len(self.acked)})"
            )
        if up_to_offset >= self.high_water[partition]:
            raise PermanentError(
                f"acknowledgement up to offset {up_to_offset} of partition {partition}, "
                f"but only offsets below {self.high_water[partition]} were delivered"
            )
        if up_to_offset <= self.acked[partition]:
            return False
        self.acked[partition] = up_to_offset
        # A late acknowledgement after a rewind: do not hand out again what it covers.
        self.next_offset[partition] = max(self.next_offset[partition], up_to_offset + 1)
        self.progress_at[partition] = now
        return True


def load_state(path: Path) -> dict[int, int]:
    if not path.exists():
        return {}
    try:
        raw = msgspec.json.decode(path.read_bytes(), type=dict[str, int])
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: not a generator state file: {exc}") from None
    return {int(p): offset for p, offset in raw.items()}


def save_state(path: Path, acked: dict[int, int]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(msgspec.json.encode({str(p): o for p, o in acked.items() if o >= 0}))
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class GeneratorSource(Source):
    def __init__(self, config: GeneratorConfig, *, state_file: str | Path | None = None) -> None:
        self.config = config
        self.state_file = Path(state_file) if state_file is not None else None
        self.capabilities = Capabilities(
            name="generator",
            version=VERSION,
            partitions=config.partitions,
            labels={"format": "json", "seed": str(config.seed)},
        )
        self.core = GeneratorCore(config)
        self._lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        acked = load_state(self.state_file) if self.state_file is not None else {}
        self.core = GeneratorCore(self.config, acked=acked, now=loop.time())

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        async with self._lock:
            while True:
                now = loop.time()
                owned = self.core.owned(partitions)
                if owned and self.core.exhausted(owned):
                    self.core.rewind_stalled(now)
                    if self.core.exhausted(owned):
                        return Pulled(end_of_stream=True)
                partition, records = self.core.take(partitions, max_records, max_bytes, now)
                if records:
                    return Pulled(records, partition)
                delay = min(self.core.seconds_until_token(now) or 0.01, deadline - now)
                if delay <= 0 or not owned:
                    return Pulled()
                await asyncio.sleep(delay)

    async def rewind(self) -> None:
        async with self._lock:
            self.core.rewind_all(asyncio.get_running_loop().time())

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        moved = self.core.acknowledge(partition, up_to_offset, asyncio.get_running_loop().time())
        if moved and self.state_file is not None:
            async with self._save_lock:  # concurrent saves would race on the temporary file
                await asyncio.to_thread(save_state, self.state_file, dict(self.core.acked))


@click.command(name="generator")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--rate", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Records/s; 0 = unlimited."
)
@click.option(
    "--record-size", type=click.IntRange(min=0), default=200, show_default=True, help="Value bytes."
)
@click.option("--key-space", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--partitions", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--limit", type=click.IntRange(min=0), default=0, show_default=True, help="Total records; 0 = endless."
)
@click.option("--event-time-start-ms", type=int, default=1_700_000_000_000, show_default=True)
@click.option("--event-time-step-ms", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--event-time-skew-ms", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--redeliver-after-ms", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--state-file", type=click.Path(dir_okay=False), help="Persist acknowledged offsets here.")
@server_options
def cli(
    seed: int,
    rate: float,
    record_size: int,
    key_space: int,
    partitions: int,
    limit: int,
    event_time_start_ms: int,
    event_time_step_ms: int,
    event_time_skew_ms: int,
    redeliver_after_ms: int,
    state_file: str | None,
    host: str,
    port: int,
    log_level: str,
    log_format: str,
) -> None:
    """Generate deterministic JSON records."""
    config = GeneratorConfig(
        seed=seed,
        rate=rate,
        record_size=record_size,
        key_space=key_space,
        partitions=partitions,
        limit=limit,
        event_time_start_ms=event_time_start_ms,
        event_time_step_ms=event_time_step_ms,
        event_time_skew_ms=event_time_skew_ms,
        redeliver_after_ms=redeliver_after_ms,
    )
    service = GeneratorSource(config, state_file=state_file)
    serve_service(service, host=host, port=port, log_level=log_level, log_format=log_format)


def main(args: Sequence[str] | None = None) -> None:
    invoke(cli, args, "etlrouter.connectors.generator")


if __name__ == "__main__":
    main()
