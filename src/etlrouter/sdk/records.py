"""The plain Python record and its conversion to and from the protobuf messages — the only place it happens.

This is the hot path (batches of ~1000 records): conversions are single comprehensions or loops over the
upb containers with no per-field Python helpers, and `Record` is a gc-free msgspec Struct whose positional
constructor is cheap.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import msgspec

from etlrouter._proto.v1 import records_pb2


class Record(msgspec.Struct, gc=False):
    """One record: opaque key and value bytes, string headers, event time (ms, 0 = unknown), offset.

    `offset` is the record's position in its source partition; sources must make it strictly increasing
    within a partition. Transforms and sinks receive it as the source set it.
    """

    key: bytes = b""
    value: bytes = b""
    headers: dict[str, str] = {}
    event_time_ms: int = 0
    offset: int = 0


# upb's map fields are Python MutableMappings: `items()`, `update()` and a dict passed to a constructor go
# through collections.abc, one Python call per entry and per step. Reading by key and setting entries one
# by one takes about 0.75x the CPU to decode and 0.6x to encode (benchmarks/sdk.py).


def _put_headers(target: Any, headers: dict[str, str]) -> None:
    for name, value in headers.items():
        target[name] = value


def records_from_proto(record_list: records_pb2.RecordList) -> list[Record]:
    """Decode the records of a batch into plain `Record`s."""
    out: list[Record] = []
    append = out.append
    for p in record_list.records:
        map_field = p.headers
        headers = {}
        for name in map_field:  # a loop: a dict comprehension costs a frame per record (benchmarks/sdk.py)
            headers[name] = map_field[name]
        append(Record(p.key, p.value, headers, p.event_time_ms, p.offset))
    return out


def _add_records(add: Any, records: Sequence[Record]) -> None:
    # Attribute stores cost less than add()'s keyword arguments; zero fields are left unset, as the
    # encoder would leave them out anyway.
    for r in records:
        added = add()
        added.key = r.key
        added.value = r.value
        if r.event_time_ms:
            added.event_time_ms = r.event_time_ms
        if r.offset:
            added.offset = r.offset
        headers = r.headers
        if headers:
            _put_headers(added.headers, headers)


def records_to_proto(
    records: Sequence[Record],
    into: records_pb2.RecordList | None = None,
    origins: Origins | None = None,
) -> records_pb2.RecordList:
    """Encode plain records into a `RecordList` (no header); `into` fills one inside a reply in place
    (assigning a finished one to a message field would copy every record). With the `origins` of the
    records they were decoded from, the ones returned unchanged are copied as messages, in C."""
    record_list = records_pb2.RecordList() if into is None else into
    if origins is None or not records:
        _add_records(record_list.records.add, records)
    else:
        origins.encode(records, record_list)
    return record_list


class Origins:
    """Where the records of a decoded batch came from, so a transform's unchanged records are encoded
    again by copying their messages in upb instead of field by field (most of a filter's CPU was the
    two conversions).

    A returned record counts as unchanged only when it is one of the decoded `Record` objects (by
    identity) *and* its fields still are what was decoded: the same key and value objects, equal
    headers, event time and offset. A record changed in place, a new one, or a copy is encoded field
    by field, so the bytes sent never depend on this shortcut.
    """

    __slots__ = ("_index", "_record_list", "_records", "_snapshots")

    def __init__(self, record_list: records_pb2.RecordList) -> None:
        self._record_list = record_list
        records: list[Record] = []
        snapshots: list[tuple[bytes, bytes, dict[str, str], int, int]] = []
        append, remember = records.append, snapshots.append
        for p in record_list.records:
            map_field = p.headers
            headers = {}
            for name in map_field:
                headers[name] = map_field[name]
            key, value, event_time, offset = p.key, p.value, p.event_time_ms, p.offset
            append(Record(key, value, headers, event_time, offset))
            remember((key, value, headers.copy() if headers else _NO_HEADERS, event_time, offset))
        # Our own list: the caller may empty or reorder the one it gets, and the ids below must stay
        # those of live objects.
        self._records = records
        self._snapshots = snapshots

    @property
    def records(self) -> list[Record]:
        """The decoded records, a new list (the transform may do what it likes with it)."""
        return list(self._records)

    def _unchanged(self, records: Sequence[Record]) -> list[int]:
        """For each record, its index in the decoded batch if it is one of its records, unchanged; else -1."""
        index = {id(r): i for i, r in enumerate(self._records)}
        snapshots = self._snapshots
        found: list[int] = []
        append = found.append
        for record in records:
            i = index.get(id(record), -1)
            if i >= 0:
                key, value, headers, event_time, offset = snapshots[i]
                if not (
                    record.key is key
                    and record.value is value
                    and record.event_time_ms == event_time
                    and record.offset == offset
                    and record.headers == headers
                ):
                    i = -1
            append(i)
        return found

    def encode(self, records: Sequence[Record], into: records_pb2.RecordList) -> None:
        found = self._unchanged(records)
        if found[0] >= 0 and all(a < b for a, b in itertools.pairwise(found)):
            # All unchanged, in batch order (a filter): copy the whole list, then cut out what was
            # dropped, from the end so the indexes stay valid.
            into.CopyFrom(self._record_list)
            out = into.records
            end = len(self._records)
            for i in reversed(found):
                if i + 1 < end:
                    del out[i + 1 : end]
                end = i
            if end:
                del out[:end]
            return
        protos = self._record_list.records
        add = into.records.add
        for r, i in zip(records, found, strict=True):
            if i >= 0:
                add().CopyFrom(protos[i])
            else:
                _add_records(add, (r,))


_NO_HEADERS: dict[str, str] = {}


class OffsetOrderError(ValueError):
    """A source returned offsets that do not strictly increase within one batch."""


def source_batch(
    records: Sequence[Record], partition: int, into: records_pb2.RecordBatch | None = None
) -> records_pb2.RecordBatch:
    """A batch as a source must return it: records plus a header with partition, offset range,
    event-time range (ignoring unknown times), record count and encoded byte size. `into` (an empty
    batch inside a reply) is filled in place, as records_to_proto's.

    Raises OffsetOrderError naming the first record whose offset does not increase.
    """
    batch = records_pb2.RecordBatch() if into is None else into
    add = batch.records.records.add
    previous = -1
    min_time = max_time = 0
    for index, r in enumerate(records):
        offset, event_time = r.offset, r.event_time_ms
        if offset <= previous:
            raise OffsetOrderError(
                f"record {index} has offset {offset}, not greater than the previous offset {previous} "
                f"(offsets must strictly increase within partition {partition})"
            )
        previous = offset
        if event_time:
            if not min_time or event_time < min_time:
                min_time = event_time
            if event_time > max_time:
                max_time = event_time
        added = add()
        added.key = r.key
        added.value = r.value
        if event_time:
            added.event_time_ms = event_time
        if offset:
            added.offset = offset
        headers = r.headers
        if headers:
            _put_headers(added.headers, headers)
    header = batch.header
    header.record_count = len(records)
    header.byte_size = batch.records.ByteSize()
    header.partition = partition
    header.min_event_time_ms = min_time
    header.max_event_time_ms = max_time
    if records:
        header.first_offset = records[0].offset
        header.last_offset = records[-1].offset
        # Records that arrived with a W3C trace context (a Kafka header, an HTTP request's): the batch
        # continues the first one's trace (docs/observability.md).
        first_headers = records[0].headers
        if "traceparent" in first_headers:
            header.traceparent = first_headers["traceparent"]
            header.tracestate = first_headers.get("tracestate", "")
    return batch


def encoded_size(record: Record) -> int:
    """Approximate encoded size of one record (for honouring max_bytes without encoding twice)."""
    size = len(record.key) + len(record.value) + 24
    for name, value in record.headers.items():
        size += len(name) + len(value) + 6
    return size
