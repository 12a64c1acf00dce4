"""The delivery oracle's pure part: what every branch must hold, what it holds, and the verdict.

The oracle source is the reference generator: record n of partition p is a pure function of its
configuration (`make_record`), and its JSON value carries a unique id (n * partitions + p) and its
partition. So the judge recomputes every record byte for byte (a stronger check than a checksum field):
a branch's copy whose key, value or event time differs from what the path's transforms make of the
original is *corrupted*. The transforms are the reference filter (a predicate: what it drops is not
expected) and map (a program, applied here too; a record it fails on must be in the DLQ instead). A user's
own transform is judged on presence: every record must reach the sink (keeping its offset and the value's
`partition` field, by which it is recognised) or the DLQ; what it makes of the payload is not judged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from etlrouter.connectors.expr import EvaluationError, compile_predicate, compile_program
from etlrouter.connectors.generator import GeneratorConfig, make_record
from etlrouter.sdk.records import Record

Id = tuple[int, int]  # (partition, offset)


@dataclass(frozen=True)
class Branch:
    """One pipeline of the fan-out: its sink service, and the transform on the way (None = direct)."""

    name: str  # the pipeline's name
    sink: str  # the sink service's name
    transform: str | None = None  # "filter", "map", or "user" (the user's own: judged on presence only)
    text: str = ""  # the filter's expression or the map's program

    @property
    def payloads_known(self) -> bool:
        """Whether the judge knows what the branch's transform makes of a record (not for a user's)."""
        return self.transform != "user"


@dataclass
class Expectation:
    """Per branch: the record each id must arrive as, and the ids that must be in the DLQ instead."""

    records: dict[Id, Record] = field(default_factory=dict)
    dead: set[Id] = field(default_factory=set)


def partition_size(config: GeneratorConfig, partition: int) -> int:
    limit, parts = config.limit, config.partitions
    return limit // parts + (1 if partition < limit % parts else 0)


def all_ids(config: GeneratorConfig) -> list[Id]:
    return [(p, o) for p in range(config.partitions) for o in range(partition_size(config, p))]


def expect(config: GeneratorConfig, branch: Branch) -> Expectation:
    """What `branch` must hold once the source acknowledged everything (`config.limit` records)."""
    out = Expectation()
    keep = compile_predicate(branch.text) if branch.transform == "filter" else None
    apply = compile_program(branch.text) if branch.transform == "map" else None
    for p, o in all_ids(config):
        record = make_record(config, p, o)
        if keep is not None and not keep(record):
            continue
        if apply is not None:
            try:
                record = apply(record)
            except EvaluationError:
                out.dead.add((p, o))
                continue
        out.records[(p, o)] = record
    return out


class SinkLine(msgspec.Struct):
    offset: int
    value: str = ""
    key: str = ""
    event_time_ms: int = 0
    batch_id: str = ""


class _Partition(msgspec.Struct):
    partition: int = -1


_line = msgspec.json.Decoder(SinkLine)
_value = msgspec.json.Decoder(_Partition)


@dataclass
class Copies:
    """What a jsonl-file sink holds: every complete line, by id (repeats kept), and unreadable lines."""

    by_id: dict[Id, list[SinkLine]] = field(default_factory=dict)
    unreadable: int = 0
    lines: int = 0


def read_copies(paths: Iterable[Path]) -> Copies:
    """Parse the sink's files. A last line without its newline is being written: not counted yet."""
    copies = Copies()
    for path in paths:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        end = data.rfind(b"\n")
        for raw in data[: end + 1].splitlines():
            if not raw.strip():
                continue
            copies.lines += 1
            try:
                line = _line.decode(raw)
                partition = _value.decode(line.value.encode()).partition
            except (msgspec.DecodeError, msgspec.ValidationError):
                copies.unreadable += 1
                continue
            copies.by_id.setdefault((partition, line.offset), []).append(line)
    return copies


def intact(expected: Record, line: SinkLine) -> bool:
    """The copy is the expected record: same key, value and event time (as the jsonl-file sink writes them;
    a map's output value is compared as JSON, since the sink may re-encode it)."""
    if line.key.encode() != expected.key or line.event_time_ms != expected.event_time_ms:
        return False
    if line.value.encode() == expected.value:
        return True
    try:
        return bool(msgspec.json.decode(line.value) == msgspec.json.decode(expected.value))
    except msgspec.DecodeError:
        return False


class BranchVerdict(msgspec.Struct, kw_only=True):
    pipeline: str
    sink: str
    expected: int  # ids that must be in the sink
    present: int  # of them, in the sink
    missing: int  # expected and neither in the sink nor in the DLQ: lost
    duplicates: int  # copies beyond the first
    corrupted: int  # copies that differ from the expected record (or cannot be read)
    unexpected: int  # ids in the sink that must not be there (filtered out, or never generated)
    dead_expected: int  # ids that must be in the DLQ (the transform fails on them)
    dead_found: int  # of them, in the DLQ
    dead_elsewhere: int  # DLQ letters of ids that are not expected there
    dead_duplicates: int  # letters beyond the first for one id
    missing_ids: list[Id] = []  # the first few


