"""The four services of the contract as plain logic over the protobuf messages, shared by the grpclib
(in-process) and the grpcio (own process) servers of these tests; no gRPC library is imported here.

Each class keeps the contract, except for the rules named in `broken`: one misbehaviour per rule, so that
the kit's check for that rule — and only it — fails. The rule names are the kit's check ids without the
kind (`rewind` for `source.rewind`); "capabilities", "health" and "reflection" are the servers' business.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path

from etlrouter._proto.v1 import records_pb2, services_pb2

SOURCE_RULES = ("offsets", "rewind", "ack-old", "ack-unknown", "batch-limits", "empty-pull", "long-poll")
TRANSFORM_RULES = ("results", "record-errors", "retry", "one-to-one", "batch-limit", "empty-batch")
SINK_RULES = ("write", "read-back", "idempotent", "flush", "batch-limit", "empty-batch")
LOOKUP_RULES = ("agree", "missing", "deadlines")
LATE_S = 1.5  # how late a broken long poll answers beyond its wait_ms
LAZY_WRITE_S = 0.5  # how long after answering a broken sink writes
TABLE = {b"a": b"apple", b"b": b"banana", b"c": b"cherry"}


class Abort(Exception):
    """Answer the call with this gRPC status (by name, e.g. "FAILED_PRECONDITION")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def capabilities(kind: str, broken: Iterable[str]) -> records_pb2.Capabilities:
    if "capabilities" in broken:
        raise Abort("INTERNAL", "GetCapabilities is broken on purpose")
    return {
        "source": records_pb2.Capabilities(name="contract-source", partitions=2),
        "transform": records_pb2.Capabilities(name="contract-transform", one_to_one=True),
        "sink": records_pb2.Capabilities(name="contract-sink", idempotent_writes=True),
        "lookup": records_pb2.Capabilities(name="contract-lookup"),
    }[kind]


class SourceLogic:
    """Endless records per partition: offset n of partition p is key `p-n`, value `{"p":p,"n":n}`."""

    def __init__(self, broken: Iterable[str] = (), partitions: int = 2) -> None:
        self.broken = frozenset(broken)
        self.partitions = partitions
        self.acked = [-1] * partitions
        self.next = [0] * partitions
        self.high = [0] * partitions  # one past the highest offset handed out
        self.cursor = 0
        self.lock = threading.Lock()

    def pull(
        self, request: services_pb2.PullRecordsRequest
    ) -> tuple[services_pb2.PullRecordsResponse, float]:
        """The answer, and how long to wait before sending it (a long poll that found nothing)."""
        with self.lock:
            if request.rewind and "rewind" not in self.broken:
                self.next = [a + 1 for a in self.acked]
            owned = [p for p in (request.partitions or range(self.partitions)) if p < self.partitions]
            if not owned:
                if "empty-pull" in self.broken:
                    raise Abort("UNAVAILABLE", "nothing to pull")
                wait = request.wait_ms / 1000
                late = LATE_S if "long-poll" in self.broken and wait else 0.0
                return services_pb2.PullRecordsResponse(), wait + late
            p = owned[self.cursor % len(owned)]
            self.cursor += 1
            count = request.max_records or 1000
            if "batch-limits" in self.broken and request.max_records:
                count += 1
            start = self.next[p]
            if "offsets" in self.broken and start > self.acked[p] + 1:
                start -= 1  # overlaps the previous pull by one record
            reply = services_pb2.PullRecordsResponse()
            batch = reply.batch
            size = 0
            for offset in range(start, start + count):
                value = json.dumps({"p": p, "n": offset}).encode()
                size += len(value) + 20
                if request.max_bytes and size > request.max_bytes and offset > start:
                    break
                batch.records.records.add(key=b"%d-%d" % (p, offset), value=value, offset=offset)
            records = batch.records.records
            batch.header.partition = p
            batch.header.first_offset, batch.header.last_offset = records[0].offset, records[-1].offset
            batch.header.record_count = len(records)
            batch.header.byte_size = batch.records.ByteSize()
            self.next[p] = records[-1].offset + 1
            self.high[p] = max(self.high[p], self.next[p])
            return reply, 0.0

    def acknowledge(self, request: services_pb2.AcknowledgeRequest) -> services_pb2.AcknowledgeResponse:
        with self.lock:
            for ack in request.acks:
                p, up_to = ack.partition, ack.up_to_offset
                if p >= self.partitions:
                    raise Abort("FAILED_PRECONDITION", f"no partition {p}")
                if up_to >= self.high[p] and "ack-unknown" not in self.broken:
                    raise Abort("FAILED_PRECONDITION", f"offset {up_to} of partition {p} was never delivered")
                if up_to <= self.acked[p]:
                    if "ack-old" in self.broken:
                        raise Abort("FAILED_PRECONDITION", f"offset {up_to} is already acknowledged")
                    continue
                self.acked[p] = up_to
                self.next[p] = max(self.next[p], up_to + 1)
        return services_pb2.AcknowledgeResponse()


