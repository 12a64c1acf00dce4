"""The sidecar's spans (docs/observability.md, "Span model"). Imported only when tracing is on.

`instrument(runner)` swaps a stage runner's hooks for traced ones when the runner starts, so a sidecar
without tracing runs exactly the code it ran before. Per sampled batch:

    source <service>               CONSUMER  the batch's root at the source sidecar, pull to last ack
      etlrouter.v1.SourceService/PullRecords   CLIENT (timed by the pull, recorded after it)
      send <child's service>       PRODUCER  one per branch; its context travels in the batch header;
                                             events: credits.waited, delivery.retry
        process <service>          CONSUMER  the next hop (this or another sidecar)
          etlrouter.v1.TransformService/ProcessBatch   CLIENT, traceparent in the gRPC metadata
          send <grandchild> ...
          dlq write                PRODUCER  letters carry its traceparent
    redrive <service>              PRODUCER  a new trace, linked to the letters' original traces

Span names use service names (stage ids are generated hashes); the stage ids are attributes.

Hops follow the source's sampling decision: a batch whose header carries no sampled traceparent gets no
spans downstream (the receiving side tests one flag).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.exceptions import GRPCError
from grpclib.metadata import _MetadataLike
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from etlrouter._proto.v1 import dataplane_pb2, records_pb2
from etlrouter.core import tracing
from etlrouter.sidecar.model import BatchResult
from etlrouter.sidecar.wire import ServiceClient

if TYPE_CHECKING:
    from etlrouter.sidecar.source import SourceRunner
    from etlrouter.sidecar.stages import StageRunner

Attributes = dict[str, Any]
MESSAGING_SYSTEM = "etlrouter"


def _tracer() -> trace.Tracer:
    tracer = tracing.TRACER
    assert tracer is not None, "sidecar.tracing is used only once tracing is set up"
    return tracer


def context_of(header: records_pb2.BatchHeader) -> Context:
    carrier = {tracing.TRACEPARENT: header.traceparent}
    if header.tracestate:
        carrier[tracing.TRACESTATE] = header.tracestate
    return propagate.extract(carrier)


def current_carrier() -> dict[str, str]:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def stamped(batch: records_pb2.RawRecordBatch) -> records_pb2.RawRecordBatch:
    """A copy of the batch whose header carries the current span's context (the original may be on its
    way down a sibling branch, stamped with that branch's span)."""
    out = records_pb2.RawRecordBatch(records=batch.records)
    out.header.CopyFrom(batch.header)
    carrier = current_carrier()
    out.header.traceparent = carrier.get(tracing.TRACEPARENT, "")
    out.header.tracestate = carrier.get(tracing.TRACESTATE, "")
    return out


def batch_attributes(runner: StageRunner, header: records_pb2.BatchHeader) -> Attributes:
    return {
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.batch.message_count": header.record_count,
        "messaging.message.id": header.batch_id,
        "etlrouter.pipeline": list(runner.stage.pipelines),
        "etlrouter.dag": runner.host.dag_id,
        "etlrouter.stage": runner.stage.id,
        "etlrouter.replica": runner.replica,
        "etlrouter.batch_id": header.batch_id,
        "etlrouter.records": header.record_count,
        "etlrouter.bytes": header.byte_size,
        "etlrouter.attempt": header.attempt,
        "etlrouter.source": header.source_id,
        "etlrouter.partition": header.partition,
    }


def _note_result(span: trace.Span, result: BatchResult) -> None:
    span.set_attribute("etlrouter.done", result.done)
    if result.dead_lettered:
        span.set_attribute("etlrouter.dead_lettered", result.dead_lettered)
    if not result.done:
        span.set_status(Status(StatusCode.ERROR, result.error))


