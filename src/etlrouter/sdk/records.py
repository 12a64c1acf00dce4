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
    records: Sequence[Record], into: records_pb2.RecordList | None = None
) -> records_pb2.RecordList:
    """Encode plain records into a `RecordList` (no header); `into` fills one inside a reply in place
    (assigning a finished one to a message field would copy every record)."""
    record_list = records_pb2.RecordList() if into is None else into
    _add_records(record_list.records.add, records)
    return record_list


def copy_records(
    record_list: records_pb2.RecordList, indexes: Sequence[int], into: records_pb2.RecordList
) -> None:
    """Fill `into` (an empty list) with the records of `record_list` at `indexes`, copied as messages in
    upb (C) rather than decoded and encoded again: what a transform passes on unchanged
    (`Processed.kept`). Indexes must lie within the batch (the adapter checks them)."""
    if not indexes:
        return
    if all(a < b for a, b in itertools.pairwise(indexes)):
        # In batch order (a filter): copy the whole list, then cut out what was dropped, from the end
        # so the indexes stay valid.
        into.CopyFrom(record_list)
        out = into.records
        end = len(out)
        for i in reversed(indexes):
            if i + 1 < end:
                del out[i + 1 : end]
            end = i
        if end:
            del out[:end]
        return
    protos = record_list.records
    add = into.records.add
    for i in indexes:
        add().CopyFrom(protos[i])


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
    _add_records(batch.records.records.add, records)
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
