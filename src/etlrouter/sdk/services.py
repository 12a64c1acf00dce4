"""What a user implements: `Source`, `Transform` (or `RecordTransform`), `Sink`, `Lookup`.

Each is a plain class with async methods over plain `Record`s; `etlrouter.sdk.serve`/`run` wrap it in the
generated gRPC service. Every service declares `capabilities` (answered by GetCapabilities) and may
override `open()` / `close()` to acquire and release resources around serving.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, ClassVar

import msgspec

from etlrouter._proto.v1 import records_pb2
from etlrouter.sdk.errors import PermanentError, RecordError
from etlrouter.sdk.records import Record

log = logging.getLogger(__name__)


class Capabilities(msgspec.Struct, frozen=True, kw_only=True):
    """What the service declares to the sidecar (see `Capabilities` in records.proto)."""

    name: str = ""
    version: str = ""
    max_batch_records: int = 0
    max_batch_bytes: int = 0
    max_concurrency: int = 0
    requires_flush: bool = False
    idempotent_writes: bool = False
    one_to_one: bool = False
    partitions: int = 0
    labels: dict[str, str] = {}
    push: bool = False  # a push source (see PushSource); set for you by PushSource

    def to_proto(self) -> records_pb2.Capabilities:
        return records_pb2.Capabilities(**msgspec.structs.asdict(self))


class Service:
    """Common base: declared capabilities and an optional resource lifecycle."""

    capabilities: Capabilities = Capabilities()

    async def open(self) -> None:
        """Called once before the server accepts calls."""

    async def close(self) -> None:
        """Called once after the server stopped (running calls have finished or were cancelled)."""


class Pulled(msgspec.Struct):
    """A source's answer to one pull: records of ONE partition, or end of stream."""

    records: list[Record] = []
    partition: int = 0
    end_of_stream: bool = False


class Wakeup:
    """Tells waiting pulls that records may have arrived: `notify()` counts a generation and wakes every
    waiter; `wait_past(generation, timeout)` returns as soon as the count moved past `generation` (at once if
    it already has, so a notify between a pull and its wait is never lost). Use it on the event loop."""

    def __init__(self) -> None:
        self.generation = 0
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        event, self._event = self._event, asyncio.Event()
        event.set()

    async def wait_past(self, generation: int, timeout: float) -> bool:
        """True when notified after `generation`, False when `timeout` seconds passed first."""
        if self.generation != generation:
            return True
        if timeout <= 0:
            return False
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True


class Source(Service, abc.ABC):
    """Long poll: the sidecar's pulls carry `wait_ms` (how long it will wait for an answer). Either wait
    inside `pull` yourself (up to wait_ms, returning as soon as records are there), or answer at once and call
    `notify()` whenever records may have arrived: from the first notify on, the SDK holds an empty pull until
    the next notify (then calls `pull` again) or until wait_ms ran out (then answers empty)."""

    _wakeup: Wakeup | None = None  # made by the first notify()

    @abc.abstractmethod
    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        """Return at most max_records records (and about max_bytes; 0 = no byte limit) of one partition in
        `partitions` (empty = any), waiting up to wait_ms for data; an empty `Pulled()` when there is none
        (or return it at once and call `notify()` when records arrive: see the class)."""

    def notify(self) -> None:
        """Records may have become available: wake the pulls the SDK holds for this source. Call it on the
        event loop (from another thread: `loop.call_soon_threadsafe(source.notify)`); calling it once makes
        the SDK hold empty pulls (see the class), so call it from the start or not at all."""
        if self._wakeup is None:
            self._wakeup = Wakeup()
        self._wakeup.notify()

    @property
    def wakeup(self) -> Wakeup | None:
        """The source's Wakeup once it called notify(), else None (its pulls are answered as returned)."""
        return self._wakeup

    @abc.abstractmethod
    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        """Every offset <= up_to_offset of the partition is done (cumulative, monotonic)."""

    async def rewind(self) -> None:
        """The sidecar restarted and lost what it pulled: hand out again everything after the last
        acknowledged offset of each partition. A source that cannot do this is at-most-once across
        sidecar restarts; override it (the generator connector does)."""
        name = type(self).__name__
        log.warning("%s cannot rewind: records pulled before a sidecar restart may be lost", name)


