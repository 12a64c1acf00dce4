"""Record <-> protobuf conversion and the header a source batch carries."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from etlrouter._proto.v1 import records_pb2
from etlrouter.sdk import Record, WrittenBatches, records_from_proto, records_to_proto, source_batch
from etlrouter.sdk.records import OffsetOrderError, copy_records

records_strategy = st.lists(
    st.builds(
        Record,
        key=st.binary(max_size=20),
        value=st.binary(max_size=50),
        headers=st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=3),
        event_time_ms=st.integers(min_value=-(2**63), max_value=2**63 - 1),
        offset=st.integers(min_value=0, max_value=2**64 - 1),
    ),
    max_size=20,
)


@given(records_strategy)
def test_records_round_trip_through_the_wire_format(records: list[Record]) -> None:
    encoded = records_to_proto(records).SerializeToString()
    assert records_from_proto(records_pb2.RecordList.FromString(encoded)) == records


def test_source_batch_header_describes_its_records() -> None:
    records = [
        Record(b"a", b"x" * 10, {"h": "1"}, event_time_ms=0, offset=7),  # unknown time: ignored
        Record(b"b", b"y", {}, event_time_ms=1_500, offset=9),
        Record(b"c", b"z" * 3, {}, event_time_ms=1_200, offset=12),
    ]
    batch = source_batch(records, partition=4)
    header = batch.header
    assert header.partition == 4
    assert (header.first_offset, header.last_offset) == (7, 12)
    assert (header.min_event_time_ms, header.max_event_time_ms) == (1_200, 1_500)
    assert header.record_count == 3
    assert header.byte_size == len(batch.records.SerializeToString())
    assert header.batch_id == ""  # the sidecar assigns it
    assert records_from_proto(batch.records) == records


def test_empty_source_batch_has_zero_ranges() -> None:
    header = source_batch([], partition=2).header
    assert (header.record_count, header.byte_size, header.first_offset, header.last_offset) == (0, 0, 0, 0)
    assert header.partition == 2


def test_source_batch_rejects_offsets_that_do_not_increase() -> None:
    records = [Record(offset=5), Record(offset=6), Record(offset=6)]
    with pytest.raises(
        OffsetOrderError, match="record 2 has offset 6, not greater than the previous offset 6"
    ):
        source_batch(records, partition=0)


def test_written_batches_forgets_the_oldest_beyond_capacity() -> None:
    written = WrittenBatches(capacity=2)
    for batch_id in ("a", "b", "c"):
        written.add(batch_id)
    assert "a" not in written
    assert "b" in written and "c" in written
    assert len(written) == 2


def test_written_batches_persist_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ids"
    first = WrittenBatches(path, capacity=3)
    for batch_id in ("a", "b", "c", "d"):
        first.add(batch_id)
    first.close()
    reopened = WrittenBatches(path, capacity=3)
    assert [x in reopened for x in ("a", "b", "c", "d")] == [False, True, True, True]
    # The file was compacted to what is remembered.
    assert path.read_text().split() == ["b", "c", "d"]
    with pytest.raises(ValueError, match="single line"):
        reopened.add("x\ny")
    reopened.close()


@given(records_strategy, st.lists(st.integers(min_value=0, max_value=19), max_size=25))
def test_copied_records_are_the_records_at_those_indexes(records: list[Record], picks: list[int]) -> None:
    encoded = records_to_proto(records)
    for indexes in (sorted(set(picks)), picks):  # in batch order (copy and cut), and any order
        indexes = [i % len(records) for i in indexes] if records else []
        into = records_pb2.RecordList()
        copy_records(encoded, indexes, into)
        assert records_from_proto(into) == [records[i] for i in indexes]
