"""One sampled batch, one trace, every hop: 3 routers, source -> transform -> two sinks across three
sidecars, each a process of its own, exporting to an OTLP receiver this test runs (tests/observability/
otlp.py). The transform and one sink are SDK services; the other sink is a grpcio service with
OpenTelemetry's gRPC instrumentation. Both continue the sidecar's trace from the gRPC metadata."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.processes import Processes, connector, jsonl_offsets, ready, sidecar, wait_until
from tests.e2e.test_dlq_ctl import ctl
from tests.e2e.test_interop import sink_lines
from tests.e2e.test_pipeline import apply
from tests.integration.cluster import RouterProcesses

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra (pip install 'etlrouter[tracing]')")

from tests.observability.otlp import Receiver, Span, by_trace

TOTAL = 300
PIPELINES = """
pipeline to-left  { source orders | transform clean (config.expr = "true") | sink left }
pipeline to-right { source orders | transform clean (config.expr = "true") | sink right }
"""
GRPCIO_SERVICE = Path(__file__).with_name("otel_grpcio_service.py")


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """The receiver, and every process the test starts pointed at it (the standard OTEL_* variables)."""
    r = Receiver()
    port = r.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export every 200 ms, not every 5 s
    try:
        yield r
    finally:
        r.stop()


def children(span: Span, spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.parent_id == span.span_id]


def one(spans: list[Span], what: str) -> Span:
    assert len(spans) == 1, f"expected one {what}, got {[(s.name, s.kind, s.service) for s in spans]}"
    return spans[0]


def instance(span: Span) -> str:
    return str(span.resource.get("service.instance.id", ""))


def check_trace(spans: list[Span]) -> None:
    """The span tree of one batch, hop by hop; AssertionError naming the first missing piece."""
    root = one([s for s in spans if s.name == "source orders" and not s.parent_id], "root")
    assert (root.kind, instance(root)) == ("CONSUMER", "sc-src")
    batch_id = root.attributes["etlrouter.batch_id"]
    assert set(root.attributes["etlrouter.pipeline"]) == {"to-left", "to-right"}
    assert root.attributes["messaging.system"] == "etlrouter"
    assert root.attributes["etlrouter.records"] > 0
    pull = one([s for s in children(root, spans) if s.name.endswith("/PullRecords")], "pull")
    assert pull.kind == "CLIENT"
    assert pull.attributes["rpc.system"] == "grpc" and pull.attributes["rpc.method"] == "PullRecords"

    to_mid = one([s for s in children(root, spans) if s.kind == "PRODUCER"], "send to the transform")
    mid = one(children(to_mid, spans), "transform hop")
    assert (mid.kind, instance(mid), mid.attributes["etlrouter.batch_id"]) == ("CONSUMER", "sc-mid", batch_id)
    call = one([s for s in children(mid, spans) if s.kind == "CLIENT"], "ProcessBatch call")
    assert call.name == "etlrouter.v1.TransformService/ProcessBatch"
    served = one(children(call, spans), "the transform's own span")
    assert (served.kind, served.service, served.name) == (
        "SERVER",
        "clean",
        "etlrouter.v1.TransformService/ProcessBatch",
    )

    sends = [s for s in children(mid, spans) if s.kind == "PRODUCER"]
    assert len(sends) == 2, f"both fan-out branches: {[s.name for s in sends]}"
    sinks = {}
    for send in sends:
        hop = one(children(send, spans), f"hop below {send.name}")
        assert (hop.kind, instance(hop)) == ("CONSUMER", "sc-sink")
        assert hop.attributes["etlrouter.stage"] == send.attributes["messaging.destination.name"]
        write = one([s for s in children(hop, spans) if s.name.endswith("/WriteBatch")], "WriteBatch call")
        assert write.kind == "CLIENT" and write.attributes["rpc.service"] == "etlrouter.v1.SinkService"
        server = one(children(write, spans), f"the sink's own span below {hop.name}")
        assert server.kind == "SERVER" and server.name.endswith("etlrouter.v1.SinkService/WriteBatch")
        sinks[server.service] = server
    assert set(sinks) == {"left", "g-right"}, sinks
    # The grpcio instrumentation's own conventions: it continued the trace, in its own process.
    assert sinks["g-right"].attributes.get("rpc.system") == "grpc"


def complete_traces(receiver: Receiver) -> list[str]:
    done = []
    for trace_id, spans in by_trace(receiver.spans()).items():
        try:
            check_trace(spans)
        except (AssertionError, KeyError):
            continue
        done.append(trace_id)
    return done


def explain(receiver: Receiver) -> str:
    traces = by_trace(receiver.spans())
    lines = [f"{len(traces)} traces"]
    batches = [spans for spans in traces.values() if any(s.name == "source orders" for s in spans)]
    for spans in batches[:2]:
        try:
            check_trace(spans)
        except (AssertionError, KeyError) as e:
            lines.append(f"  {e!r}")
        for s in sorted(spans, key=lambda s: s.start_ns):
            lines.append(f"    {s.span_id} <- {s.parent_id or '-':16} {s.kind:9} {s.service:18} {s.name}")
    return "\n".join(lines)


def test_a_batch_is_one_trace_across_every_hop_and_both_branches(
    system: tuple[RouterProcesses, Processes, Path], receiver: Receiver
) -> None:
    routers, procs, tmp = system
    state, left, right = tmp / "generator.state", tmp / "left.jsonl", tmp / "right.jsonl"
    src = connector(procs, "orders", "generator", "--limit", str(TOTAL), "--state-file", str(state))
    mid = connector(procs, "clean", "filter")
    sink_l = connector(procs, "left", "jsonl_file_sink", "--path", str(left))
    sink_r = free_port()
    procs.start(
        "g-right",
        [str(GRPCIO_SERVICE), "sink", "--name", "g-right", "--port", str(sink_r), "--path", str(right)],
    )
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [sink_l, sink_r]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, PIPELINES.replace("sink right", "sink g-right"))
    wait_until(
        lambda: (
            len(set(jsonl_offsets(left))) == TOTAL and len({r["offset"] for r in sink_lines(right)}) == TOTAL
        ),
        60,
        f"{TOTAL} records in both sinks",
    )
    try:
        wait_until(lambda: complete_traces(receiver), 30, "one batch's complete trace at the receiver")
    except TimeoutError:
        raise AssertionError(explain(receiver)) from None
    # Every batch was sampled (always on): each is one trace, none split or merged.
    roots = [s for s in receiver.spans() if s.name == "source orders"]
    assert len({s.trace_id for s in roots}) == len(roots)
    for name in ("sc-src", "sc-mid", "sc-sink"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]


def test_a_redriven_dead_letter_starts_a_trace_linked_to_its_original_batch(
    system: tuple[RouterProcesses, Processes, Path], receiver: Receiver
) -> None:
    routers, procs, tmp = system
    total, poison = 300, {0, 100, 200}  # the guard divides by zero on these offsets: permanent errors
    state, out = tmp / "generator.state", tmp / "out.jsonl"
    src = connector(
        procs, "orders", "generator", "--limit", str(total), "--rate", "400", "--state-file", str(state)
    )
    mid = connector(procs, "guard", "filter", "--expr", "1 / (offset % 100) > 0")
    sink = connector(procs, "out", "jsonl_file_sink", "--path", str(out))
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [sink]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, "pipeline guarded { source orders (batch_size = 50) | transform guard | sink out }\n")
    wait_until(
        lambda: len(set(jsonl_offsets(out))) == total - len(poison), 60, "the good records in the sink"
    )

    def dlq_writes() -> list[Span]:
        return [s for s in receiver.spans() if s.name == "dlq write"]

    wait_until(lambda: len(dlq_writes()) == len(poison), 30, "the DLQ writes' spans")
    procs.kill("guard")  # the fix: the transform comes back with a safe expression, same port
    procs.start(
        "guard",
        ["-m", "etlrouter.connectors.filter", "--name", "guard", "--port", str(mid), "--expr", "true"],
    )
    wait_until(
        lambda: ctl(routers, "dlq", "redrive", "--pipeline", "guarded").returncode == 0, 30, "a redrive"
    )
    wait_until(lambda: set(jsonl_offsets(out)) == set(range(total)), 30, "the redriven records in the sink")

    def redrives() -> list[Span]:
        return [s for s in receiver.spans() if s.name == "redrive guard"]

    wait_until(redrives, 30, "the redrive's span")
    writes = {(s.trace_id, s.span_id): s for s in dlq_writes()}
    for redrive in redrives():
        assert not redrive.parent_id and redrive.trace_id not in {t for t, _ in writes}  # a new trace...
        assert redrive.links and set(redrive.links) <= set(writes)  # ...linked to the original DLQ writes
    linked = {link for r in redrives() for link in r.links}
    assert linked == set(writes)  # every letter's original batch
    # The redriven records travel in the redrive's trace, through the fixed transform down to the sink.
    redrive_trace = redrives()[0].trace_id

    def names() -> set[str]:
        return {s.name for s in by_trace(receiver.spans())[redrive_trace]}

    wait_until(lambda: {"process guard", "process out"} <= names(), 30, "the redriven batch's hops")
