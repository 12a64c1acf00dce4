"""jsonl-file source (resume after ack) and sink (idempotent by batch id, durable after Flush)."""

from __future__ import annotations

import base64
from pathlib import Path

import msgspec
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.connectors.jsonl_file_sink import CommitLog, JsonlFileSink
from etlrouter.connectors.jsonl_file_source import ERROR_HEADER, JsonlFileSource
from etlrouter.sdk import Record, records_from_proto, serving
from tests.sdk.grpc_helpers import ack, channel_to, flush, pull, write


def write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


async def test_source_offsets_are_line_numbers_and_restart_resumes_after_the_ack(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, [f'{{"n": {i}}}' if i != 3 else "" for i in range(1, 9)])  # line 3 is blank
    async with serving(JsonlFileSource(path)) as host, channel_to(host.address) as channel:
        first = await pull(channel, 3)
        second = await pull(channel, 3)
        await ack(channel, 0, first.batch.header.last_offset)
    assert [r.offset for r in records_from_proto(first.batch.records)] == [1, 2, 4]
    assert [r.value for r in records_from_proto(first.batch.records)] == [
        b'{"n": 1}',
        b'{"n": 2}',
        b'{"n": 4}',
    ]
    assert (first.batch.header.first_offset, first.batch.header.last_offset) == (1, 4)
    assert [r.offset for r in records_from_proto(second.batch.records)] == [5, 6, 7]
    assert (tmp_path / "in.jsonl.ack").read_text().strip() == "4"

    # Restart: lines 5..7 were delivered but not acknowledged, so they come again.
    async with serving(JsonlFileSource(path)) as host, channel_to(host.address) as channel:
        again = await pull(channel, 10)
        end = await pull(channel, 10)
        await ack(channel, 0, 8)
    assert [r.offset for r in records_from_proto(again.batch.records)] == [5, 6, 7, 8]
    assert end.end_of_stream and end.batch.header.record_count == 0
    async with serving(JsonlFileSource(path)) as host, channel_to(host.address) as channel:
        assert (await pull(channel, 10)).end_of_stream


async def test_source_refuses_acks_beyond_what_it_delivered(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, ["a", "b", "c"])
    async with serving(JsonlFileSource(path)) as host, channel_to(host.address) as channel:
        await pull(channel, 2)
        with pytest.raises(GRPCError) as err:
            await ack(channel, 0, 3)
    assert err.value.status == Status.FAILED_PRECONDITION
    assert "up to line 3, but only 2 lines were delivered" in str(err.value.message)


async def test_source_raw_format_extracts_key_and_event_time(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, ['{"id": "a1", "ts": 1700}', "not json", '{"id": 7, "ts": "late"}'])
    source = JsonlFileSource(path, key_field="id", event_time_field="ts")
    async with serving(source) as host, channel_to(host.address) as channel:
        records = records_from_proto((await pull(channel, 10)).batch.records)
    assert (records[0].key, records[0].event_time_ms, records[0].headers) == (b"a1", 1700, {})
    assert records[1].value == b"not json" and records[1].headers[ERROR_HEADER].startswith("line 2: ")
    assert "is not an integer" in records[2].headers[ERROR_HEADER]


async def test_source_follow_mode_waits_for_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("one\npart")
    async with serving(JsonlFileSource(path, follow=True)) as host, channel_to(host.address) as channel:
        first = await pull(channel, 10, wait_ms=50)
        empty = await pull(channel, 10, wait_ms=50)
        with path.open("a") as f:
            f.write("ial\n")
        rest = await pull(channel, 10, wait_ms=1000)
    assert [r.value for r in records_from_proto(first.batch.records)] == [b"one"]
    assert not empty.end_of_stream and empty.batch.header.record_count == 0
    assert [(r.offset, r.value) for r in records_from_proto(rest.batch.records)] == [(2, b"partial")]


RECORDS = [
    Record(b"k1", b'{"a": 1}', {"h": "x"}, 1_000, 10),
    Record(b"\xff\x00", b"\x80binary", {}, 0, 11),
]


def read_jsonl(path: Path) -> list[dict[str, object]]:
    return [msgspec.json.decode(line) for line in path.read_bytes().splitlines()]


