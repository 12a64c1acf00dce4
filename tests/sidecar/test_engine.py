"""The data-plane engine with real user services over gRPC, and real sidecar-to-sidecar streams.

Two engines (sidecars A and B) run in this process, each with its own SidecarDataPlane server, so edges
between them are real ReceiveRecords streams over loopback. Assignments are handed to the engines the way
the cluster client would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from etlrouter._proto.v1 import control_pb2, dataplane_pb2, records_pb2
from etlrouter.core.config import SidecarConfig, TransportConfig
from etlrouter.core.grpc import GrpcServer
from etlrouter.sdk import (
    Capabilities,
    Lookup,
    LookupResult,
    PermanentError,
    Processed,
    Pulled,
    Record,
    RecordError,
    Sink,
    Source,
    Transform,
    Written,
    serving,
)
from etlrouter.sidecar.dataplane import DataPlaneService
from etlrouter.sidecar.engine import Engine
from etlrouter.sidecar.model import LocalService, ServiceCapabilities

SOURCE, TRANSFORM, SINK, LOOKUP = (
    control_pb2.SERVICE_KIND_SOURCE,
    control_pb2.SERVICE_KIND_TRANSFORM,
    control_pb2.SERVICE_KIND_SINK,
    control_pb2.SERVICE_KIND_LOOKUP,
)


class CountingSource(Source):
    """Offsets 0..total-1 in batches; remembers acknowledgements."""

    capabilities = Capabilities(name="numbers")

    def __init__(self, total: int) -> None:
        self.total = total
        self.next = 0
        self.acked = -1
        self.ack_history: list[int] = []

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        if self.next >= self.total:
            return Pulled(end_of_stream=True)
        end = min(self.total, self.next + max_records)
        records = [
            Record(key=b"%d" % n, value=b"%d" % n, offset=n, event_time_ms=1_000 + n)
            for n in range(self.next, end)
        ]
        self.next = end
        return Pulled(records)

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        assert up_to_offset > self.acked, "acknowledgements must grow"
        self.acked = up_to_offset
        self.ack_history.append(up_to_offset)

    async def rewind(self) -> None:
        self.next = self.acked + 1


class Poison(Transform):
    """Doubles values; records whose number is in `poison` fail permanently (until `cured`)."""

    capabilities = Capabilities(name="double")

    def __init__(self, poison: set[int]) -> None:
        self.poison = poison

    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        out, errors = [], []
        for i, r in enumerate(records):
            n = int(r.value)
            if n in self.poison:
                errors.append(RecordError(i, PermanentError.error_class, f"record {n} is poison"))
                continue
            if n % 10 == 9:
                continue  # filtered on purpose
            out.append(Record(key=r.key, value=b"%d" % (2 * n), offset=r.offset))
        return Processed(out, errors)


@dataclass
class RecordingSink(Sink):
    name: str
    stall: asyncio.Event | None = None
    values: list[int] = field(default_factory=list)
    batches: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.capabilities = Capabilities(name=self.name)

    async def write(self, batch_id: str, records: Sequence[Record], options: Mapping[str, str]) -> Written:
        if self.stall is not None:
            await self.stall.wait()
        if batch_id not in self.batches:  # idempotent by batch id
            self.batches.add(batch_id)
            self.values.extend(int(r.value) for r in records)
        return Written(len(records))

    async def flush(self) -> None:
        return None


class ListDlq:
    def __init__(self) -> None:
        self.letters: list[dataplane_pb2.DeadLetter] = []

    async def put(self, letters: Sequence[dataplane_pb2.DeadLetter]) -> None:
        self.letters.extend(letters)


@dataclass
class Sidecar:
    engine: Engine
    server: GrpcServer
    dlq: ListDlq


@contextlib.asynccontextmanager
async def sidecar(name: str, services: dict[str, str], kinds: dict[str, str]) -> AsyncIterator[Sidecar]:
    dlq = ListDlq()
    config = SidecarConfig(edge_buffer_records=3000, edge_buffer_bytes=4 << 20, drain_timeout_ms=5000)
    engine = Engine(name, config, TransportConfig(), dlq)
    engine.set_services(
        [
            LocalService(name=s, kind=kinds[s], endpoint=ep, capabilities=ServiceCapabilities())
            for s, ep in services.items()
        ]  # type: ignore[arg-type]
    )
    server = GrpcServer([DataPlaneService(engine)], host="127.0.0.1", port=0)
    await server.start()
    try:
        yield Sidecar(engine, server, dlq)
    finally:
        await engine.close()
        await server.stop()


def dag(
    stages: list[tuple[str, int, str, list[str], int]], source_options: dict[str, str] | None = None
) -> control_pb2.DagSpec:
    """(id, kind, service, downstream, shed_after_ms) -> DagSpec; `source_options` for the source stage."""
    return control_pb2.DagSpec(
        id="dag-1",
        generation=1,
        stages=[
            control_pb2.StageSpec(
                id=i,
                kind=k,
                service=s,
                downstream=d,
                parallelism=1,
                shed_after_ms=shed,
                options={"batch_size": "100", **((source_options or {}) if k == SOURCE else {})},
                pipelines=["p"],
            )
            for i, k, s, d, shed in stages
        ],
    )


def assign(spec: control_pb2.DagSpec, where: dict[str, Sidecar], here: Sidecar) -> control_pb2.Assign:
    placements = [
        control_pb2.StagePlacement(
            stage_id=stage, sidecar_id=sc.engine.sidecar_id, data_address=sc.server.address
        )
        for stage, sc in where.items()
    ]
    return control_pb2.Assign(
        dag=spec,
        placements=placements,
        local=[p for p in placements if p.sidecar_id == here.engine.sidecar_id],
    )


async def until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


KINDS = {"numbers": "source", "double": "transform", "left": "sink", "right": "sink"}


async def test_records_flow_across_sidecars_with_ordered_acks_and_dlq() -> None:
    total = 2000
    source, transform = CountingSource(total), Poison(poison={5, 500, 1999})
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

        # Event-time watermarks travel with the batches: every stage ends at the source's (lateness 0).
        reports = [*a.engine.stage_reports(), *b.engine.stage_reports()]
        assert {r.stage_id: r.watermark_ms for r in reports} == {
            s: 1_000 + total - 1 for s in ("src", "dbl", "l", "r")
        }

    expected = sorted(2 * n for n in range(total) if n not in {5, 500, 1999} and n % 10 != 9)
    assert sorted(left.values) == expected and sorted(right.values) == expected  # every record, both branches
    assert source.ack_history == sorted(source.ack_history)  # in order, never past a gap
    assert sorted(int(letter.record.value) for letter in a.dlq.letters) == [5, 500, 1999]
    letter = next(x for x in a.dlq.letters if x.record.value == b"500")
    assert (letter.stage_id, letter.service, letter.reason, letter.pipeline) == (
        "dbl",
        "double",
        "error",
        "p",
    )
    assert "record 500 is poison" in letter.error and letter.batch_id


async def test_a_stalled_branch_under_shed_does_not_hold_its_sibling() -> None:
    total = 10_000  # several times the stalled edge's window (3000 records)
    source = CountingSource(total)
    stall = asyncio.Event()
    fast, stuck = RecordingSink("left"), RecordingSink("right", stall=stall)
    async with (
        serving(source) as s1,
        serving(fast) as s2,
        serving(stuck) as s3,
        sidecar("A", {"numbers": s1.address, "left": s2.address, "right": s3.address}, KINDS) as a,
    ):
        spec = dag(
            [
                ("src", SOURCE, "numbers", ["l", "r"], 0),
                ("l", SINK, "left", [], 0),
                ("r", SINK, "right", [], 300),  # shed after 300 ms without credits
            ]
        )
        await a.engine.assign(1, assign(spec, {"src": a, "l": a, "r": a}, a))
        await until(lambda: len(fast.values) == total)  # the sibling got everything while one branch hung
        assert any(x.reason == "shed" for x in a.dlq.letters), "the stalled branch shed nothing"
        # Batches already handed to the hung sink stay unacknowledged until it answers (they may yet be
        # written): the source is not acknowledged past them.
        assert source.acked < total - 1
        stall.set()
        await until(lambda: source.acked == total - 1)

    assert sorted(fast.values) == list(range(total))
    shed = {int(x.record.value) for x in a.dlq.letters if x.reason == "shed"}
    assert shed | set(stuck.values) == set(range(total)), "a record neither reached the branch nor its DLQ"
    assert source.ack_history == sorted(source.ack_history)


async def test_a_blocked_branch_holds_the_source_back() -> None:
    source = CountingSource(100_000)
    stall = asyncio.Event()
    fast, stuck = RecordingSink("left"), RecordingSink("right", stall=stall)
    async with (
        serving(source) as s1,
        serving(fast) as s2,
        serving(stuck) as s3,
        sidecar("A", {"numbers": s1.address, "left": s2.address, "right": s3.address}, KINDS) as a,
    ):
        spec = dag(
            [
                ("src", SOURCE, "numbers", ["l", "r"], 0),
                ("l", SINK, "left", [], 0),
                ("r", SINK, "right", [], 0),  # block
            ]
        )
        await a.engine.assign(1, assign(spec, {"src": a, "l": a, "r": a}, a))
        await asyncio.sleep(1.5)
        pulled_while_stalled = source.next
        await asyncio.sleep(1.0)
        assert source.next == pulled_while_stalled, "the source kept pulling behind a blocked branch"
        assert pulled_while_stalled <= 2 * 3000, "more in flight than the source's bound (2 edge windows)"
        assert source.acked == -1  # nothing acknowledged while one branch has written nothing
        stall.set()
        await until(lambda: source.acked >= pulled_while_stalled - 1)


async def test_max_inflight_bounds_the_batches_a_source_holds() -> None:
    source = CountingSource(100_000)
    stall = asyncio.Event()
    stuck = RecordingSink("right", stall=stall)
    async with (
        serving(source) as s1,
        serving(stuck) as s3,
        sidecar("A", {"numbers": s1.address, "right": s3.address}, KINDS) as a,
    ):
        spec = dag([("src", SOURCE, "numbers", ["r"], 0), ("r", SINK, "right", [], 0)], {"max_inflight": "3"})
        await a.engine.assign(1, assign(spec, {"src": a, "r": a}, a))
        await until(lambda: source.next >= 300)
        await asyncio.sleep(0.5)  # room to pull more, were the bound not holding it
        # Three batches of 100, where two edge windows (3000 records here) would be 60 without the option.
        assert source.next == 300, source.next
        stall.set()
        await until(lambda: source.acked >= 299)
        await until(lambda: source.next > 300)  # pulling again once batches were acknowledged


@pytest.mark.parametrize("poison", [{3}])
async def test_dead_letters_can_be_redriven_after_the_fix(poison: set[int]) -> None:
    source, transform, sink = CountingSource(50), Poison(poison=set(poison)), RecordingSink("left")
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
        assert 6 not in sink.values
        transform.poison.clear()  # the fix
        assert await a.engine.redrive("dag-1", "dbl", a.dlq.letters) == 1
        assert 6 in sink.values


class Directory(Lookup):
    capabilities = Capabilities(name="directory")

    async def lookup(self, key: bytes) -> LookupResult | None:
        n = int(key)
        return LookupResult(fields={"parity": "even" if n % 2 == 0 else "odd"}) if n % 3 else None


async def test_lookup_stage_copies_fields_into_headers() -> None:
    source, sink = CountingSource(30), RecordingSink("left")
    headers: dict[int, dict[str, str]] = {}

    async def write(batch_id: str, records: Sequence[Record], options: Mapping[str, str]) -> Written:
        for r in records:
            headers[int(r.value)] = dict(r.headers)
        return Written(len(records))

    sink.write = write  # type: ignore[method-assign]
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
    assert len(headers) == 30
    assert headers[4] == {"directory.parity": "even"} and headers[5] == {"directory.parity": "odd"}
    assert headers[3] == {}  # not found: the record passes unchanged


async def test_a_batch_whose_records_do_not_decode_is_dead_lettered_whole_not_retried() -> None:
    """A well-formed batch header with garbage records: every retry would fail the same way, so the stage
    dead-letters the raw bytes once (reason `undecodable`) and reports the batch done."""
    sink = RecordingSink("left")
    async with serving(sink) as s1, sidecar("A", {"left": s1.address}, KINDS) as a:
        spec = dag([("l", SINK, "left", [], 0)])
        await a.engine.assign(1, assign(spec, {"l": a}, a))
        garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field longer than the message
        batch = records_pb2.RawRecordBatch(
            header=records_pb2.BatchHeader(batch_id="b-1", record_count=3, first_offset=40, last_offset=42),
            records=garbage,
        )
        result = await a.engine.receive("dag-1", "l", batch, "B/src")
    assert result.done and result.dead_lettered == 1
    (letter,) = a.dlq.letters
    assert letter.reason == "undecodable" and letter.record.value == garbage and letter.record.offset == 40
    assert "do not decode" in letter.error and letter.batch_id == "b-1"
    assert sink.values == []
