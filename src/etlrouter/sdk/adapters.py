"""The generated grpclib services, implemented by delegating to a user's `Source`/`Transform`/`Sink`/`Lookup`.

All protobuf <-> Record conversion goes through `etlrouter.sdk.records`; all exception -> status mapping
goes through `_call_errors` / `_batch_errors` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar, cast

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.core import tracing
from etlrouter.sdk.errors import (
    OptionsError,
    PermanentError,
    RecordError,
    RetryableError,
    errors_to_proto,
)
from etlrouter.sdk.records import (
    OffsetOrderError,
    Record,
    copy_records,
    records_from_proto,
    records_to_proto,
    source_batch,
)
from etlrouter.sdk.services import (
    Lookup,
    LookupResult,
    Processed,
    Pulled,
    PushSource,
    Service,
    Sink,
    Source,
    Transform,
    Written,
)

log = logging.getLogger(__name__)


class CallGate:
    """Counts running data calls so a draining host can let them finish, and refuses new ones meanwhile."""

    def __init__(self) -> None:
        self.active = 0
        self.closing = False
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def call(self, method: str) -> Iterator[None]:
        if self.closing:
            raise GRPCError(Status.UNAVAILABLE, f"{method}: the service is shutting down")
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if not self.active:
                self._idle.set()

    async def close(self) -> None:
        """Refuse new calls; return when the running ones have finished."""
        self.closing = True
        await self._idle.wait()


@contextlib.contextmanager
def _call_errors(method: str) -> Iterator[None]:
    """Map user exceptions to gRPC statuses that say what the caller should do."""
    try:
        yield
    except GRPCError:
        raise
    except RetryableError as exc:
        raise GRPCError(Status.UNAVAILABLE, f"{method}: {exc}") from exc
    except OptionsError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"{method}: {exc}") from exc
    except PermanentError as exc:
        raise GRPCError(Status.FAILED_PRECONDITION, f"{method}: {exc}") from exc
    except Exception as exc:
        log.exception("unexpected error in %s", method)
        raise GRPCError(Status.INTERNAL, f"{method}: {type(exc).__name__}: {exc}") from exc


_Handler = TypeVar("_Handler", bound=Callable[..., Coroutine[Any, Any, None]])


def _gated(handler: _Handler) -> _Handler:
    """Run a data-call handler (receive, work, send) inside its adapter's CallGate."""
    name = handler.__name__

    @functools.wraps(handler)
    async def gated(self: Any, stream: Stream[Any, Any]) -> None:
        with self.gate.call(name):
            if tracing.TRACER is None:
                await handler(self, stream)
                return
            from etlrouter.sdk.tracing import server_span

            # The sidecar's traceparent (gRPC metadata): the user's own spans join the batch's trace.
            with server_span(self, name, stream.metadata or {}):
                await handler(self, stream)

    return cast(_Handler, gated)


def _whole_batch_failed(exc: PermanentError, count: int) -> list[RecordError]:
    message = str(exc) or type(exc).__name__
    return [RecordError(index, exc.error_class, message) for index in range(count)]


def _check_error_indexes(method: str, errors: list[RecordError], count: int) -> None:
    for error in errors:
        if not 0 <= error.index < count:
            raise GRPCError(
                Status.INTERNAL,
                f"{method}: the service reported an error for record index {error.index}, "
                f"but the batch has {count} records",
            )


def _check_kept(kept: list[int], records: list[Record], count: int) -> None:
    if records:
        raise GRPCError(
            Status.INTERNAL,
            f"ProcessBatch: the transform returned {len(records)} records and {len(kept)} kept indexes; "
            "Processed takes one or the other",
        )
    for index in kept:
        if not 0 <= index < count:
            raise GRPCError(
                Status.INTERNAL,
                f"ProcessBatch: the transform kept record index {index}, but the batch has {count} records",
            )


async def _capabilities(service: Service, stream: Stream[Any, Any]) -> None:
    await stream.recv_message()
    with _call_errors("GetCapabilities"):
        caps = service.capabilities.to_proto()
    await stream.send_message(records_pb2.GetCapabilitiesResponse(capabilities=caps))


