#!/usr/bin/env python3
"""The SDK's record conversions (etlrouter/sdk/records.py), per record, against the obvious way to write them.

    python benchmarks/sdk.py [--records 1000] [--headers 1] [--rounds 15]

Every SDK service pays these on every batch: a source `source_batch` (records -> the batch it answers
with), a transform `records_from_proto` and `records_to_proto`, a sink `records_from_proto`. The baseline is
the same conversion written the obvious way — a header dict passed to the map field as a keyword, read with
`dict(map.items())`, a finished RecordList wrapped in a RecordBatch — which goes through collections.abc for
every entry (upb's map fields are Python MutableMappings) and copies the batch once more. The two "filter"
rows are a transform's round trip (decode a batch, pass some records on unchanged, encode the reply): the
SDK's filter names them by index (`Processed.kept`) and they are copied as messages (`copy_records`).
Both produce the same messages (checked).
CPU µs per record, median over --rounds of 20 calls each, the two interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

from etlrouter._proto.v1 import records_pb2
from etlrouter.sdk.records import Record, copy_records, records_from_proto, records_to_proto, source_batch


def obvious_to_proto(records: Sequence[Record]) -> records_pb2.RecordList:
    record_list = records_pb2.RecordList()
    for r in records:
        record_list.records.add(
            key=r.key, value=r.value, headers=r.headers, event_time_ms=r.event_time_ms, offset=r.offset
        )
    return record_list


def obvious_from_proto(record_list: records_pb2.RecordList) -> list[Record]:
    return [
        Record(p.key, p.value, dict(p.headers.items()), p.event_time_ms, p.offset)
        for p in record_list.records
    ]


def obvious_source_batch(records: Sequence[Record], partition: int) -> records_pb2.RecordBatch:
    record_list = obvious_to_proto(records)
    header = records_pb2.BatchHeader(
        record_count=len(records),
        byte_size=record_list.ByteSize(),
        partition=partition,
        min_event_time_ms=min(r.event_time_ms for r in records),
        max_event_time_ms=max(r.event_time_ms for r in records),
        first_offset=records[0].offset,
        last_offset=records[-1].offset,
    )
    return records_pb2.RecordBatch(header=header, records=record_list)


def filter_by_index(encoded: records_pb2.RecordList, step: int) -> records_pb2.RecordList:
    records = records_from_proto(encoded)
    out = records_pb2.RecordList()
    copy_records(encoded, range(0, len(records), step), out)
    return out


def cpu_us_per_record(fn: Callable[[], object], records: int, calls: int = 20) -> float:
    started = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - started) / calls / records * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--headers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    headers = {f"header-{i}": f"value-{i}" for i in range(args.headers)}
    records = [
        Record(b"key-%08d" % i, b"x" * 200, dict(headers), 1_700_000_000_000 + i, i)
        for i in range(args.records)
    ]
    encoded = records_to_proto(records)
    assert records_to_proto(records).SerializeToString() == obvious_to_proto(records).SerializeToString()
    assert (
        source_batch(records, 3).SerializeToString() == obvious_source_batch(records, 3).SerializeToString()
    )
    assert records_from_proto(encoded) == obvious_from_proto(encoded) == records
    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "records_to_proto": (lambda: obvious_to_proto(records), lambda: records_to_proto(records)),
        "records_from_proto": (lambda: obvious_from_proto(encoded), lambda: records_from_proto(encoded)),
        "source_batch": (lambda: obvious_source_batch(records, 0), lambda: source_batch(records, 0)),
        # A transform's round trip (the TransformAdapter's): decode, keep every other record unchanged
        # (a filter), or all of them, and encode the reply; the SDK's filter returns Processed.kept.
        "filter, keeps 1/2": (
            lambda: obvious_to_proto(obvious_from_proto(encoded)[::2]),
            lambda: filter_by_index(encoded, 2),
        ),
        "filter, keeps all": (
            lambda: obvious_to_proto(obvious_from_proto(encoded)),
            lambda: filter_by_index(encoded, 1),
        ),
    }
    assert filter_by_index(encoded, 2) == obvious_to_proto(records[::2])
    print(
        f"{args.records} records of 200 B, {args.headers} header(s) each;"
        f" CPU µs per record, median of {args.rounds} rounds"
    )
    print("| conversion | obvious | etlrouter.sdk | ratio |")
    print("|---|---|---|---|")
    for name, (baseline, ours) in cases.items():
        before: list[float] = []
        after: list[float] = []
        for _ in range(args.rounds):
            before.append(cpu_us_per_record(baseline, args.records))
            after.append(cpu_us_per_record(ours, args.records))
        b, a = statistics.median(before), statistics.median(after)
        print(f"| {name} | {b:.2f} | {a:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