class TracedMethod(UnaryUnaryMethod[Any, Any]):
    """A unary call to the local user service as a CLIENT span (rpc.* conventions) whose context goes to
    the service in the `traceparent` metadata; untraced when no batch span is current."""

    def __init__(self, channel: Channel, name: str, request_type: Any, reply_type: Any) -> None:
        super().__init__(channel, name, request_type, reply_type)
        self.span_name = name.strip("/")
        self.rpc_service, _, self.rpc_method = self.span_name.partition("/")
        self.server_address = str(getattr(channel, "_host", ""))
        self.server_port = int(getattr(channel, "_port", 0) or 0)
        # (start, end) of the last call, in ns: a source's pull is timed before its batch has a span.
        self.last_call_ns = (0, 0)

    async def __call__(
        self, message: Any, *, timeout: float | None = None, metadata: _MetadataLike | None = None
    ) -> Any:
        if not trace.get_current_span().is_recording():
            started = time.time_ns()
            reply = await super().__call__(message, timeout=timeout, metadata=metadata)
            self.last_call_ns = (started, time.time_ns())
            return reply
        attributes: Attributes = {
            "rpc.system": "grpc",
            "rpc.service": self.rpc_service,
            "rpc.method": self.rpc_method,
            "server.address": self.server_address,
            "server.port": self.server_port,
        }
        with _tracer().start_as_current_span(
            self.span_name, kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            pairs: list[tuple[str, str | bytes]] = [
                *(metadata.items() if isinstance(metadata, dict) else metadata or ()),
                *current_carrier().items(),
            ]
            try:
                reply = await super().__call__(message, timeout=timeout, metadata=pairs)
            except GRPCError as e:
                span.set_attribute("rpc.grpc.status_code", e.status.value)
                raise
            span.set_attribute("rpc.grpc.status_code", 0)
            return reply


class TracedServiceClient(ServiceClient):
    def __init__(self, channel: Channel) -> None:
        super().__init__(channel, TracedMethod)


# -- the runner hooks --------------------------------------------------------------------------------------


def instrument(runner: StageRunner) -> None:
    """Replace the runner's hooks by traced ones (called once, when the runner is built)."""
    runner.client = TracedServiceClient(runner.client.channel)
    runner.receive = traced_receive(runner, runner.handle)
    runner.to_branch = traced_branch(runner, runner.to_branch)
    runner.put_dead_letters = traced_dead_letters(runner, runner.put_dead_letters)


def traced_receive(
    runner: StageRunner, handle: Callable[[records_pb2.RawRecordBatch], Awaitable[BatchResult]]
) -> Callable[[records_pb2.RawRecordBatch], Awaitable[BatchResult]]:
    name = f"process {runner.stage.service}"  # span names by service: stage ids are hashes

    async def receive(batch: records_pb2.RawRecordBatch) -> BatchResult:
        header = batch.header
        if not tracing.is_sampled(header.traceparent):
            return await handle(batch)
        attributes = batch_attributes(runner, header)
        attributes["messaging.operation.type"] = "process"
        attributes["messaging.destination.name"] = runner.stage.id
        with _tracer().start_as_current_span(
            name, context=context_of(header), kind=SpanKind.CONSUMER, attributes=attributes
        ) as span:
            result = await handle(batch)
            _note_result(span, result)
            return result

    return receive


BranchDelivery = Callable[..., Awaitable[BatchResult]]


def traced_branch(runner: StageRunner, deliver: BranchDelivery) -> BranchDelivery:
    async def to_branch(
        from_stage: str, child: str, batch: records_pb2.RawRecordBatch, rng: Any, may_shed: bool = True
    ) -> BatchResult:
        if not trace.get_current_span().is_recording():
            return await deliver(from_stage, child, batch, rng, may_shed)
        attributes: Attributes = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": child,
            "messaging.batch.message_count": batch.header.record_count,
            "etlrouter.stage": from_stage,
            "etlrouter.to_stage": child,
            "etlrouter.batch_id": batch.header.batch_id,
            "etlrouter.records": batch.header.record_count,
        }
        spec = runner.host.stage_spec(child)
        name = f"send {spec.service if spec is not None else child}"
        with _tracer().start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as span:
            result = await deliver(from_stage, child, stamped(batch), rng, may_shed)
            _note_result(span, result)
            return result

    return to_branch


DeadLetterPut = Callable[[Sequence[dataplane_pb2.DeadLetter], str], Awaitable[None]]


