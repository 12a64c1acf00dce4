"""Calling user services without decoding their records.

The generated stubs decode every record of a batch into Python objects. The sidecar only needs the batch
header, so it calls the same RPC paths with the wire-identical Raw* messages (services.proto), whose
records stay one `bytes` field.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.message import DecodeError
from grpclib.client import Channel, UnaryUnaryMethod

from etlrouter._proto.v1 import records_pb2, services_pb2


class ServiceClient:
    """The RPCs a sidecar makes to one local user service, with raw batches. `method` makes each call
    object (sidecar/tracing.py passes one that opens a CLIENT span)."""

    def __init__(self, channel: Channel, method: type[UnaryUnaryMethod[Any, Any]] = UnaryUnaryMethod) -> None:
        self.channel = channel
        self.pull = method(
            channel,
            "/etlrouter.v1.SourceService/PullRecords",
            services_pb2.PullRecordsRequest,
            services_pb2.RawPullRecordsResponse,
        )
        self.acknowledge = method(
            channel,
            "/etlrouter.v1.SourceService/Acknowledge",
            services_pb2.AcknowledgeRequest,
            services_pb2.AcknowledgeResponse,
        )
        self.process = method(
            channel,
            "/etlrouter.v1.TransformService/ProcessBatch",
            services_pb2.RawProcessBatchRequest,
            services_pb2.RawProcessBatchResponse,
        )
        self.write = method(
            channel,
            "/etlrouter.v1.SinkService/WriteBatch",
            services_pb2.RawWriteBatchRequest,
            services_pb2.WriteBatchResponse,
        )
        self.flush = method(
            channel, "/etlrouter.v1.SinkService/Flush", services_pb2.FlushRequest, services_pb2.FlushResponse
        )
        self.lookup = method(
            channel,
            "/etlrouter.v1.LookupService/BatchLookup",
            services_pb2.BatchLookupRequest,
            services_pb2.BatchLookupResponse,
        )


def count_records(records: bytes) -> int:
    """Number of records in an encoded RecordList. upb's parser is lazy enough that this costs about a
    fifth of reading every field (measured: 0.15-0.35 ms per 1000 records; a Python loop over the length
    prefixes took 0.8 ms)."""
    return len(records_pb2.RecordList.FromString(records).records) if records else 0


class UndecodableBatchError(ValueError):
    """A batch whose header parsed but whose records do not: retrying cannot help, so it is dead-lettered
    whole, as its raw bytes (`raw_batch_record`)."""


def decode_records(raw: records_pb2.RawRecordBatch) -> list[records_pb2.Record]:
    """Decode a raw batch's records: only for the rare paths that need them (dead letters, taps, errors)."""
    try:
        return list(records_pb2.RecordList.FromString(raw.records).records)
    except DecodeError as e:
        raise UndecodableBatchError(
            f"the records of batch {raw.header.batch_id!r} ({len(raw.records)} bytes) do not decode: {e}"
        ) from None


def raw_batch_record(raw: records_pb2.RawRecordBatch) -> records_pb2.Record:
    """An undecodable batch as one record: its encoded bytes as the value, its first offset, so the DLQ
    keeps exactly what arrived."""
    return records_pb2.Record(value=raw.records, offset=raw.header.first_offset)


def encode_records(records: list[records_pb2.Record]) -> bytes:
    return records_pb2.RecordList(records=records).SerializeToString()
