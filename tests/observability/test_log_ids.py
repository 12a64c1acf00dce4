"""JSON log lines name the span that was current when they were logged."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the tracing extra (pip install 'etlrouter[tracing]')")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from etlrouter.core import tracing
from etlrouter.core.config import TracingConfig
from etlrouter.core.logging import JsonFormatter


@pytest.fixture
def traced() -> Iterator[None]:
    settings = tracing.resolve(TracingConfig(endpoint="http://unused:4317"), {}, "test")
    tracing.setup_tracing(settings, exporter=InMemorySpanExporter())
    try:
        yield
    finally:
        tracing.shutdown_tracing()


def line(message: str) -> dict[str, object]:
    record = logging.makeLogRecord({"msg": message, "levelname": "INFO", "name": "t"})
    return dict(json.loads(JsonFormatter("sidecar").format(record)))


def test_a_line_inside_a_span_carries_its_ids(traced: None) -> None:
    assert tracing.TRACER is not None
    with tracing.TRACER.start_as_current_span("work") as span:
        entry = line("inside")
    context = span.get_span_context()
    assert entry["trace_id"] == f"{context.trace_id:032x}" and entry["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in line("outside")


def test_without_tracing_lines_have_no_ids() -> None:
    assert tracing.TRACER is None
    assert "trace_id" not in line("plain")
