"""Pure judgements: each takes what the service answered and returns the problems found (empty = fine)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from etlrouter._proto.v1 import records_pb2, services_pb2

BYTES_TOLERANCE = 1.25  # max_bytes is met with the source's own size estimate: allow it to be a little off


def record_id(record: records_pb2.Record) -> tuple[bytes, bytes, tuple[tuple[str, str], ...], int, int]:
    return (
        record.key,
        record.value,
        tuple(sorted(record.headers.items())),
        record.event_time_ms,
        record.offset,
    )


def source_batch_problems(
    batch: records_pb2.RecordBatch, partitions: int, requested: Sequence[int]
) -> list[str]:
    """A pulled batch: offsets strictly increase, the header says the partition and offset range of its
    records, the partition exists (and was asked for)."""
    records = batch.records.records
    header = batch.header
    problems: list[str] = []
    offsets = [r.offset for r in records]
    for i in range(1, len(offsets)):
        if offsets[i] <= offsets[i - 1]:
            problems.append(f"record {i} has offset {offsets[i]} after {offsets[i - 1]} in one batch")
            break
    if not records:
        return problems
    if header.partition >= partitions:
        problems.append(f"partition {header.partition}, but the source declares {partitions}")
    if requested and header.partition not in requested:
        problems.append(f"partition {header.partition}, not one of the requested {list(requested)}")
    if (header.first_offset, header.last_offset) != (offsets[0], offsets[-1]):
        problems.append(
            f"header offsets {header.first_offset}-{header.last_offset}, records {offsets[0]}-{offsets[-1]}"
        )
    if header.record_count not in (0, len(records)):
        problems.append(f"header.record_count {header.record_count} for {len(records)} records")
    return problems


def across_batches_problems(batches: Sequence[records_pb2.RecordBatch]) -> list[str]:
    """Offsets keep increasing per partition from one pull to the next (within one session)."""
    last: dict[int, int] = {}
    problems: list[str] = []
    for n, batch in enumerate(batches):
        records = batch.records.records
        if not records:
            continue
        p = batch.header.partition
        if p in last and records[0].offset <= last[p]:
            problems.append(
                f"pull {n + 1} of partition {p} starts at offset {records[0].offset}, "
                f"after {last[p]} in an earlier pull"
            )
        last[p] = records[-1].offset
    return problems


def size_problems(batch: records_pb2.RecordBatch, max_records: int, max_bytes: int) -> list[str]:
    records = batch.records.records
    problems: list[str] = []
    if max_records and len(records) > max_records:
        problems.append(f"{len(records)} records for max_records={max_records}")
    size = batch.records.ByteSize()
    if max_bytes and len(records) > 1 and size > max_bytes * BYTES_TOLERANCE:
        problems.append(f"{len(records)} records of {size} bytes for max_bytes={max_bytes}")
    return problems


def error_index_problems(errors: Sequence[records_pb2.RecordError], count: int) -> list[str]:
    problems: list[str] = []
    indexes = [e.index for e in errors]
    bad = [i for i in indexes if i >= count]
    if bad:
        problems.append(f"errors for record indexes {bad[:5]} of a batch of {count}")
    repeated = [i for i, n in Counter(indexes).items() if n > 1]
    if repeated:
        problems.append(f"several errors for record indexes {repeated[:5]}")
    unspecified = [e.index for e in errors if e.error_class == records_pb2.ERROR_CLASS_UNSPECIFIED]
    if unspecified:
        problems.append(f"errors without an error class for indexes {unspecified[:5]}")
    return problems


def record_count_problems(batch: records_pb2.RecordBatch) -> list[str]:
    """A transform's answer may say how many records it holds; the sidecar then takes that instead of
    counting, so it must be right (0 = not said)."""
    said, held = batch.header.record_count, len(batch.records.records)
    return [f"header.record_count is {said}, the batch holds {held} records"] if said and said != held else []


def same_record(a: records_pb2.Record, b: records_pb2.Record) -> bool:
    """The same source record, delivered again: key, value and offset (headers a source stamps on each
    delivery, such as a delivery time, may differ)."""
    return (a.key, a.value, a.offset) == (b.key, b.value, b.offset)


def outputs(reply: services_pb2.ProcessBatchResponse, *, whole: bool = True) -> Counter[tuple[object, ...]]:
    """The output records as a multiset: whole records, or (key, value) only — for comparing batches with
    different batch ids, since a transform may stamp its headers with the batch."""
    if whole:
        return Counter(record_id(r) for r in reply.batch.records.records)
    return Counter((r.key, r.value) for r in reply.batch.records.records)


def one_to_one_problems(
    inputs: Sequence[records_pb2.Record], reply: services_pb2.ProcessBatchResponse
) -> list[str]:
    """A one_to_one transform: one output per input that did not fail, in input order (by offset)."""
    failed = {e.index for e in reply.errors}
    kept = [r.offset for i, r in enumerate(inputs) if i not in failed]
    got = [r.offset for r in reply.batch.records.records]
    if len(got) != len(kept):
        return [f"{len(got)} outputs for {len(kept)} inputs that did not fail ({len(failed)} errors)"]
    if got != kept:
        return ["outputs are not in input order (their offsets differ from the inputs')"]
    return []


def lookup_agreement_problems(
    keys: Sequence[bytes],
    singles: Sequence[services_pb2.LookupResult],
    batch: Sequence[services_pb2.LookupResult],
) -> list[str]:
    if len(batch) != len(keys):
        return [f"BatchLookup answered {len(batch)} results for {len(keys)} keys"]
    problems: list[str] = []
    for key, one, many in zip(keys, singles, batch, strict=True):
        a = (one.found, one.value, dict(one.fields))
        b = (many.found, many.value, dict(many.fields))
        if a != b:
            problems.append(
                f"key {key!r}: Lookup found={one.found} value={one.value[:40]!r}, "
                f"BatchLookup found={many.found} value={many.value[:40]!r}"
            )
    return problems