class SourceAdapter(services_grpc.SourceServiceBase):
    def __init__(self, source: Source, gate: CallGate | None = None) -> None:
        self.source = source
        self.gate = gate or CallGate()

    @_gated
    async def PullRecords(
        self, stream: Stream[services_pb2.PullRecordsRequest, services_pb2.PullRecordsResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        caps = self.source.capabilities
        # 0 means "no limit given": fall back to the source's own preference, then a sane default.
        max_records = request.max_records or caps.max_batch_records or 1000
        max_bytes = request.max_bytes or caps.max_batch_bytes
        partitions = list(request.partitions)
        if request.rewind:
            with _call_errors("PullRecords"):
                await self.source.rewind()
        with _call_errors("PullRecords"):
            pulled = await self._long_pull(max_records, max_bytes, request.wait_ms, partitions)
            if len(pulled.records) > max_records:
                raise GRPCError(
                    Status.INTERNAL,
                    f"PullRecords: the source returned {len(pulled.records)} records, "
                    f"more than max_records={max_records}",
                )
            if partitions and pulled.records and pulled.partition not in partitions:
                raise GRPCError(
                    Status.INTERNAL,
                    f"PullRecords: the source returned partition {pulled.partition}, "
                    f"not one of the requested {partitions}",
                )
            response = services_pb2.PullRecordsResponse(end_of_stream=pulled.end_of_stream)
            try:
                source_batch(pulled.records, pulled.partition, into=response.batch)
            except OffsetOrderError as exc:
                raise GRPCError(Status.INTERNAL, f"PullRecords: {exc}") from exc
        await stream.send_message(response)

    async def _long_pull(
        self, max_records: int, max_bytes: int, wait_ms: int, partitions: list[int]
    ) -> Pulled:
        """The source's answer; for a source that uses notify(), an empty one is held until it notifies
        (then asked again) or wait_ms ran out (long poll, Source's docstring)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        while True:
            before = self.source.wakeup
            seen = before.generation if before is not None else None
            remaining_ms = max(0, round((deadline - loop.time()) * 1000))
            pulled = await self.source.pull(
                max_records=max_records, max_bytes=max_bytes, wait_ms=remaining_ms, partitions=partitions
            )
            wakeup = self.source.wakeup
            if pulled.records or pulled.end_of_stream or wakeup is None:
                return pulled
            if seen is None:  # the source notified for the first time during this pull: ask again
                if loop.time() >= deadline:
                    return pulled
                continue
            if not await wakeup.wait_past(seen, deadline - loop.time()):
                return pulled

    @_gated
    async def Acknowledge(
        self, stream: Stream[services_pb2.AcknowledgeRequest, services_pb2.AcknowledgeResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        with _call_errors("Acknowledge"):
            for ack in request.acks:
                await self.source.acknowledge(ack.partition, ack.up_to_offset)
        await stream.send_message(services_pb2.AcknowledgeResponse())

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await _capabilities(self.source, stream)


class PushSourceAdapter(services_grpc.SourceServiceBase):
    """What makes a push source discoverable: a SourceService whose capabilities declare push = true."""

    def __init__(self, source: PushSource) -> None:
        self.source = source

    async def PullRecords(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        raise GRPCError(
            Status.FAILED_PRECONDITION,
            "PullRecords: this is a push source (Capabilities.push): its records arrive through PushRecords",
        )

    async def Acknowledge(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        raise GRPCError(
            Status.FAILED_PRECONDITION,
            "Acknowledge: this is a push source: acks travel back on its PushRecords stream",
        )

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        caps = self.source.capabilities.to_proto()
        caps.push = True  # whatever the subclass declared: a PushSource is never pulled
        await stream.send_message(records_pb2.GetCapabilitiesResponse(capabilities=caps))


class TransformAdapter(services_grpc.TransformServiceBase):
    def __init__(self, transform: Transform, gate: CallGate | None = None) -> None:
        self.transform = transform
        self.gate = gate or CallGate()

    @_gated
    async def ProcessBatch(
        self, stream: Stream[services_pb2.ProcessBatchRequest, services_pb2.ProcessBatchResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        records = records_from_proto(request.batch.records)
        with _call_errors("ProcessBatch"):
            try:
                processed = await self.transform.process(records, dict(request.options))
            except PermanentError as exc:
                processed = Processed([], _whole_batch_failed(exc, len(records)))
            _check_error_indexes("ProcessBatch", processed.errors, len(records))
            response = services_pb2.ProcessBatchResponse(errors=errors_to_proto(processed.errors))
            kept = processed.kept
            if kept is None:
                records_to_proto(processed.records, into=response.batch.records)
                count = len(processed.records)
            else:
                _check_kept(kept, processed.records, len(records))
                copy_records(request.batch.records, kept, into=response.batch.records)
                count = len(kept)
            # The count spares the sidecar a parse of every record to learn it (services.proto).
            response.batch.header.record_count = count
        await stream.send_message(response)

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await _capabilities(self.transform, stream)


class SinkAdapter(services_grpc.SinkServiceBase):
    def __init__(self, sink: Sink, gate: CallGate | None = None) -> None:
        self.sink = sink
        self.gate = gate or CallGate()

    @_gated
    async def WriteBatch(
        self, stream: Stream[services_pb2.WriteBatchRequest, services_pb2.WriteBatchResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        records = records_from_proto(request.batch.records)
        with _call_errors("WriteBatch"):
            try:
                result = await self.sink.write(request.batch.header.batch_id, records, dict(request.options))
            except PermanentError as exc:
                result = Written(0, _whole_batch_failed(exc, len(records)))
            if result is None:
                result = Written(len(records))
            _check_error_indexes("WriteBatch", result.errors, len(records))
            if result.written + len(result.errors) > len(records):
                raise GRPCError(
                    Status.INTERNAL,
                    f"WriteBatch: the sink reported {result.written} written and {len(result.errors)} "
                    f"failed, more than the {len(records)} records of the batch",
                )
        await stream.send_message(
            services_pb2.WriteBatchResponse(written=result.written, errors=errors_to_proto(result.errors))
        )

    @_gated
    async def Flush(self, stream: Stream[services_pb2.FlushRequest, services_pb2.FlushResponse]) -> None:
        await stream.recv_message()
        with _call_errors("Flush"):
            await self.sink.flush()
        await stream.send_message(services_pb2.FlushResponse())

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await _capabilities(self.sink, stream)


def _result_to_proto(result: LookupResult | None) -> services_pb2.LookupResult:
    if result is None:
        return services_pb2.LookupResult(found=False)
    return services_pb2.LookupResult(found=True, value=result.value, fields=result.fields)


class LookupAdapter(services_grpc.LookupServiceBase):
    def __init__(self, lookup: Lookup, gate: CallGate | None = None) -> None:
        self.lookup = lookup
        self.gate = gate or CallGate()

    @_gated
    async def Lookup(self, stream: Stream[services_pb2.LookupRequest, services_pb2.LookupResponse]) -> None:
        request = await stream.recv_message()
        assert request is not None
        with _call_errors("Lookup"):
            result = await self.lookup.lookup(request.key)
        await stream.send_message(services_pb2.LookupResponse(result=_result_to_proto(result)))

    @_gated
    async def BatchLookup(
        self, stream: Stream[services_pb2.BatchLookupRequest, services_pb2.BatchLookupResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        keys = list(request.keys)
        with _call_errors("BatchLookup"):
            results = await self.lookup.batch_lookup(keys)
            if len(results) != len(keys):
                raise GRPCError(
                    Status.INTERNAL,
                    f"BatchLookup: the service returned {len(results)} results for {len(keys)} keys",
                )
        await stream.send_message(
            services_pb2.BatchLookupResponse(results=[_result_to_proto(r) for r in results])
        )

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await _capabilities(self.lookup, stream)


def grpc_handlers(service: Service, gate: CallGate | None = None) -> list[Any]:
    """The grpclib handlers for a service; a class may implement several kinds (e.g. Source and Lookup).
    Handlers sharing a `gate` can be drained together."""
    handlers: list[Any] = []
    if isinstance(service, Source):
        handlers.append(SourceAdapter(service, gate))
    if isinstance(service, PushSource):
        handlers.append(PushSourceAdapter(service))
    if isinstance(service, Transform):
        handlers.append(TransformAdapter(service, gate))
    if isinstance(service, Sink):
        handlers.append(SinkAdapter(service, gate))
    if isinstance(service, Lookup):
        handlers.append(LookupAdapter(service, gate))
    if not handlers:
        raise TypeError(
            f"{type(service).__name__} is not a Source, PushSource, Transform, Sink or Lookup "
            "from etlrouter.sdk"
        )
    return handlers