def traced_dead_letters(runner: StageRunner, put: DeadLetterPut) -> DeadLetterPut:
    async def put_traced(letters: Sequence[dataplane_pb2.DeadLetter], dlq_sink: str = "") -> None:
        if not trace.get_current_span().is_recording() or not letters:
            await put(letters, dlq_sink)
            return
        attributes: Attributes = {
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "send",
            "messaging.destination.name": dlq_sink or "dlq",
            "messaging.batch.message_count": len(letters),
            "etlrouter.dag": runner.host.dag_id,
            "etlrouter.stage": letters[0].stage_id,
            "etlrouter.batch_id": letters[0].batch_id,
            "etlrouter.records": len(letters),
            "etlrouter.dlq.reason": letters[0].reason,
            "etlrouter.dlq.sink": dlq_sink,
        }
        with _tracer().start_as_current_span("dlq write", kind=SpanKind.PRODUCER, attributes=attributes):
            traceparent = current_carrier().get(tracing.TRACEPARENT, "")
            for letter in letters:
                letter.traceparent = traceparent
            await put(letters, dlq_sink)

    return put_traced


SourceDelivery = Callable[[records_pb2.RawRecordBatch, bool], Coroutine[Any, Any, None]]


def traced_source_delivery(runner: SourceRunner) -> SourceDelivery:
    """The batch's root span, from the pull that fetched it to the last branch's outcome; continues the
    trace the source put in the header (records that arrived with a traceparent)."""
    name = f"source {runner.stage.service}"
    pull = runner.client.pull

    def start(batch: records_pb2.RawRecordBatch, slot_held: bool) -> Coroutine[Any, Any, None]:
        # Read now: the next pull may finish before this delivery's coroutine first runs.
        pulled = pull.last_call_ns if isinstance(pull, TracedMethod) and not runner.push_mode else None
        return deliver(batch, slot_held, pulled)

    async def deliver(
        batch: records_pb2.RawRecordBatch, slot_held: bool, pulled: tuple[int, int] | None
    ) -> None:
        header = batch.header
        parent = context_of(header) if header.traceparent else None
        attributes = batch_attributes(runner, header)
        attributes["messaging.operation.type"] = "receive"
        attributes["messaging.destination.name"] = runner.stage.service
        start_time = pulled[0] if pulled and pulled[0] else None
        tracer = _tracer()
        with tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes, start_time=start_time
        ) as span:
            exemplar = None
            if span.is_recording():
                if start_time is not None and pulled is not None:
                    assert isinstance(pull, TracedMethod)
                    call = tracer.start_span(
                        pull.span_name,
                        kind=SpanKind.CLIENT,
                        start_time=pulled[0],
                        attributes={
                            "rpc.system": "grpc",
                            "rpc.service": pull.rpc_service,
                            "rpc.method": pull.rpc_method,
                            "server.address": pull.server_address,
                            "server.port": pull.server_port,
                            "rpc.grpc.status_code": 0,
                        },
                    )
                    call.end(end_time=pulled[1])
                exemplar = {"trace_id": f"{span.get_span_context().trace_id:032x}"}
            await runner._deliver(batch, slot_held, exemplar)

    return start


async def traced_redrive(
    runner_attributes: Attributes,
    stage_id: str,
    service: str,
    letters: Sequence[dataplane_pb2.DeadLetter],
    batch: records_pb2.RawRecordBatch,
    send: Callable[[records_pb2.RawRecordBatch], Awaitable[BatchResult]],
) -> BatchResult:
    """A redrive starts a new trace (an operator's action, not the original flow) linked to the trace of
    every distinct batch its letters came from."""
    links = []
    seen: set[str] = set()
    for letter in letters:
        if letter.traceparent and letter.traceparent not in seen:
            seen.add(letter.traceparent)
            context = trace.get_current_span(propagate.extract({tracing.TRACEPARENT: letter.traceparent}))
            links.append(Link(context.get_span_context(), {"etlrouter.dead_letter": letter.id}))
    attributes = {
        **runner_attributes,
        "messaging.system": MESSAGING_SYSTEM,
        "messaging.operation.type": "send",
        "messaging.destination.name": stage_id,
        "etlrouter.to_stage": stage_id,
        "etlrouter.batch_id": batch.header.batch_id,
        "etlrouter.records": len(letters),
    }
    with _tracer().start_as_current_span(
        f"redrive {service}", context=Context(), kind=SpanKind.PRODUCER, links=links, attributes=attributes
    ) as span:
        carrier = current_carrier()
        batch.header.traceparent = carrier.get(tracing.TRACEPARENT, "")
        batch.header.tracestate = carrier.get(tracing.TRACESTATE, "")
        result = await send(batch)
        _note_result(span, result)
        return result
