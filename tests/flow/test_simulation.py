"""The pieces together, as the sidecar will use them: a source fanning out to a blocking branch and a
shedding branch, each behind its own credits, with the ledger deciding acks. Random schedules check that
nothing is acked early, nothing disappears uncounted, and everything is acked once the branches drain."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from etlrouter.flow.branch import SHED_REASON, Block, Branch, BranchPolicy, FanOutBatch, Shed
from etlrouter.flow.credits import Credits, CreditSender, ReceiveBuffer
from etlrouter.flow.ledger import Ack, AckLedger, Outcome, SourcePartition

PARTITION = SourcePartition("events", 0)


@dataclass
class BranchEdge:
    branch: Branch
    receiver: ReceiveBuffer
    buffer: deque[tuple[str, int]] = field(default_factory=deque)  # (batch id, records)

    @classmethod
    def open(cls, name: str, policy: BranchPolicy, window_records: int) -> BranchEdge:
        window = Credits(window_records, window_records * 100)
        sender, receiver = CreditSender(window), ReceiveBuffer(window)
        grant = receiver.open()
        sender.grant(grant.records, grant.nbytes)
        return cls(Branch(name, policy, sender), receiver)


class Pipeline:
    def __init__(self) -> None:
        self.ledger = AckLedger()
        self.edges = {
            "fast": BranchEdge.open("fast", Block(), window_records=10),
            "slow": BranchEdge.open("slow", Shed(after=2.0), window_records=5),
        }
        self.now = 0.0
        self.pending: tuple[str, int, FanOutBatch] | None = None
        self.next_offset = 0
        self.produced_records = 0
        self.last_ack = -1

    def _take_acks(self, acks: list[Ack]) -> None:
        for ack in acks:
            assert ack.offset > self.last_ack
            self.last_ack = ack.offset

    def _advance_fan_out(self) -> None:
        if self.pending is None:
            return
        batch_id, records, fan_out = self.pending
        step = fan_out.step(self.now)
        for name in step.deliver:
            self.edges[name].receiver.on_received(records, records * 100)
            self.edges[name].buffer.append((batch_id, records))
        for name in step.shed:
            # The DLQ write is durable at once in this simulation; then the branch's share is done.
            self._take_acks(
                self.ledger.complete(
                    batch_id, name, Outcome.WRITTEN_WITH_DLQ, dead_lettered=records, reason=SHED_REASON
                )
            )
        if fan_out.done:
            self.pending = None

    def produce(self, records: int) -> None:
        if self.pending is None:
            batch_id = f"b{self.next_offset}"
            first = self.next_offset
            self.next_offset += records
            self.produced_records += records
            self._take_acks(
                self.ledger.register(batch_id, PARTITION, first, first + records - 1, records, self.edges)
            )
            branches = [edge.branch for edge in self.edges.values()]
            self.pending = (batch_id, records, FanOutBatch(records, records * 100, branches))
        self._advance_fan_out()

    def consume(self, name: str) -> None:
        edge = self.edges[name]
        if not edge.buffer:
            return
        batch_id, records = edge.buffer.popleft()
        self._take_acks(self.ledger.complete(batch_id, name, Outcome.WRITTEN))
        grant = edge.receiver.on_consumed(records, records * 100)
        edge.branch.credits.grant(grant.records, grant.nbytes)
        self._advance_fan_out()

    def tick(self, dt: float) -> None:
        self.now += dt
        self._advance_fan_out()

    def check_bounds(self) -> None:
        for edge in self.edges.values():
            assert edge.receiver.buffered.fits_in(edge.receiver.capacity)
        # The ack never passes a batch some branch still holds unwritten.
        for edge in self.edges.values():
            for batch_id, _ in edge.buffer:
                assert int(batch_id[1:]) > self.last_ack


produce = st.tuples(st.just("produce"), st.integers(1, 5))
tick = st.tuples(st.just("tick"), st.integers(1, 3))
# Weighted towards producing and time passing, so branches fall behind and the slow one sheds often.
actions = st.lists(
    st.one_of(
        produce,
        produce,
        produce,
        tick,
        tick,
        st.tuples(st.just("consume_fast"), st.just(0)),
        st.tuples(st.just("consume_slow"), st.just(0)),
    ),
    min_size=20,
    max_size=120,
)


@settings(max_examples=200, deadline=None)
@given(schedule=actions)
def test_fan_out_with_a_shedding_branch_acks_everything_and_counts_every_shed(
    schedule: list[tuple[str, int]],
) -> None:
    pipeline = Pipeline()
    for action, argument in schedule:
        if action == "produce":
            pipeline.produce(argument)
        elif action == "consume_fast":
            pipeline.consume("fast")
        elif action == "consume_slow":
            pipeline.consume("slow")
        else:
            pipeline.tick(float(argument))
        pipeline.check_bounds()

    # Drain: the sinks catch up, the pending fan-out finishes.
    while pipeline.pending is not None or any(edge.buffer for edge in pipeline.edges.values()):
        pipeline.consume("fast")
        pipeline.consume("slow")
        pipeline.check_bounds()

    fast, slow = pipeline.edges["fast"].branch, pipeline.edges["slow"].branch
    assert pipeline.ledger.pending_batches() == 0
    assert pipeline.last_ack == pipeline.next_offset - 1
    assert fast.counters.shed_records == 0  # a blocking branch never sheds
    for branch in (fast, slow):
        assert branch.counters.delivered_records + branch.counters.shed_records == pipeline.produced_records
        assert branch.credits.window_is_free  # no credit leaked
    assert pipeline.ledger.stats.dead_lettered_records[("slow", SHED_REASON)] == slow.counters.shed_records
