"""The http_ingest connector's pure part: bodies into records, and errors that name the line."""

from __future__ import annotations

import json

import pytest

from etlrouter._proto.v1 import records_pb2
from etlrouter.connectors.http_ingest import IngestConfig, IngestError, parse_body, with_trace_context
from etlrouter.sdk.records import source_batch
from etlrouter.sidecar.push import batch_problem

NOW = 1_700_000_000_000


def test_json_lines_keep_each_line_as_the_value_with_key_and_event_time_fields() -> None:
    config = IngestConfig(key_field="user", event_time_field="ts")
    body = b'{"user": "a", "ts": 5}\n\n  {"user": 7}\r\n"plain"\n'
    records = parse_body(body, config, NOW)
    assert [r.value for r in records] == [b'{"user": "a", "ts": 5}', b'{"user": 7}', b'"plain"']
    assert [r.key for r in records] == [b"a", b"7", b""]
    assert [r.event_time_ms for r in records] == [5, NOW, NOW]


def test_a_json_array_becomes_one_record_per_element() -> None:
    records = parse_body(b' [{"a": 1}, 2, "x"]', IngestConfig(), NOW)
    assert [json.loads(r.value) for r in records] == [{"a": 1}, 2, "x"]


def test_bad_json_lines_are_named_by_line_number() -> None:
    with pytest.raises(IngestError) as err:
        parse_body(b'{"ok": 1}\n{"bad": }\n{"ok": 2}\nnope\n', IngestConfig(), NOW)
    assert str(err.value).startswith("line 2: invalid JSON") and "; line 4: invalid JSON" in str(err.value)


def test_a_bad_json_array_is_named_by_line_and_column() -> None:
    with pytest.raises(IngestError, match=r"^line 3, column 9: invalid JSON array"):
        parse_body(b'[\n  {"a": 1},\n  {"b": }\n]', IngestConfig(), NOW)


def test_more_records_than_allowed_are_refused() -> None:
    config = IngestConfig(max_records=3)
    with pytest.raises(IngestError, match="at most 3 per request"):
        parse_body(b"1\n2\n3\n4\n", config, NOW)
    with pytest.raises(IngestError, match="4 records, at most 3 per request"):
        parse_body(b"[1, 2, 3, 4]", config, NOW)


def test_the_sidecar_refuses_pushed_batches_that_cannot_be_routed() -> None:
    batch = records_pb2.RawRecordBatch()
    assert batch_problem(batch, 0) == "the batch holds no records"
    batch.header.first_offset, batch.header.last_offset, batch.header.record_count = 10, 12, 3
    assert batch_problem(batch, 3) == ""
    assert "the header says 3 records, the batch holds 2" in batch_problem(batch, 2)
    batch.header.record_count = 0
    assert "cannot hold 4 records" in batch_problem(batch, 4)
    batch.header.last_offset = 9
    assert "below first_offset" in batch_problem(batch, 3)


def test_a_request_with_trace_context_hands_it_to_its_records_and_their_batch() -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    records = parse_body(b'{"a": 1}\n{"a": 2}\n', IngestConfig(), NOW)
    traced = with_trace_context(records, {"traceparent": traceparent, "tracestate": "k=v", "x-other": "1"})
    assert [r.headers for r in traced] == [{"traceparent": traceparent, "tracestate": "k=v"}] * 2
    for i, r in enumerate(traced):
        r.offset = i
    header = source_batch(traced, 0).header
    assert (header.traceparent, header.tracestate) == (traceparent, "k=v")  # the batch continues it
    untraced = with_trace_context(parse_body(b'{"a": 1}\n', IngestConfig(), NOW), {"x-other": "1"})
    assert untraced[0].headers == {}
