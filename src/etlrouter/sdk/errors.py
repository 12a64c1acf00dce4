"""Exceptions user code raises, and the per-record error value services return.

How they reach the caller (see docs/sdk.md):
- `RetryableError` anywhere → the call fails with gRPC UNAVAILABLE; the sidecar retries the batch.
- `PermanentError` / `RejectedError` for one record → a per-record error (ERROR_CLASS_PERMANENT /
  ERROR_CLASS_REJECTED) and the record goes to the dead-letter queue; raised for a whole batch from
  `Transform.process` or `Sink.write`, every record of the batch gets that error. From a source or a lookup
  (no records to blame) → FAILED_PRECONDITION.
- `OptionsError` (bad stage options) → INVALID_ARGUMENT.
- Anything else → INTERNAL with the exception's type and message.
"""

from __future__ import annotations

import enum

import msgspec

from etlrouter._proto.v1 import records_pb2


class ErrorClass(enum.IntEnum):
    """Mirror of the protobuf `ErrorClass` enum (same numbers)."""

    TRANSIENT = records_pb2.ERROR_CLASS_TRANSIENT
    PERMANENT = records_pb2.ERROR_CLASS_PERMANENT
    REJECTED = records_pb2.ERROR_CLASS_REJECTED


class RecordError(msgspec.Struct, frozen=True):
    """One failed input record, by its zero-based index in the batch it arrived in."""

    index: int
    error_class: ErrorClass
    message: str


class RetryableError(Exception):
    """Retrying the same call may succeed (a dependency is down, a timeout)."""


class PermanentError(Exception):
    """The record (or batch) is bad; retrying will fail again."""

    error_class = ErrorClass.PERMANENT


class RejectedError(PermanentError):
    """A sink refuses the record (constraint violation, schema mismatch)."""

    error_class = ErrorClass.REJECTED


class OptionsError(ValueError):
    """The stage options are invalid (e.g. an expression that does not parse)."""


_PROTO_CLASS: dict[ErrorClass, records_pb2.ErrorClass] = {
    ErrorClass.TRANSIENT: records_pb2.ERROR_CLASS_TRANSIENT,
    ErrorClass.PERMANENT: records_pb2.ERROR_CLASS_PERMANENT,
    ErrorClass.REJECTED: records_pb2.ERROR_CLASS_REJECTED,
}


def errors_to_proto(errors: list[RecordError]) -> list[records_pb2.RecordError]:
    make = records_pb2.RecordError
    return [make(index=e.index, error_class=_PROTO_CLASS[e.error_class], message=e.message) for e in errors]
