"""Fan-out branch policy: BLOCK waits, SHED sheds after its bound, and nothing is dropped uncounted."""

from __future__ import annotations

import msgspec
import pytest

from etlrouter.flow.branch import Block, Branch, BranchPolicy, Delivery, FanOutBatch, Shed, decide_delivery
from etlrouter.flow.credits import Credits, CreditSender


def branch(name: str, policy: BranchPolicy, records: int = 10) -> Branch:
    credits = CreditSender(Credits(records, 10_000))
    credits.grant(records, 10_000)
    return Branch(name, policy, credits)


def test_decision_rule() -> None:
    assert decide_delivery(Block(), fits=True, starved_since=None, now=0.0) is Delivery.DELIVER
    assert decide_delivery(Block(), fits=False, starved_since=0.0, now=1e9) is Delivery.WAIT
    assert decide_delivery(Shed(after=5.0), fits=False, starved_since=None, now=3.0) is Delivery.WAIT
    assert decide_delivery(Shed(after=5.0), fits=False, starved_since=1.0, now=5.9) is Delivery.WAIT
    assert decide_delivery(Shed(after=5.0), fits=False, starved_since=1.0, now=6.0) is Delivery.SHED
    assert decide_delivery(Shed(after=0.0), fits=False, starved_since=None, now=0.0) is Delivery.SHED
    assert decide_delivery(Shed(after=5.0), fits=True, starved_since=1.0, now=99.0) is Delivery.DELIVER


def test_shed_branch_sheds_after_the_bound_counts_it_and_recovers_with_credits() -> None:
    slow = branch("slow", Shed(after=2.0), records=5)
    assert slow.offer(5, 100, now=0.0) is Delivery.DELIVER
    assert slow.offer(5, 100, now=1.0) is Delivery.WAIT  # starved from t=1
    assert slow.shed_deadline() == 3.0
    assert slow.offer(5, 100, now=2.9) is Delivery.WAIT
    assert slow.offer(5, 100, now=3.0) is Delivery.SHED
    assert slow.offer(5, 100, now=3.5) is Delivery.SHED  # still behind: keeps shedding
    assert (slow.counters.shed_batches, slow.counters.shed_records) == (2, 10)
    slow.credits.grant(5, 100)
    assert slow.offer(5, 100, now=4.0) is Delivery.DELIVER
    assert slow.credits.starved_for(4.0) == 0.0
    assert slow.credits.starvation.total_seconds == pytest.approx(3.0)


def test_block_waits_however_long_it_takes() -> None:
    slow = branch("slow", Block(), records=1)
    assert slow.offer(1, 1, now=0.0) is Delivery.DELIVER
    assert all(slow.offer(1, 1, now=t) is Delivery.WAIT for t in (1.0, 100.0, 1e6))
    assert slow.shed_deadline() is None
    assert slow.counters.shed_batches == 0


def test_fan_out_isolates_a_shedding_branch_from_its_siblings() -> None:
    fast, slow = branch("fast", Block()), branch("slow", Shed(after=1.0), records=1)
    first = FanOutBatch(1, 10, [fast, slow])
    assert first.step(now=0.0).deliver == ["fast", "slow"] and first.done
    second = FanOutBatch(1, 10, [fast, slow])
    step = second.step(now=0.5)
    assert (step.deliver, step.waiting) == (["fast"], ["slow"])
    assert not second.done and second.next_deadline() == 1.5
    step = second.step(now=1.5)
    assert (step.deliver, step.shed, step.waiting) == ([], ["slow"], [])
    assert second.done  # the source may move on; the slow branch's copy goes to the DLQ
    assert fast.counters.delivered_batches == 2


def test_fan_out_with_a_blocking_laggard_is_not_done_until_it_takes_the_batch() -> None:
    fast, laggard = branch("fast", Block()), branch("laggard", Block(), records=1)
    FanOutBatch(1, 10, [fast, laggard]).step(now=0.0)
    batch = FanOutBatch(1, 10, [fast, laggard])
    batch.step(now=1.0)
    assert batch.remaining == ["laggard"] and batch.next_deadline() is None
    laggard.credits.grant(1, 10)
    assert batch.step(now=5.0).deliver == ["laggard"] and batch.done
    assert fast.counters.delivered_batches == 2  # delivered once, not re-offered


def test_removed_branch_is_no_longer_waited_for() -> None:
    laggard = branch("laggard", Block(), records=1)
    laggard.offer(1, 1, now=0.0)
    batch = FanOutBatch(1, 1, [laggard])
    batch.step(now=1.0)
    batch.drop_branch("laggard")
    assert batch.done


def test_policies_round_trip_through_msgspec_for_pipeline_specs() -> None:
    encoded = msgspec.json.encode([Block(), Shed(after=2.5)])
    assert encoded == b'[{"type":"block"},{"type":"shed","after":2.5}]'
    assert msgspec.json.decode(encoded, type=list[BranchPolicy]) == [Block(), Shed(after=2.5)]


def test_negative_shed_bound_is_rejected() -> None:
    with pytest.raises(ValueError):
        Shed(after=-1.0)
