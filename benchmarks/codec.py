#!/usr/bin/env python3
"""CPU cost per 1000-record batch of the wire codecs the data plane could use, measured in one run.

    python benchmarks/codec.py [--repeat 30]

Rows: upb RecordBatch (what user services build and read), RawRecordBatch (what a forwarding sidecar
parses: header only, records left as bytes) and msgspec msgpack array-like structs (the internal
encoding baseline). Ratios are relative to the upb row.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import msgspec

from etlrouter._proto.v1 import records_pb2

N = 1000


class MsgRecord(msgspec.Struct, array_like=True):
    key: bytes
    value: bytes
    headers: dict[str, str]
    event_time_ms: int
    offset: int


class MsgBatch(msgspec.Struct, array_like=True):
    batch_id: str
    records: list[MsgRecord]


def build_upb() -> bytes:
    batch = records_pb2.RecordBatch()
    batch.header.batch_id = "b"
    batch.header.record_count = N
    records = batch.records.records
    for i in range(N):
        r = records.add()
        r.key = f"key-{i:012d}".encode()
        r.value = bytes(200)
        r.headers["content-type"] = "application/octet-stream"
        r.headers["trace-id"] = f"{i:016x}"
        r.event_time_ms = 1_700_000_000_000 + i
        r.offset = i
    return batch.SerializeToString()


def read_upb(data: bytes) -> int:
    batch = records_pb2.RecordBatch.FromString(data)
    total = 0
    for r in batch.records.records:
        total += len(r.key) + len(r.value) + len(r.headers["trace-id"]) + r.event_time_ms + r.offset
    return total


def forward_raw(data: bytes) -> int:
    raw = records_pb2.RawRecordBatch.FromString(data)
    raw.header.attempt += 1
    return len(raw.SerializeToString())


encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(MsgBatch)


def build_msgspec() -> bytes:
    return encoder.encode(
        MsgBatch(
            "b",
            [
                MsgRecord(
                    f"key-{i:012d}".encode(),
                    bytes(200),
                    {"content-type": "application/octet-stream", "trace-id": f"{i:016x}"},
                    1_700_000_000_000 + i,
                    i,
                )
                for i in range(N)
            ],
        )
    )


def read_msgspec(data: bytes) -> int:
    total = 0
    for r in decoder.decode(data).records:
        total += len(r.key) + len(r.value) + len(r.headers["trace-id"]) + r.event_time_ms + r.offset
    return total


def timed(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1000 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    upb, packed = build_upb(), build_msgspec()
    rows = [
        (
            "upb RecordBatch (rows)",
            len(upb),
            timed(build_upb, args.repeat),
            timed(lambda: read_upb(upb), args.repeat),
        ),
        ("upb RawRecordBatch (forward)", len(upb), 0.0, timed(lambda: forward_raw(upb), args.repeat)),
        (
            "msgspec msgpack array-like",
            len(packed),
            timed(build_msgspec, args.repeat),
            timed(lambda: read_msgspec(packed), args.repeat),
        ),
    ]
    base_read = rows[0][3]
    print(
        f"{N}-record batch, median of {args.repeat}, {os.cpu_count()} cores; "
        "ratio = read cost / upb rows read"
    )
    print(f"{'codec':<32}{'KB':>7}{'build+encode ms':>17}{'decode+read ms':>16}{'ratio':>8}")
    for name, size, build_ms, read_ms in rows:
        build = f"{build_ms:.2f}" if build_ms else "-"
        print(f"{name:<32}{size / 1000:>7.0f}{build:>17}{read_ms:>16.3f}{read_ms / base_read:>7.3f}x")


if __name__ == "__main__":
    main()
