"""Shed copies are filed under the branch that shed them, and a redrive sends them down that branch only,
also when the branch runs on another sidecar (engines and services over real gRPC, as in test_engine)."""

from __future__ import annotations

import asyncio

from etlrouter._proto.v1 import control_pb2
from etlrouter.sdk import serving
from tests.sidecar.test_engine import KINDS, CountingSource, RecordingSink, assign, dag, sidecar, until

SOURCE, SINK = control_pb2.SERVICE_KIND_SOURCE, control_pb2.SERVICE_KIND_SINK


async def test_shed_letters_carry_the_branch_stage_and_redrive_reaches_only_that_branch() -> None:
    total = 10_000
    source = CountingSource(total)
    stall = asyncio.Event()
    fast, stuck = RecordingSink("left"), RecordingSink("right", stall=stall)
    async with (
        serving(source) as s1,
        serving(fast) as s2,
        serving(stuck) as s3,
        sidecar("A", {"numbers": s1.address, "left": s2.address}, KINDS) as a,
        sidecar("B", {"right": s3.address}, KINDS) as b,
    ):
        spec = dag(
            [
                ("src", SOURCE, "numbers", ["l", "r"], 0),
                ("l", SINK, "left", [], 0),
                ("r", SINK, "right", [], 300),  # shed after 300 ms
            ]
        )
        where = {"src": a, "l": a, "r": b}
        await b.engine.assign(1, assign(spec, where, b))
        await a.engine.assign(1, assign(spec, where, a))
        await until(lambda: len(fast.values) == total)
        await until(lambda: len(a.dlq.letters) >= 100)  # the copies waiting for credits past 300 ms
        await asyncio.sleep(0.5)  # let the shedding of this round finish
        shed = [x for x in a.dlq.letters if x.reason == "shed"]
        # Filed under the branch's first stage and its service, not under the source that sent them.
        assert {(x.stage_id, x.service) for x in shed} == {("r", "right")}

        stall.set()
        await until(lambda: source.acked == total - 1)
        left_before, right_before = len(fast.values), len(stuck.values)
        redriven = await a.engine.redrive("dag-1", "r", shed)  # "r" runs on B: reached through src's edge
        assert redriven == len(shed)
        await until(lambda: len(stuck.values) >= right_before + len(shed))
        await asyncio.sleep(0.2)  # a wrong redrive into the sibling would have arrived by now too
        assert len(fast.values) == left_before, "the redrive also went down the sibling branch"
        assert {int(x.record.value) for x in shed} <= set(stuck.values)
