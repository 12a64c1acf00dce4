"""Ack ledger: unit tests for each rule, a hypothesis state machine for the at-least-once invariants."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from etlrouter.flow.ledger import Ack, AckLedger, LedgerError, Outcome, SourcePartition

P0 = SourcePartition("orders", 0)
P1 = SourcePartition("orders", 1)


def test_ack_waits_for_every_branch() -> None:
    ledger = AckLedger()
    assert ledger.register("b1", P0, 0, 9, 10, ["s3", "pg"]) == []
    assert ledger.complete("b1", "s3", Outcome.WRITTEN) == []
    assert ledger.waiting_on("b1") == {"pg"}
    assert ledger.complete("b1", "pg", Outcome.WRITTEN) == [Ack("orders", 0, 9)]
    assert ledger.last_acked(P0) == 9


def test_acks_never_pass_a_gap_and_coalesce_when_it_closes() -> None:
    ledger = AckLedger()
    for i in range(3):
        ledger.register(f"b{i}", P0, i * 10, i * 10 + 9, 10, ["s3"])
    assert ledger.complete("b1", "s3", Outcome.WRITTEN) == []
    assert ledger.complete("b2", "s3", Outcome.WRITTEN) == []
    assert ledger.complete("b0", "s3", Outcome.WRITTEN) == [Ack("orders", 0, 29)]  # one ack for the prefix


def test_partitions_are_independent() -> None:
    ledger = AckLedger()
    ledger.register("a", P0, 0, 9, 10, ["s3"])
    ledger.register("b", P1, 0, 4, 5, ["s3"])
    assert ledger.complete("b", "s3", Outcome.WRITTEN) == [Ack("orders", 1, 4)]
    assert ledger.last_acked(P0) is None


def test_dead_lettered_records_count_as_done_and_are_counted_by_reason() -> None:
    ledger = AckLedger()
    ledger.register("b1", P0, 0, 9, 10, ["s3"])
    acks = ledger.complete("b1", "s3", Outcome.WRITTEN_WITH_DLQ, dead_lettered=2, reason="rejected")
    assert acks == [Ack("orders", 0, 9)]
    assert ledger.stats.dead_lettered_records[("s3", "rejected")] == 2


def test_retryable_failure_is_not_done() -> None:
    ledger = AckLedger()
    ledger.register("b1", P0, 0, 9, 10, ["s3"])
    assert ledger.complete("b1", "s3", Outcome.FAILED_RETRYABLE) == []
    assert ledger.stats.retryable_failures["s3"] == 1
    assert ledger.complete("b1", "s3", Outcome.WRITTEN) == [Ack("orders", 0, 9)]


def test_repeated_and_late_reports_are_ignored_and_counted() -> None:
    ledger = AckLedger()
    ledger.register("b1", P0, 0, 9, 10, ["s3", "pg"])
    ledger.complete("b1", "s3", Outcome.WRITTEN)
    assert ledger.complete("b1", "s3", Outcome.WRITTEN) == []
    assert ledger.stats.duplicate_reports == 1
    ledger.complete("b1", "pg", Outcome.WRITTEN)
    assert ledger.complete("b1", "pg", Outcome.WRITTEN) == []  # batch already acked and forgotten
    assert ledger.complete("nope", "pg", Outcome.WRITTEN) == []
    assert ledger.stats.stale_reports == 2


def test_registration_must_follow_source_order() -> None:
    ledger = AckLedger()
    ledger.register("b1", P0, 10, 19, 10, ["s3"])
    with pytest.raises(LedgerError):
        ledger.register("b0", P0, 0, 9, 10, ["s3"])
    with pytest.raises(LedgerError):
        ledger.register("b1", P1, 0, 9, 10, ["s3"])  # duplicate batch id
    with pytest.raises(LedgerError):
        ledger.register("b2", P0, 30, 29, 10, ["s3"])


def test_offsets_may_have_holes_between_batches() -> None:
    ledger = AckLedger()
    ledger.register("b0", P0, 0, 9, 10, ["s3"])
    ledger.register("b1", P0, 100, 109, 10, ["s3"])  # e.g. a compacted topic
    ledger.complete("b1", "s3", Outcome.WRITTEN)
    assert ledger.complete("b0", "s3", Outcome.WRITTEN) == [Ack("orders", 0, 109)]


def test_split_batch_completes_when_every_child_is_written() -> None:
    ledger = AckLedger()
    ledger.register("b1", P0, 0, 9, 10, ["s3", "pg"])
    assert ledger.split("b1", ["b1/0", "b1/1"]) == []
    ledger.complete("b1/0", "s3", Outcome.WRITTEN)
    ledger.complete("b1/1", "s3", Outcome.WRITTEN)
    ledger.complete("b1/0", "pg", Outcome.WRITTEN)
    assert ledger.complete("b1", "pg", Outcome.WRITTEN) == []  # the parent piece was replaced
    assert ledger.complete("b1/1", "pg", Outcome.WRITTEN) == [Ack("orders", 0, 9)]


def test_fully_filtered_batch_is_done_for_every_branch() -> None:
    ledger = AckLedger()
    ledger.register("b0", P0, 0, 9, 10, ["s3"])
    ledger.register("b1", P0, 10, 19, 10, ["s3", "pg"])
    assert ledger.split("b1", [], filtered_records=10) == []  # done, but b0 is still in front
    assert ledger.stats.filtered_records == 10
    assert ledger.complete("b0", "s3", Outcome.WRITTEN) == [Ack("orders", 0, 19)]


def test_split_on_one_branch_only_leaves_the_others_waiting_for_the_original() -> None:
    ledger = AckLedger()
    ledger.register("b1", P0, 0, 9, 10, ["s3", "pg"])
    assert ledger.split("b1", [], branches=["pg"]) == []  # pg's own filter dropped everything
    assert ledger.waiting_on("b1") == {"s3"}
    assert ledger.complete("b1", "s3", Outcome.WRITTEN) == [Ack("orders", 0, 9)]


def test_child_ids_may_not_collide_with_another_batch() -> None:
    ledger = AckLedger()
    ledger.register("b0", P0, 0, 9, 10, ["s3"])
    ledger.register("b1", P0, 10, 19, 10, ["s3"])
    with pytest.raises(LedgerError):
        ledger.split("b1", ["b0"])


def test_removing_a_branch_drops_its_obligations_explicitly() -> None:
    ledger = AckLedger()
    ledger.register("b0", P0, 0, 9, 10, ["s3", "slow"])
    ledger.register("b1", P0, 10, 19, 10, ["s3", "slow"])
    ledger.complete("b0", "s3", Outcome.WRITTEN)
    ledger.complete("b1", "s3", Outcome.WRITTEN)
    removal = ledger.remove_branch("slow")
    assert removal.acks == [Ack("orders", 0, 19)]
    assert (removal.dropped_batches, removal.dropped_records) == (2, 20)
    assert ledger.stats.dropped_obligations["slow"] == 2
    assert ledger.complete("b1", "slow", Outcome.WRITTEN) == []  # a late report is harmless


def test_dropping_a_revoked_partition_acks_nothing() -> None:
    ledger = AckLedger()
    ledger.register("b0", P0, 0, 9, 10, ["s3"])
    assert ledger.drop_partition(P0) == 1
    assert ledger.complete("b0", "s3", Outcome.WRITTEN) == []
    assert ledger.pending_batches() == 0


def test_batch_routed_nowhere_is_done_at_once() -> None:
    ledger = AckLedger()
    assert ledger.register("b0", P0, 0, 9, 10, []) == [Ack("orders", 0, 9)]


def test_restart_is_a_fresh_ledger_that_acks_nothing_until_redelivery_completes() -> None:
    before = AckLedger()
    before.register("b0", P0, 0, 9, 10, ["s3"])
    before.complete("b0", "s3", Outcome.WRITTEN)
    before.register("b1", P0, 10, 19, 10, ["s3"])  # in flight when the sidecar dies
    after = AckLedger()  # nothing persisted: the source redelivers from its last ack (9)
    assert after.last_acked(P0) is None
    after.register("b1", P0, 10, 19, 10, ["s3"])
    assert after.complete("b1", "s3", Outcome.WRITTEN) == [Ack("orders", 0, 19)]


BRANCHES = ("a", "b", "c")


@dataclass
class ModelBatch:
    batch_id: str
    partition: SourcePartition
    last_offset: int
    outstanding: dict[str, set[str]]  # branch -> pieces still owed
    children_made: int = field(default=0)

    @property
    def complete(self) -> bool:
        return all(not pieces for pieces in self.outstanding.values())


class LedgerInterleavings(RuleBasedStateMachine):
    """Random registration, splitting, completion, failure, duplicates and branch removal."""

    @initialize()
    def start(self) -> None:
        self.ledger = AckLedger()
        self.batches: list[ModelBatch] = []
        self.next_offset = {P0: 0, P1: 0}
        self.acked = {P0: -1, P1: -1}
        self.removed: set[str] = set()
        self.counter = 0

    def _check_acks(self, acks: list[Ack]) -> None:
        seen: set[SourcePartition] = set()
        for ack in acks:
            partition = SourcePartition(ack.source_id, ack.partition)
            assert partition not in seen, "at most one ack per partition per call"
            seen.add(partition)
            assert ack.offset > self.acked[partition], "acks are strictly monotonic"
            covered = [b for b in self.batches if b.partition == partition and b.last_offset <= ack.offset]
            assert covered and covered[-1].last_offset == ack.offset, "acks land on batch boundaries"
            assert all(b.complete for b in covered), "never ack an incomplete batch or past a gap"
            self.acked[partition] = ack.offset

    @rule(
        partition=st.sampled_from([P0, P1]),
        gap=st.integers(0, 3),
        size=st.integers(1, 5),
        branches=st.sets(st.sampled_from(BRANCHES), max_size=3),
    )
    def register(self, partition: SourcePartition, gap: int, size: int, branches: set[str]) -> None:
        live = branches - self.removed
        first = self.next_offset[partition] + gap
        batch_id = f"batch{self.counter}"
        self.counter += 1
        acks = self.ledger.register(batch_id, partition, first, first + size - 1, size, live)
        self.next_offset[partition] = first + size
        self.batches.append(ModelBatch(batch_id, partition, first + size - 1, {b: {batch_id} for b in live}))
        self._check_acks(acks)

    def _owed(self) -> list[tuple[ModelBatch, str, str]]:
        return [
            (batch, branch, piece)
            for batch in self.batches
            for branch, pieces in batch.outstanding.items()
            for piece in sorted(pieces)
        ]

    @precondition(lambda self: bool(self._owed()))
    @rule(data=st.data(), outcome=st.sampled_from(list(Outcome)))
    def report(self, data: st.DataObject, outcome: Outcome) -> None:
        batch, branch, piece = data.draw(st.sampled_from(self._owed()))
        acks = self.ledger.complete(piece, branch, outcome, dead_lettered=1, reason="test")
        if outcome is not Outcome.FAILED_RETRYABLE:
            batch.outstanding[branch].discard(piece)
        else:
            assert acks == []
        self._check_acks(acks)

    @precondition(lambda self: bool(self._owed()))
    @rule(data=st.data(), into=st.integers(0, 3), everywhere=st.booleans())
    def split(self, data: st.DataObject, into: int, everywhere: bool) -> None:
        batch, branch, piece = data.draw(st.sampled_from(self._owed()))
        children = [f"{piece}.{batch.children_made + i}" for i in range(into)]
        batch.children_made += into
        targets = (
            [b for b, pieces in batch.outstanding.items() if piece in pieces] if everywhere else [branch]
        )
        acks = self.ledger.split(piece, children, branches=targets)
        for target in targets:
            batch.outstanding[target].discard(piece)
            batch.outstanding[target].update(children)
        self._check_acks(acks)

    @precondition(lambda self: bool(self.batches))
    @rule(data=st.data())
    def repeat_a_finished_report(self, data: st.DataObject) -> None:
        batch = data.draw(st.sampled_from(self.batches))
        if batch.outstanding:
            branch = data.draw(st.sampled_from(sorted(batch.outstanding)))
            if batch.batch_id not in batch.outstanding[branch]:
                self._check_acks(self.ledger.complete(batch.batch_id, branch, Outcome.WRITTEN))

    @rule(branch=st.sampled_from(BRANCHES))
    def remove_branch(self, branch: str) -> None:
        self.removed.add(branch)
        for batch in self.batches:
            batch.outstanding.pop(branch, None)
        self._check_acks(self.ledger.remove_branch(branch).acks)

    @rule()
    def finish_everything(self) -> None:
        for batch, branch, piece in self._owed():
            batch.outstanding[branch].discard(piece)
            self._check_acks(self.ledger.complete(piece, branch, Outcome.WRITTEN))
        for partition in self.next_offset:
            registered = [b for b in self.batches if b.partition == partition]
            if registered:
                assert self.acked[partition] == registered[-1].last_offset
        assert self.ledger.pending_batches() == 0

    @invariant()
    def ledger_agrees_on_what_is_owed(self) -> None:
        for batch in self.batches:
            if batch.last_offset > self.acked[batch.partition]:
                owing = {b for b, pieces in batch.outstanding.items() if pieces}
                assert self.ledger.waiting_on(batch.batch_id) == owing


LedgerInterleavings.TestCase.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)
TestLedgerInterleavings = LedgerInterleavings.TestCase