def judge_branch(
    branch: Branch, expectation: Expectation, copies: Copies, dead_letters: Mapping[Id, int]
) -> BranchVerdict:
    present = missing = corrupted = 0
    missing_ids: list[Id] = []
    for id_, record in expectation.records.items():
        lines = copies.by_id.get(id_)
        if lines:
            present += 1
            if branch.payloads_known:
                corrupted += sum(1 for line in lines if not intact(record, line))
        elif dead_letters.get(id_):
            pass  # a record that failed in this branch and is accounted for in its DLQ
        else:
            missing += 1
            if len(missing_ids) < 10:
                missing_ids.append(id_)
    dead_found = sum(1 for id_ in expectation.dead if dead_letters.get(id_))
    missing_dead = [id_ for id_ in sorted(expectation.dead) if not dead_letters.get(id_)]
    missing += len(missing_dead)
    missing_ids += missing_dead[: max(0, 10 - len(missing_ids))]
    duplicates = sum(len(lines) - 1 for lines in copies.by_id.values())
    unexpected = sum(1 for id_ in copies.by_id if id_ not in expectation.records)
    # A user's transform may fail any record (its letters then account for it); the reference ones only
    # those the judge computed.
    elsewhere = 0
    if branch.payloads_known:
        elsewhere = sum(1 for id_ in dead_letters if id_ not in expectation.dead)
    dead_duplicates = sum(n - 1 for n in dead_letters.values() if n > 1)
    return BranchVerdict(
        pipeline=branch.name,
        sink=branch.sink,
        expected=len(expectation.records),
        present=present,
        missing=missing,
        duplicates=duplicates,
        corrupted=corrupted + copies.unreadable,
        unexpected=unexpected,
        dead_expected=len(expectation.dead),
        dead_found=dead_found,
        dead_elsewhere=elsewhere,
        dead_duplicates=dead_duplicates,
        missing_ids=missing_ids,
    )


def early_acks(acked: Mapping[int, int], expectation: Expectation, copies: Copies) -> list[Id]:
    """Ids the source has acknowledged (offset <= acked[p]) that the branch does not hold: acknowledged
    before every branch had them. (DLQ-bound ids are left to the final judgement.)"""
    return [id_ for id_ in expectation.records if id_[1] <= acked.get(id_[0], -1) and id_ not in copies.by_id]


class Fault(msgspec.Struct, kw_only=True):
    at_s: float  # seconds since the pipelines started
    victim: str  # the process name (router-1, sidecar-oracle, branch-mapped, …)
    role: str  # sidecar, service or leader (the Raft leader router)
    pid: int
    down_s: float  # how long it stayed down before its restart


class VerifyReport(msgspec.Struct, kw_only=True):
    ok: bool
    complete: bool  # the source acknowledged every record before the deadline
    records: int  # records the source generated
    acknowledged: int
    duration_s: float
    chaos: bool
    faults: list[Fault] = []
    branches: list[BranchVerdict] = []
    early_acks: int = 0  # ids seen acknowledged while a branch did not hold them yet
    early_ack_ids: list[Id] = []
    problems: list[str] = []


def verdict_problems(
    complete: bool, branches: Sequence[BranchVerdict], early: int, acknowledged: int, records: int
) -> list[str]:
    problems: list[str] = []
    if not complete:
        problems.append(f"the source acknowledged {acknowledged} of {records} records before the deadline")
    for b in branches:
        if b.missing:
            problems.append(f"{b.pipeline}: {b.missing} records lost (e.g. {b.missing_ids[:3]})")
        if b.corrupted:
            problems.append(f"{b.pipeline}: {b.corrupted} copies corrupted")
        if b.unexpected:
            problems.append(f"{b.pipeline}: {b.unexpected} records that must not be there")
        if b.dead_elsewhere:
            problems.append(f"{b.pipeline}: {b.dead_elsewhere} dead letters of records that should not fail")
    if early:
        problems.append(f"{early} records were acknowledged before every branch had them")
    return problems


def table(report: VerifyReport) -> list[str]:
    head = ("pipeline", "sink", "expected", "present", "lost", "dupes", "corrupt", "unexpected", "dlq")
    rows = [head]
    for b in report.branches:
        dlq = f"{b.dead_found}/{b.dead_expected}" + (f" +{b.dead_elsewhere}" if b.dead_elsewhere else "")
        dlq += f" ({b.dead_duplicates} dupes)" if b.dead_duplicates else ""
        rows.append(
            (
                b.pipeline,
                b.sink,
                str(b.expected),
                str(b.present),
                str(b.missing),
                str(b.duplicates),
                str(b.corrupted),
                str(b.unexpected),
                dlq,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    faults = Counter(f.role for f in report.faults)
    summary = ", ".join(f"{n} {role}" for role, n in sorted(faults.items())) or "none"
    lines.append(
        f"records {report.records}, acknowledged {report.acknowledged}, "
        f"{report.duration_s:.1f} s, faults injected: {summary}; early acks: {report.early_acks}"
    )
    lines.append("VERIFIED: no record lost" if report.ok else "NOT VERIFIED: " + "; ".join(report.problems))
    return lines
