"""The delivery oracle's judgement (pure): lost, duplicated, corrupted, unexpected, dead-lettered records."""

from __future__ import annotations

import json
from pathlib import Path

from etlrouter.conformance import oracle
from etlrouter.conformance.verify import VerifyOptions, branches, pipeline_text
from etlrouter.connectors.generator import GeneratorConfig, make_record
from etlrouter.connectors.jsonl_file_sink import record_line
from etlrouter.dsl import api as dsl
from etlrouter.dsl.optimizer import optimize
from etlrouter.sdk import Record

CONFIG = GeneratorConfig(seed=3, partitions=2, limit=200, record_size=80)
MAPPED = oracle.Branch("m", "sink-m", "map", "value.ratio = 100 / (value.id % 50)")
FILTERED = oracle.Branch("f", "sink-f", "filter", "value.amount >= 250")


def write_sink(path: Path, records: list[Record], tail: str = "") -> None:
    lines = [json.dumps(record_line("b", r)) for r in records]
    path.write_text("".join(line + "\n" for line in lines) + tail)


def test_expectations_follow_the_transforms() -> None:
    direct = oracle.expect(CONFIG, oracle.Branch("d", "sink-d"))
    assert len(direct.records) == 200 and not direct.dead
    filtered = oracle.expect(CONFIG, FILTERED)
    assert 0 < len(filtered.records) < 200
    assert all(json.loads(r.value)["amount"] >= 250 for r in filtered.records.values())
    mapped = oracle.expect(CONFIG, MAPPED)
    assert len(mapped.dead) == 4  # ids 0, 50, 100, 150 divide by zero
    assert len(mapped.records) + len(mapped.dead) == 200
    assert all("ratio" in json.loads(r.value) for r in mapped.records.values())


def test_a_complete_branch_passes_and_duplicates_are_counted(tmp_path: Path) -> None:
    expectation = oracle.expect(CONFIG, MAPPED)
    records = list(expectation.records.values())
    write_sink(tmp_path / "s.jsonl", records + records[:7], tail='{"batch_id": "torn')  # a line being written
    copies = oracle.read_copies([tmp_path / "s.jsonl"])
    assert copies.lines == len(records) + 7
    v = oracle.judge_branch(MAPPED, expectation, copies, dict.fromkeys(expectation.dead, 1))
    assert (v.missing, v.duplicates, v.corrupted, v.unexpected, v.dead_found, v.dead_elsewhere) == (
        0,
        7,
        0,
        0,
        4,
        0,
    )
    assert oracle.verdict_problems(True, [v], 0, 200, 200) == []


def test_lost_corrupted_unexpected_and_unaccounted_dead_letters_are_found(tmp_path: Path) -> None:
    expectation = oracle.expect(CONFIG, MAPPED)
    records = list(expectation.records.values())
    lost = records.pop(5)
    records[0] = Record(
        records[0].key,
        records[0].value.replace(b'"ratio"', b'"ratia"'),
        {},
        records[0].event_time_ms,
        records[0].offset,
    )
    dead_id = sorted(expectation.dead)[0]
    records.append(make_record(CONFIG, *dead_id))  # a record that should have failed is in the sink
    write_sink(tmp_path / "s.jsonl", records)
    letters = dict.fromkeys(sorted(expectation.dead)[1:], 1)  # one dead letter is missing
    letters[(0, 7)] = 1  # and one record failed that should not have
    v = oracle.judge_branch(MAPPED, expectation, oracle.read_copies([tmp_path / "s.jsonl"]), letters)
    assert v.missing == 2  # the lost record, and the one whose dead letter is missing
    assert (lost.offset, json.loads(lost.value)["partition"]) in [(o, p) for p, o in v.missing_ids]
    assert (v.corrupted, v.unexpected, v.dead_found, v.dead_elsewhere) == (1, 1, 3, 1)
    problems = oracle.verdict_problems(True, [v], 0, 200, 200)
    assert any("lost" in p for p in problems) and any("corrupted" in p for p in problems)


def test_early_acks_are_acknowledged_ids_a_branch_lacks(tmp_path: Path) -> None:
    expectation = oracle.expect(CONFIG, oracle.Branch("d", "sink-d"))
    held = [r for (p, o), r in expectation.records.items() if p == 0 and o < 50]
    write_sink(tmp_path / "s.jsonl", held)
    copies = oracle.read_copies([tmp_path / "s.jsonl"])
    assert oracle.early_acks({0: 49}, expectation, copies) == []
    assert sorted(oracle.early_acks({0: 51, 1: 0}, expectation, copies)) == [(0, 50), (0, 51), (1, 0)]
    problems = oracle.verdict_problems(False, [], 3, 150, 200)
    assert problems == [
        "the source acknowledged 150 of 200 records before the deadline",
        "3 records were acknowledged before every branch had them",
    ]


def test_the_pipelines_fan_out_from_one_source() -> None:
    options = VerifyOptions(Path("unused"))
    text = pipeline_text(options)
    assert [b.name for b in branches(options)] == ["verify-direct", "verify-filtered", "verify-mapped"]
    dags = optimize(dsl.compile(text, "verify.etl"))
    assert len(dags) == 1  # the optimizer merges the three pipelines: the source fans out to three branches


def test_a_user_branch_is_judged_on_presence(tmp_path: Path) -> None:
    user = oracle.Branch("u", "sink-u", "user", "my-transform --port {port}")
    expectation = oracle.expect(CONFIG, user)
    assert len(expectation.records) == 200 and not expectation.dead
    changed = [
        Record(r.key, r.value.replace(b"{", b'{"seen":1,', 1), {}, r.event_time_ms, r.offset)
        for r in list(expectation.records.values())[:-2]
    ]
    write_sink(tmp_path / "s.jsonl", changed)
    failed = list(expectation.records)[-1]  # dead-lettered by the user's transform: accounted for
    v = oracle.judge_branch(user, expectation, oracle.read_copies([tmp_path / "s.jsonl"]), {failed: 1})
    assert (v.present, v.missing, v.corrupted, v.dead_elsewhere) == (198, 1, 0, 0)
    assert v.missing_ids == [list(expectation.records)[-2]]
