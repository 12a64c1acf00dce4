"""The source stage's pull loop: long polls (a source that holds an empty pull is asked again at once, one
that answers empty at once is backed off, not spun on) and the Nagle-style `linger` (a short batch waits
only while batches are in flight; an idle edge sends a lone record at once)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from etlrouter._proto.v1 import control_pb2
from etlrouter.sdk import Capabilities, Pulled, Record, Source, serving
from etlrouter.sidecar.source import PULL_WAIT_MS, answered_at_once
from tests.sidecar.test_engine import SINK, SOURCE, RecordingSink, assign, sidecar, until

KINDS = {"queue": "source", "left": "sink"}


class Queue(Source):
    """Hands out what was `put`, at once; a `long_poll` queue lets the SDK hold empty pulls (notify)."""

    capabilities = Capabilities(name="queue")

    def __init__(self, long_poll: bool) -> None:
        self.long_poll = long_poll
        self.pending: list[Record] = []
        self.offset = 0
        self.pulls = 0
        self.batches: list[int] = []  # records per non-empty answer
        if long_poll:
            self.notify()

    def put(self, n: int = 1) -> None:
        for _ in range(n):
            self.pending.append(Record(value=b"%d" % self.offset, offset=self.offset))
            self.offset += 1
        if self.long_poll:
            self.notify()

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        self.pulls += 1
        taken, self.pending = self.pending[:max_records], self.pending[max_records:]
        if taken:
            self.batches.append(len(taken))
        return Pulled(taken)

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        return None


def spec(options: dict[str, str]) -> control_pb2.DagSpec:
    return control_pb2.DagSpec(
        id="dag-1",
        generation=1,
        stages=[
            control_pb2.StageSpec(
                id="src", kind=SOURCE, service="queue", downstream=["l"], parallelism=1, options=options
            ),
            control_pb2.StageSpec(id="l", kind=SINK, service="left", parallelism=1, pipelines=["p"]),
        ],
    )


def test_an_empty_answer_is_quick_unless_it_used_a_good_part_of_the_wait() -> None:
    assert answered_at_once(0.001)
    assert not answered_at_once(PULL_WAIT_MS / 1000)
    assert answered_at_once(1.0, wait_ms=0)  # a stage whose timeout leaves no room to wait: still backed off


async def idle_pulls_then_one_record(long_poll: bool) -> int:
    """Pulls an idle source got in one second; then one record, which must reach the sink."""
    source, sink = Queue(long_poll=long_poll), RecordingSink("left")
    async with (
        serving(source) as s1,
        serving(sink) as s2,
        sidecar("A", {"queue": s1.address, "left": s2.address}, KINDS) as a,
    ):
        dag = spec({"batch_size": "100"})
        await a.engine.assign(1, assign(dag, {"src": a, "l": a}, a))
        await until(lambda: source.pulls > 0)
        before = source.pulls
        await asyncio.sleep(1.0)
        idle_pulls = source.pulls - before
        source.put()
        await until(lambda: sink.values == [0])
    return idle_pulls


async def test_a_source_that_answers_empty_at_once_is_backed_off_not_spun_on_and_still_flows() -> None:
    idle_pulls = await idle_pulls_then_one_record(long_poll=False)
    # Backed off to one pull per 50 ms: about 20 a second (a busy loop makes thousands).
    assert 1 <= idle_pulls <= 100, idle_pulls


async def test_a_long_polling_source_is_asked_again_at_once_and_answers_when_a_record_comes() -> None:
    idle_pulls = await idle_pulls_then_one_record(long_poll=True)
    # Each pull is held up to PULL_WAIT_MS: a handful a second, and no backoff sleep between them.
    assert idle_pulls <= 2 * (1000 // PULL_WAIT_MS) + 2, idle_pulls


async def test_an_idle_edge_sends_a_lone_record_at_once_and_a_busy_one_lingers_to_fill_a_batch() -> None:
    stall = asyncio.Event()
    stall.set()
    source, sink = Queue(long_poll=True), RecordingSink("left", stall=stall)
    async with (
        serving(source) as s1,
        serving(sink) as s2,
        sidecar("A", {"queue": s1.address, "left": s2.address}, KINDS) as a,
    ):
        # A linger far longer than the test may wait: a record that arrives was not held by it.
        dag = spec({"batch_size": "100", "linger": "10s"})
        await a.engine.assign(1, assign(dag, {"src": a, "l": a}, a))
        await until(lambda: source.pulls > 0)
        source.put()
        await until(lambda: sink.values == [0], timeout=5)
        source.put()  # the edge is idle again: no linger either
        await until(lambda: sink.values == [0, 1], timeout=5)

        # Under load: a batch in flight (the sink holds it), records keep coming. They are not pulled one
        # by one behind it: the next pull waits for the batch in flight, then takes them as one batch.
        stall.clear()
        source.put()
        await until(lambda: source.batches == [1, 1, 1], timeout=5)
        source.put(49)
        await asyncio.sleep(0.5)
        held = (list(source.batches), len(source.pending))
        stall.set()
        await until(lambda: len(sink.values) == 52, timeout=5)
    assert held == ([1, 1, 1], 49), "records were pulled behind a batch in flight despite the linger"
    assert source.batches == [1, 1, 1, 49]
    assert sink.values == list(range(52))