async def test_sink_lines_and_idempotent_retry(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    async with serving(JsonlFileSink(path)) as host, channel_to(host.address) as channel:
        first = await write(channel, "b-1", RECORDS)
        retry = await write(channel, "b-1", RECORDS)
        other = await write(channel, "b-2", RECORDS[:1])
        await flush(channel)
        caps = await services_grpc.SinkServiceStub(channel).GetCapabilities(
            records_pb2.GetCapabilitiesRequest()
        )
    assert (first.written, retry.written, other.written) == (2, 2, 1)
    lines = read_jsonl(path)
    assert [line["batch_id"] for line in lines] == ["b-1", "b-1", "b-2"]
    assert lines[0] == {
        "batch_id": "b-1",
        "offset": 10,
        "event_time_ms": 1_000,
        "key": "k1",
        "value": '{"a": 1}',
        "headers": {"h": "x"},
    }
    assert base64.b64decode(str(lines[1]["key_b64"])) == b"\xff\x00"
    assert base64.b64decode(str(lines[1]["value_b64"])) == b"\x80binary"
    assert caps.capabilities.requires_flush and caps.capabilities.idempotent_writes


async def test_sink_remembers_batch_ids_across_restarts_and_drops_a_torn_batch(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text('{"pre": "existing"}\n')  # content from before the sink: kept
    async with serving(JsonlFileSink(path)) as host, channel_to(host.address) as channel:
        await write(channel, "b-1", RECORDS)
        await flush(channel)
    committed = path.read_bytes()
    # A crash in the middle of the next batch: half a batch on disk, no commit entry.
    with path.open("ab") as f:
        f.write(b'{"batch_id": "b-2", "offset": 12}\n{"batch_id": "b-2", "off')
    async with serving(JsonlFileSink(path)) as host, channel_to(host.address) as channel:
        assert path.read_bytes() == committed  # the torn batch was cut off at start
        retry_old = await write(channel, "b-1", RECORDS)
        retry_torn = await write(channel, "b-2", RECORDS[:1])
        await flush(channel)
    assert (retry_old.written, retry_torn.written) == (2, 1)
    lines = read_jsonl(path)
    assert lines[0] == {"pre": "existing"}
    assert [line["batch_id"] for line in lines[1:]] == ["b-1", "b-1", "b-2"]


def test_commit_log_recovery_ignores_torn_and_dangling_entries() -> None:
    lines = ["\t10", "a\t20", "b\t35", "c\t99", "d\t3"]  # c points past the data; the "e" entry below is torn
    ends, committed = CommitLog.recover([*lines, "e\t4"[:2]], data_size=40, capacity=10)
    assert list(ends) == ["a", "b", "d"]
    assert committed == 35
    ends, _ = CommitLog.recover(lines, data_size=40, capacity=2)
    assert list(ends) == ["b", "d"]


async def test_sink_data_is_durable_after_flush_in_another_reader(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    sink = JsonlFileSink(path)
    async with serving(sink) as host, channel_to(host.address) as channel:
        await write(channel, "b-1", RECORDS)
        await flush(channel)
        # Read through an independent file handle while the sink is still running.
        assert [line["batch_id"] for line in read_jsonl(path)] == ["b-1", "b-1"]
        assert (tmp_path / "out.jsonl.batches").read_text().splitlines()[-1] == f"b-1\t{path.stat().st_size}"


async def test_sink_output_replays_through_the_source_record_format(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    async with serving(JsonlFileSink(path)) as host, channel_to(host.address) as channel:
        await write(channel, "b-1", RECORDS)
        await flush(channel)
    async with serving(JsonlFileSource(path, fmt="record")) as host, channel_to(host.address) as channel:
        replayed = records_from_proto((await pull(channel, 10)).batch.records)
    assert [(r.key, r.value, r.headers, r.event_time_ms) for r in replayed] == [
        (r.key, r.value, r.headers, r.event_time_ms) for r in RECORDS
    ]
    assert [r.offset for r in replayed] == [1, 2]  # offsets are the replayed file's line numbers


async def pull_rewound(channel: Channel, max_records: int) -> services_pb2.PullRecordsResponse:
    """PullRecords as a new sidecar session sends it: rewind first."""
    request = services_pb2.PullRecordsRequest(max_records=max_records, rewind=True)
    return await services_grpc.SourceServiceStub(channel).PullRecords(request)


async def test_source_rewind_redelivers_from_the_line_after_the_last_ack(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, ["a", "b", "", "d", "e", "f", "g"])  # line 3 is blank
    async with serving(JsonlFileSource(path)) as host, channel_to(host.address) as channel:
        first = await pull(channel, 2)  # lines 1, 2
        await pull(channel, 2)  # lines 4, 5
        await ack(channel, 0, first.batch.header.last_offset)
        again = await pull_rewound(channel, 10)
        await ack(channel, 0, 6)
        # A rewind with nothing new acknowledged starts at the same place again.
        once_more = await pull_rewound(channel, 1)
    assert [r.offset for r in records_from_proto(again.batch.records)] == [4, 5, 6, 7]
    assert [r.value for r in records_from_proto(again.batch.records)] == [b"d", b"e", b"f", b"g"]
    assert [r.offset for r in records_from_proto(once_more.batch.records)] == [7]
    assert (tmp_path / "in.jsonl.ack").read_text().strip() == "6"


async def test_source_a_late_ack_after_a_rewind_skips_what_it_covers(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    write_lines(path, [str(i) for i in range(1, 9)])
    async with serving(JsonlFileSource(path)) as host, channel_to(host.address) as channel:
        await pull(channel, 3)  # lines 1..3
        await pull(channel, 3)  # lines 4..6
        rewound = await pull_rewound(channel, 1)  # line 1 again
        await ack(channel, 0, 5)  # the old session's ack arrives late: lines 1..5 are done
        rest = await pull(channel, 10)
    assert [r.offset for r in records_from_proto(rewound.batch.records)] == [1]
    assert [r.offset for r in records_from_proto(rest.batch.records)] == [6, 7, 8]
