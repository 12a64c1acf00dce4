"""The span model with the real engine in this process (two sidecars, real gRPC between them and to the SDK
services), spans caught by an in-memory exporter: parent/child links, both branches, the user services'
own spans, the DLQ write, and a redrive linked back to the batch its letters came from."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra (pip install 'etlrouter[tracing]')")

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.openmetrics.exposition import generate_latest

from etlrouter.core import tracing
from etlrouter.core.config import TracingConfig
from etlrouter.core.metrics import REGISTRY
from etlrouter.sdk import serving
from tests.sidecar.test_engine import (
    KINDS,
    LOOKUP,
    SINK,
    SOURCE,
    TRANSFORM,
    CountingSource,
    Directory,
    Poison,
    RecordingSink,
    assign,
    dag,
    sidecar,
    until,
)


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    settings = tracing.resolve(TracingConfig(endpoint="http://unused:4317", sampler="always_on"), {}, "test")
    assert tracing.setup_tracing(settings, exporter=memory)
    try:
        yield memory
    finally:
        tracing.shutdown_tracing()


def kids(span: ReadableSpan, spans: list[ReadableSpan]) -> list[ReadableSpan]:
    assert span.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == span.context.span_id]


def only(spans: list[ReadableSpan], what: str) -> ReadableSpan:
    assert len(spans) == 1, f"{what}: {[(s.name, s.kind) for s in spans]}"
    return spans[0]


async def test_a_batch_is_one_trace_through_every_hop(exporter: InMemorySpanExporter) -> None:
    total = 200
    source, transform = CountingSource(total), Poison(poison={5})
    left, right = RecordingSink("left"), RecordingSink("right")
    async with (
        serving(source) as s1,
        serving(transform) as s2,
        serving(left) as s3,
        serving(right) as s4,
        sidecar("A", {"numbers": s1.address, "double": s2.address}, KINDS) as a,
        sidecar("B", {"left": s3.address, "right": s4.address}, KINDS) as b,
    ):
        spec = dag(
            [
                ("src", SOURCE, "numbers", ["dbl"], 0),
                ("dbl", TRANSFORM, "double", ["l", "r"], 0),
                ("l", SINK, "left", [], 0),
                ("r", SINK, "right", [], 0),
            ]
        )
        where = {"src": a, "dbl": a, "l": b, "r": b}
        await b.engine.assign(1, assign(spec, where, b))
        await a.engine.assign(1, assign(spec, where, a))
        await until(lambda: source.acked == total - 1)
        await until(
            lambda: len([s for s in exporter.get_finished_spans() if s.name == "source numbers"]) == 2
        )

    spans = list(exporter.get_finished_spans())
    roots = [s for s in spans if s.name == "source numbers"]
    first = next(r for r in roots if r.attributes and r.attributes["etlrouter.batch_id"].endswith("/0-99"))
    assert first.context is not None
    trace = [s for s in spans if s.context is not None and s.context.trace_id == first.context.trace_id]
    assert first.parent is None and first.kind == SpanKind.CONSUMER
    assert first.attributes is not None
    assert first.attributes["etlrouter.pipeline"] == ("p",)
    assert first.attributes["etlrouter.records"] == 100
    calls = sorted(s.name for s in kids(first, trace) if s.kind == SpanKind.CLIENT)
    # The pull that fetched the batch, and the acknowledgement its outcome released.
    assert calls == ["etlrouter.v1.SourceService/Acknowledge", "etlrouter.v1.SourceService/PullRecords"]
    send = only([s for s in kids(first, trace) if s.kind == SpanKind.PRODUCER], "send")
    assert send.name == "send double"
    hop = only(kids(send, trace), "transform hop")
    assert hop.name == "process double" and hop.kind == SpanKind.CONSUMER
    call = only([s for s in kids(hop, trace) if s.kind == SpanKind.CLIENT], "ProcessBatch")
    assert call.attributes is not None and call.attributes["rpc.method"] == "ProcessBatch"
    served = only(kids(call, trace), "the SDK's server span")
    assert served.kind == SpanKind.SERVER and served.name == "etlrouter.v1.TransformService/ProcessBatch"
    branches = sorted(
        s.name for s in kids(hop, trace) if s.kind == SpanKind.PRODUCER and s.name != "dlq write"
    )
    assert branches == ["send left", "send right"]
    dlq = only([s for s in kids(hop, trace) if s.name == "dlq write"], "dlq write")
    assert dlq.attributes is not None and dlq.attributes["etlrouter.records"] == 1
    for branch in (s for s in kids(hop, trace) if s.name in ("send left", "send right")):
        sink_hop = only(kids(branch, trace), f"below {branch.name}")
        write = only([s for s in kids(sink_hop, trace) if s.kind == SpanKind.CLIENT], "WriteBatch")
        assert write.name == "etlrouter.v1.SinkService/WriteBatch"
        assert only(kids(write, trace), "sink server span").kind == SpanKind.SERVER
    # The batch latency histogram's exemplars name sampled batches' traces (OpenMetrics exposition).
    exposition = generate_latest(REGISTRY).decode()
    traces = {f"{r.context.trace_id:032x}" for r in roots if r.context is not None}
    exemplars = re.findall(
        r'^etlrouter_batch_seconds_bucket\{dag="dag-1",le="[^"]+",stage="src"\} \S+ '
        r'# \{trace_id="([0-9a-f]{32})"\}',
        exposition,
        re.M,
    )
    assert exemplars and set(exemplars) <= traces
    # The letter remembers where it was written: a redrive links back to it.
    letter = only(list(a.dlq.letters), "letter")
    assert dlq.context is not None
    assert letter.traceparent.startswith(f"00-{dlq.context.trace_id:032x}-{dlq.context.span_id:016x}-")
    assert tracing.is_sampled(letter.traceparent)


async def test_a_redrive_starts_a_trace_linked_to_the_original_batch(exporter: InMemorySpanExporter) -> None:
    source, transform, sink = CountingSource(50), Poison(poison={3}), RecordingSink("left")
    async with (
        serving(source) as s1,
        serving(transform) as s2,
        serving(sink) as s3,
        sidecar("A", {"numbers": s1.address, "double": s2.address, "left": s3.address}, KINDS) as a,
    ):
        spec = dag(
            [
                ("src", SOURCE, "numbers", ["dbl"], 0),
                ("dbl", TRANSFORM, "double", ["l"], 0),
                ("l", SINK, "left", [], 0),
            ]
        )
        await a.engine.assign(1, assign(spec, {"src": a, "dbl": a, "l": a}, a))
        await until(lambda: source.acked == 49)
        transform.poison.clear()
        assert await a.engine.redrive("dag-1", "dbl", a.dlq.letters) == 1
        assert 6 in sink.values

    spans = list(exporter.get_finished_spans())
    dlq = only([s for s in spans if s.name == "dlq write"], "dlq write")
    redrive = only([s for s in spans if s.name == "redrive double"], "redrive")
    assert redrive.parent is None and dlq.context is not None and redrive.context is not None
    assert redrive.context.trace_id != dlq.context.trace_id  # a new trace...
    assert [link.context.span_id for link in redrive.links] == [dlq.context.span_id]  # ...linked back
    hop = only(kids(redrive, spans), "the redriven batch's hop")
    assert hop.name == "process double"
    assert any(s.name == "send left" for s in kids(hop, spans))


async def test_with_tracing_off_a_batch_carries_no_trace_context() -> None:
    assert tracing.TRACER is None
    source, sink = CountingSource(20), RecordingSink("left")
    async with (
        serving(source) as s1,
        serving(sink) as s3,
        sidecar("A", {"numbers": s1.address, "left": s3.address}, KINDS) as a,
    ):
        spec = dag([("src", SOURCE, "numbers", ["l"], 0), ("l", SINK, "left", [], 0)])
        await a.engine.assign(1, assign(spec, {"src": a, "l": a}, a))
        await until(lambda: source.acked == 19)
        runner = a.engine.dags["dag-1"].local_runner("src")
        assert runner is not None
        # The untraced hooks are the plain ones: nothing was wrapped.
        assert (
            runner.receive == runner.handle and runner.to_branch == a.engine.dags["dag-1"].deliver_to_branch
        )


async def test_a_lookup_call_is_a_client_span_the_lookup_service_continues(
    exporter: InMemorySpanExporter,
) -> None:
    source, sink = CountingSource(30), RecordingSink("left")
    kinds = {**KINDS, "directory": "lookup"}
    async with (
        serving(source) as s1,
        serving(Directory()) as s2,
        serving(sink) as s3,
        sidecar("A", {"numbers": s1.address, "directory": s2.address, "left": s3.address}, kinds) as a,
    ):
        spec = dag(
            [
                ("src", SOURCE, "numbers", ["look"], 0),
                ("look", LOOKUP, "directory", ["l"], 0),
                ("l", SINK, "left", [], 0),
            ]
        )
        await a.engine.assign(1, assign(spec, {"src": a, "look": a, "l": a}, a))
        await until(lambda: source.acked == 29)
    spans = list(exporter.get_finished_spans())
    hop = only([s for s in spans if s.name == "process directory"], "lookup hop")
    call = only([s for s in kids(hop, spans) if s.kind == SpanKind.CLIENT], "BatchLookup")
    assert call.name == "etlrouter.v1.LookupService/BatchLookup"
    served = only(kids(call, spans), "the lookup service's span")
    assert served.kind == SpanKind.SERVER and served.name == "etlrouter.v1.LookupService/BatchLookup"