class TransformLogic:
    """Upper-cases UTF-8 values (one to one); a value that is not UTF-8 is a PERMANENT record error."""

    def __init__(self, broken: Iterable[str] = ()) -> None:
        self.broken = frozenset(broken)
        self.seen: set[str] = set()

    def process(self, request: services_pb2.ProcessBatchRequest) -> services_pb2.ProcessBatchResponse:
        records = request.batch.records.records
        batch_id = request.batch.header.batch_id
        if "retry" in self.broken:
            if batch_id in self.seen:
                raise Abort("ALREADY_EXISTS", f"batch {batch_id} was processed already")
            self.seen.add(batch_id)
        if not records and "empty-batch" in self.broken:
            raise Abort("INVALID_ARGUMENT", "an empty batch")
        if len(records) > 100 and "batch-limit" in self.broken:
            raise Abort("RESOURCE_EXHAUSTED", "batches of more than 100 records are too much")
        reply = services_pb2.ProcessBatchResponse()
        poisoned = False
        for index, record in enumerate(records):
            try:
                value = record.value.decode("utf-8")
            except UnicodeDecodeError:
                poisoned = True
                if "record-errors" in self.broken:
                    raise Abort("INTERNAL", f"record {index} is not UTF-8") from None
                reply.errors.add(
                    index=index, error_class=records_pb2.ERROR_CLASS_PERMANENT, message="not UTF-8"
                )
                continue
            if "one-to-one" in self.broken and index == 0:
                continue  # dropped without an error, though one_to_one is claimed
            out = reply.batch.records.records.add()
            out.CopyFrom(record)
            out.value = value.upper().encode()
            out.headers["via"] = "contract"
        if "results" in self.broken and records and not poisoned and len(records) <= 100:
            reply.errors.add(index=len(records), error_class=records_pb2.ERROR_CLASS_PERMANENT, message="?")
        return reply


class SinkLogic:
    """Appends {"batch_id", "offset", "value"} lines to a file; a batch id already written is skipped."""

    def __init__(self, path: Path, broken: Iterable[str] = ()) -> None:
        self.path = path
        self.broken = frozenset(broken)
        self.written: set[str] = set()
        self.lock = threading.Lock()

    def write(self, request: services_pb2.WriteBatchRequest) -> tuple[services_pb2.WriteBatchResponse, bool]:
        """The answer, and whether the data is to be written only after answering (the broken lazy sink):
        then the caller calls `commit(request)` later."""
        records = request.batch.records.records
        if not records and "empty-batch" in self.broken:
            raise Abort("INVALID_ARGUMENT", "an empty batch")
        if len(records) > 100 and "batch-limit" in self.broken:
            raise Abort("RESOURCE_EXHAUSTED", "batches of more than 100 records are too much")
        written = 0 if "write" in self.broken else len(records)
        reply = services_pb2.WriteBatchResponse(written=written)
        if "read-back" in self.broken:
            return reply, True
        self.commit(request)
        return reply, False

    def commit(self, request: services_pb2.WriteBatchRequest) -> None:
        batch_id = request.batch.header.batch_id
        with self.lock:
            if batch_id in self.written and "idempotent" not in self.broken:
                return
            self.written.add(batch_id)
            with self.path.open("a", encoding="utf-8") as f:
                for r in request.batch.records.records:
                    line = {
                        "batch_id": batch_id,
                        "offset": r.offset,
                        "value": r.value.decode(errors="replace"),
                    }
                    f.write(json.dumps(line) + "\n")

    def flush(self, request: services_pb2.FlushRequest) -> services_pb2.FlushResponse:
        if "flush" in self.broken:
            raise Abort("INTERNAL", "Flush is broken on purpose")
        return services_pb2.FlushResponse()


def verify_command(path: Path) -> str:
    """The kit's --verify-command for a SinkLogic file: counts the lines of a batch id."""
    return f'cat {path} 2>/dev/null | grep -c \'"batch_id": "{{batch_id}}"\' || true'


class LookupLogic:
    def __init__(self, broken: Iterable[str] = ()) -> None:
        self.broken = frozenset(broken)
        self.slow_once = "deadlines" in self.broken

    def result(self, key: bytes) -> services_pb2.LookupResult:
        if key in TABLE:
            return services_pb2.LookupResult(
                found=True, value=TABLE[key], fields={"fruit": TABLE[key].decode()}
            )
        if "missing" in self.broken:
            raise Abort("NOT_FOUND", f"no key {key!r}")
        return services_pb2.LookupResult(found=False)

    def lookup(self, request: services_pb2.LookupRequest) -> services_pb2.LookupResponse:
        return services_pb2.LookupResponse(result=self.result(request.key))

    def batch_lookup(
        self, request: services_pb2.BatchLookupRequest
    ) -> tuple[services_pb2.BatchLookupResponse, float]:
        """The answer, and how long to wait before sending it (the broken slow lookup, once)."""
        results = [self.result(key) for key in request.keys]
        if "agree" in self.broken:
            results.reverse()
        delay = 0.0
        if self.slow_once:
            self.slow_once = False
            delay = SLOW_S
        return services_pb2.BatchLookupResponse(results=results), delay


SLOW_S = 3.5  # the broken slow lookup's one late answer: beyond the tests' --timeout of 3 s
TIMEOUT_S = 3.0  # the pipeline timeout the tests give the kit