class PushSource(Service):
    """A source that pushes its records to its sidecar (with `etlrouter.sdk.Pusher`) instead of being pulled.

    Serve it like any service so the sidecar discovers and registers it (its GetCapabilities declares
    `push = true`); PullRecords and Acknowledge answer FAILED_PRECONDITION. Records reach pipelines through
    a `Pusher` the program runs beside the server, and acks come back to that Pusher.
    """

    capabilities: Capabilities = Capabilities(push=True)


class Processed(msgspec.Struct):
    """A transform's output: new or changed `records`, or `kept`, the indexes of input records passed on
    exactly as they came (a filter) — those are copied as messages, not encoded again, which costs a
    fraction of encoding them (benchmarks/sdk.py). One of the two, not both; `errors` by input index."""

    records: list[Record] = []
    errors: list[RecordError] = []
    kept: list[int] | None = None


class Transform(Service, abc.ABC):
    @abc.abstractmethod
    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        """Turn a batch into output records; failed inputs are listed by their index in `records`."""


class RecordTransform(Transform):
    """A transform written one record at a time: return a record, several records, or None to drop it.

    A `PermanentError` (or `RejectedError`) raised for a record becomes that record's error; a
    `RetryableError` fails the whole call with UNAVAILABLE.
    """

    @abc.abstractmethod
    def transform(self, record: Record, options: Mapping[str, str]) -> Record | Iterable[Record] | None: ...

    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        output: list[Record] = []
        errors: list[RecordError] = []
        transform = self.transform
        for index, record in enumerate(records):
            try:
                result = transform(record, options)
            except PermanentError as exc:
                errors.append(RecordError(index, exc.error_class, str(exc) or type(exc).__name__))
                continue
            if result is None:
                continue
            if isinstance(result, Record):
                output.append(result)
            else:
                output.extend(result)
        return Processed(output, errors)


class Written(msgspec.Struct):
    """Records written (or already present from an earlier attempt of the same batch id) + rejects."""

    written: int
    errors: list[RecordError] = []


class Sink(Service, abc.ABC):
    @abc.abstractmethod
    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        """Write the batch; None means every record was written. A sink that declares idempotent_writes
        must not write a batch id twice (see `WrittenBatches`)."""

    async def flush(self) -> None:
        """Make everything written so far durable (called before acknowledging when requires_flush)."""


class LookupResult(msgspec.Struct):
    value: bytes = b""
    fields: dict[str, str] = {}


class Lookup(Service, abc.ABC):
    @abc.abstractmethod
    async def lookup(self, key: bytes) -> LookupResult | None:
        """The result for a key, or None when it is not found."""

    async def batch_lookup(self, keys: Sequence[bytes]) -> list[LookupResult | None]:
        """One result per key, in order; override when the backend can answer many keys at once."""
        return [await self.lookup(key) for key in keys]


class WrittenBatches:
    """Remembers the most recent batch ids a sink wrote, to make retried writes idempotent.

    Bounded: only the newest `capacity` ids are kept (retries arrive soon after the first attempt). With a
    `path`, ids are appended to a file (one per line) and reloaded on start; call `sync()` from the sink's
    flush so the ids are as durable as the data. Mark a batch written only after its data was written.
    """

    DEFAULT_CAPACITY: ClassVar[int] = 100_000

    def __init__(self, path: str | Path | None = None, *, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._file: IO[str] | None = None
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            if self.path.exists():
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    if line:
                        self._remember(line)
                self._compact()
            self._file = self.path.open("a", encoding="utf-8")

    def __contains__(self, batch_id: object) -> bool:
        return batch_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, batch_id: str) -> None:
        if not batch_id or "\n" in batch_id:
            raise ValueError(f"batch id must be a non-empty single line, got {batch_id!r}")
        if batch_id in self._ids:
            return
        self._remember(batch_id)
        if self._file is not None:
            self._file.write(batch_id + "\n")

    def sync(self) -> None:
        """Flush and fsync the id file (no-op without a path)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None

    def _remember(self, batch_id: str) -> None:
        self._ids[batch_id] = None
        self._ids.move_to_end(batch_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def _compact(self) -> None:
        # Rewrite the file with the ids still remembered, so it does not grow without bound across restarts.
        assert self.path is not None
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(batch_id + "\n" for batch_id in self._ids), encoding="utf-8")
        tmp.replace(self.path)
