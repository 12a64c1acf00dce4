"""The linearizability checker, on hand-written histories and on simulated Raft clusters."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etlrouter.raft.core import RaftCore, Role
from etlrouter.testing.linearizability import Operation, OpKind, check_kv_history, check_register
from etlrouter.testing.raft_sim import SCRIPTED, SimOptions, Simulation


def w(client: int, value: int, invoke: float, response: float = math.inf, key: str = "x") -> Operation:
    return Operation(client, OpKind.WRITE, key, value, invoke, response)


def r(client: int, value: int | None, invoke: float, response: float, key: str = "x") -> Operation:
    return Operation(client, OpKind.READ, key, value, invoke, response)


def test_sequential_history_is_linearizable() -> None:
    assert check_register([w(0, 1, 0, 1), r(1, 1, 2, 3), w(0, 2, 4, 5), r(1, 2, 6, 7)])


def test_read_of_initial_value_before_any_write() -> None:
    assert check_register([r(0, None, 0, 1), w(1, 1, 2, 3)])
    assert not check_register([r(0, 1, 0, 1), w(1, 1, 2, 3)])  # reads a value not yet written


def test_stale_read_after_completed_write_is_rejected() -> None:
    assert not check_register([w(0, 1, 0, 1), w(0, 2, 2, 3), r(1, 1, 4, 5)])


def test_concurrent_write_may_be_seen_or_not() -> None:
    history = [w(0, 1, 0, 1), w(0, 2, 2, 10)]
    assert check_register([*history, r(1, 1, 3, 4)])
    assert check_register([*history, r(1, 2, 3, 4)])


def test_reads_cannot_go_back_in_time() -> None:
    # Once a read saw the concurrent write, a later read may not see the older value.
    history = [w(0, 1, 0, 1), w(0, 2, 2, 10), r(1, 2, 3, 4), r(1, 1, 5, 6)]
    assert not check_register(history)


def test_write_with_unknown_outcome_may_take_effect_late_or_never() -> None:
    pending = w(0, 7, 0)  # the client never heard back
    assert check_register([pending, r(1, None, 1, 2), r(1, 7, 3, 4)])
    assert check_register([pending, r(1, None, 1, 2), r(1, None, 3, 4)])
    assert not check_register([pending, r(1, 7, 1, 2), r(1, None, 3, 4)])


def test_history_is_checked_per_key() -> None:
    history = [w(0, 1, 0, 1, key="a"), w(0, 2, 2, 3, key="b"), r(1, 1, 4, 5, key="a"), r(1, 2, 6, 7, key="b")]
    assert check_kv_history(history).ok
    broken = [*history, r(2, 1, 8, 9, key="b")]
    result = check_kv_history(broken)
    assert not result.ok and result.key == "b"
    assert "not linearizable" in result.explain()


def test_invalid_operations_are_refused() -> None:
    with pytest.raises(ValueError, match="strictly after"):
        w(0, 1, 5, 5)
    with pytest.raises(ValueError, match="no response"):
        Operation(0, OpKind.READ, "x", 1, 0, math.inf)


@st.composite
def linearizable_histories(draw: st.DrawFn) -> list[Operation]:
    """Run operations sequentially at distinct instants, then widen each into an interval around it."""
    count = draw(st.integers(1, 9))
    value: int | None = None
    ops = []
    for position in range(count):
        instant = 10 * (position + 1)
        before = draw(st.integers(1, 25))
        after = draw(st.integers(1, 25))
        if draw(st.booleans()):
            value = position
            ops.append(w(position % 3, position, instant - before, instant + after))
        else:
            ops.append(r(position % 3, value, instant - before, instant + after))
    return ops


@settings(max_examples=200, deadline=None)
@given(linearizable_histories())
def test_histories_with_a_linearization_are_accepted(history: list[Operation]) -> None:
    assert check_kv_history(history).ok


@settings(max_examples=200, deadline=None)
@given(linearizable_histories(), st.integers(0, 8))
def test_reading_a_value_never_written_is_rejected(history: list[Operation], which: int) -> None:
    reads = [i for i, op in enumerate(history) if op.kind is OpKind.READ]
    if not reads:
        return
    victim = history[reads[which % len(reads)]]
    history[reads[which % len(reads)]] = r(victim.client, 999, victim.invoke, victim.response)
    assert not check_kv_history(history).ok


# ----------------------------------------------------------------------------- against the cluster


def role_of(core: RaftCore) -> Role:
    return core.role  # a call, so that mypy does not carry narrowing across cluster steps


def _elect(sim: Simulation, node_id: str) -> None:
    core = sim.nodes[node_id].core
    assert core is not None
    core.campaign()
    sim.drain()
    assert core.role is Role.LEADER


def _partitioned_old_leader_history(read_mode: str) -> Simulation:
    """Write 1 through the leader, cut it off, write 2 through a new leader, read at the old one.

    Without CheckQuorum the old leader keeps believing it leads (as it would through a long pause).
    """
    sim = Simulation(0, dataclasses.replace(SCRIPTED, nodes=5, read_mode=read_mode, check_quorum=False))
    _elect(sim, "n0")
    assert sim.client_write(0, "n0", "x", 1)
    sim.drain()
    assert sim.acked_writes
    sim.isolate("n0")
    _elect(sim, "n1")
    assert sim.client_write(1, "n1", "x", 2)
    sim.drain()
    assert len(sim.acked_writes) == 2
    old_leader = sim.nodes["n0"].core
    assert old_leader is not None and old_leader.role is Role.LEADER  # it has not noticed yet
    sim.client_read(2, "n0", "x")
    for _ in range(3 * SCRIPTED.election_tick):
        sim.settle_round()
    sim.heal()
    for _ in range(3):
        sim.settle_round()
    assert role_of(old_leader) is Role.FOLLOWER
    return sim


def test_local_reads_on_a_partitioned_old_leader_are_not_linearizable() -> None:
    sim = _partitioned_old_leader_history("local")
    reads = [op for op in sim.operations() if op.kind is OpKind.READ]
    assert [op.value for op in reads] == [1]  # the stale value, served without a quorum round
    assert not sim.check_history().ok


def test_read_index_on_a_partitioned_old_leader_never_returns_stale_data() -> None:
    sim = _partitioned_old_leader_history("read_index")
    assert [op for op in sim.operations() if op.kind is OpKind.READ] == []  # it never completed
    assert sim.history[-1].failed  # dropped once the old leader stepped down
    assert sim.check_history().ok


def test_random_runs_with_read_index_are_linearizable() -> None:
    checked = 0
    for seed in range(40):
        sim = Simulation(seed, SimOptions(nodes=3, keys=1, steps=800))
        sim.run()  # finish() runs the checker and raises on a violation
        checked += sum(1 for op in sim.operations() if op.kind is OpKind.READ)
    assert checked > 40
