"""The pure parts of the kit: the exit code, the text, JUnit XML, and the judgements of answers."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from etlrouter._proto.v1 import records_pb2, services_pb2
from etlrouter.conformance import judge
from etlrouter.conformance.model import Report, Result, Status, fail, format_report, junit_xml, ok, skip, warn


def batch(
    partition: int, offsets: list[int], first: int | None = None, last: int | None = None
) -> records_pb2.RecordBatch:
    b = records_pb2.RecordBatch()
    for o in offsets:
        b.records.records.add(key=b"k", value=b"v", offset=o)
    b.header.partition = partition
    if offsets:
        b.header.first_offset = offsets[0] if first is None else first
        b.header.last_offset = offsets[-1] if last is None else last
    b.header.record_count = len(offsets)
    return b


def test_exit_code_counts_required_failures_only() -> None:
    report = Report(address="x:1", results=[ok("a", "e"), warn("b", "e", "g"), skip("c", "why")])
    assert report.exit_code == 0
    report.add(Result(check="d", status=Status.FAIL, expected="e", got="g", required=False))
    assert report.exit_code == 0
    report.add(fail("e", "expected this", "got that"))
    assert report.exit_code == 1
    assert Report(address="x:1").exit_code == 1  # nothing checked is not a pass


def test_lines_say_expected_and_got() -> None:
    report = Report(
        address="h:1",
        kinds=["sink"],
        results=[ok("sink.flush", "Flush answers OK"), fail("sink.write", "OK", "INTERNAL")],
    )
    lines = format_report(report)
    assert lines[0] == "etlrouter conformance h:1: sink"
    assert lines[1].startswith("PASS  sink.flush") and "Flush answers OK" in lines[1]
    assert lines[2].startswith("FAIL  sink.write") and "expected: OK; got: INTERNAL" in lines[2]
    assert lines[-1] == "NOT conformant: 1 PASS, 1 FAIL"


def test_junit_has_a_case_per_check() -> None:
    report = Report(
        address="h:1",
        results=[
            ok("health", "SERVING"),
            fail("source.rewind", "offset 5", "offset 9"),
            skip("x.y", "n/a"),
            warn("w.z", "e", "g"),
        ],
    )
    suite = ET.fromstring(junit_xml(report))
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "1", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    failure = cases["source.rewind"].find("failure")
    assert failure is not None and "expected: offset 5; got: offset 9" in (failure.get("message") or "")
    assert cases["source.rewind"].get("classname") == "etlrouter.conformance.source"
    assert cases["x.y"].find("skipped") is not None
    assert cases["health"].find("failure") is None and cases["w.z"].find("system-out") is not None


def test_source_batch_judgement() -> None:
    assert judge.source_batch_problems(batch(0, [3, 4, 5]), 1, []) == []
    assert "offset 4 after 5" in judge.source_batch_problems(batch(0, [5, 4]), 1, [])[0]
    assert "declares 2" in judge.source_batch_problems(batch(2, [1]), 2, [])[0]
    assert "not one of the requested" in judge.source_batch_problems(batch(1, [1]), 2, [0])[0]
    assert "header offsets" in judge.source_batch_problems(batch(0, [1, 2], last=7), 1, [])[0]
    assert judge.source_batch_problems(batch(0, []), 1, []) == []


def test_offsets_across_pulls() -> None:
    assert judge.across_batches_problems([batch(0, [1, 2]), batch(1, [1]), batch(0, [3])]) == []
    assert "starts at offset 2" in judge.across_batches_problems([batch(0, [1, 2]), batch(0, [2, 3])])[0]


def test_size_limits_allow_one_oversized_record() -> None:
    big = records_pb2.RecordBatch()
    big.records.records.add(value=b"x" * 5000)
    assert judge.size_problems(big, 10, 100) == []
    two = records_pb2.RecordBatch()
    for _ in range(2):
        two.records.records.add(value=b"x" * 5000)
    assert judge.size_problems(two, 10, 100)
    assert judge.size_problems(batch(0, [1, 2, 3]), 2, 0) == ["3 records for max_records=2"]


def test_error_indexes_and_one_to_one() -> None:
    errors = [
        records_pb2.RecordError(index=i, error_class=records_pb2.ERROR_CLASS_PERMANENT) for i in (1, 1, 9)
    ]
    problems = judge.error_index_problems(errors, 3)
    assert any("indexes [9]" in p for p in problems) and any("several errors" in p for p in problems)
    inputs = batch(0, [10, 11, 12]).records.records
    reply = services_pb2.ProcessBatchResponse()
    reply.errors.add(index=1, error_class=records_pb2.ERROR_CLASS_PERMANENT)
    for o in (10, 12):
        reply.batch.records.records.add(offset=o)
    assert judge.one_to_one_problems(inputs, reply) == []
    assert judge.record_count_problems(reply.batch) == []  # not said
    reply.batch.header.record_count = 2
    assert judge.record_count_problems(reply.batch) == []
    reply.batch.header.record_count = 3
    assert judge.record_count_problems(reply.batch) == ["header.record_count is 3, the batch holds 2 records"]
    reply.batch.records.records[0].offset, reply.batch.records.records[1].offset = 12, 10
    assert judge.one_to_one_problems(inputs, reply) == [
        "outputs are not in input order (their offsets differ from the inputs')"
    ]


def test_lookup_agreement() -> None:
    hit = services_pb2.LookupResult(found=True, value=b"v")
    miss = services_pb2.LookupResult(found=False)
    assert judge.lookup_agreement_problems([b"a", b"b"], [hit, miss], [hit, miss]) == []
    assert judge.lookup_agreement_problems([b"a", b"b"], [hit, miss], [miss, hit])
    assert "1 results for 2 keys" in judge.lookup_agreement_problems([b"a", b"b"], [hit, miss], [hit])[0]
