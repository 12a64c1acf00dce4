"""The classic Raft scenarios, scripted on the simulated cluster (every invariant checked per step)."""

from __future__ import annotations

import dataclasses

import pytest

from etlrouter.raft.core import ProposalRejectedError, RaftCore, Role
from etlrouter.raft.types import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    HardState,
    MessageType,
    SnapshotMeta,
)
from etlrouter.testing.raft_sim import SCRIPTED, SimOptions, Simulation

ELECTION = SCRIPTED.election_tick


def scripted(**changes: object) -> SimOptions:
    return dataclasses.replace(SCRIPTED, **changes)  # type: ignore[arg-type]


def core_of(sim: Simulation, node_id: str) -> RaftCore:
    core = sim.nodes[node_id].core
    assert core is not None, f"{node_id} is down"
    return core


def elect(sim: Simulation, node_id: str) -> RaftCore:
    core = core_of(sim, node_id)
    core.campaign()
    sim.drain()
    assert role_of(core) is Role.LEADER, f"{node_id} did not win: {core.role}"
    return core


def settle_until(sim: Simulation, condition: object, rounds: int = 10 * ELECTION) -> None:
    assert callable(condition)
    for _ in range(rounds):
        if condition():
            return
        sim.settle_round()
    assert condition(), f"condition not reached in {rounds} rounds"


def step_until(sim: Simulation, condition: object, limit: int = 1000) -> None:
    """Deliver and process one thing at a time (no ticks) until `condition()` holds."""
    assert callable(condition)
    for _ in range(limit):
        if condition():
            return
        if not sim.deliver(0) and not any(sim.process(node_id) for node_id in sim.ids):
            break
    assert condition(), "the cluster went quiet before the condition held"


def role_of(core: RaftCore) -> Role:
    return core.role  # a call, so that mypy does not carry narrowing across cluster steps


def log_terms(core: RaftCore) -> list[int]:
    return [entry.term for entry in core.entries_between(core.first_index(), core.last_index())]


def fixed_cluster(ids: list[str]) -> SnapshotMeta:
    return SnapshotMeta(index=0, term=0, conf=ConfState(voters=tuple(ids)))


def entries_with_terms(terms: list[int]) -> list[Entry]:
    return [Entry(index=i + 1, term=term) for i, term in enumerate(terms)]


def test_figure_7_leader_repairs_every_kind_of_divergent_log() -> None:
    sim = Simulation(0, scripted(nodes=7))
    ids = sim.ids
    leader_log = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
    follower_logs = {
        "n1": [1, 1, 1, 4, 4, 5, 5, 6, 6],  # (a) missing one entry
        "n2": [1, 1, 1, 4],  # (b) missing many
        "n3": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],  # (c) one extra uncommitted entry
        "n4": [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],  # (d) extra entries of a later term
        "n5": [1, 1, 1, 4, 4, 4, 4],  # (e) missing and extra
        "n6": [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],  # (f) a whole divergent suffix
    }
    sim.install_state("n0", HardState(term=7), entries_with_terms(leader_log), fixed_cluster(ids))
    for node_id, terms in follower_logs.items():
        sim.install_state(node_id, HardState(term=7), entries_with_terms(terms), fixed_cluster(ids))

    leader = elect(sim, "n0")  # (c) and (d) refuse their votes; the other four suffice
    assert leader.term == 8
    expected = [*leader_log, 8]  # plus the leader's no-op
    for node_id in ids:
        assert log_terms(core_of(sim, node_id)) == expected, node_id
        assert core_of(sim, node_id).commit == len(expected)
    # Fast back-off: each lagging follower needs at most one rejection, not one per entry.
    assert sim.delivered[(MessageType.APPEND_RESP, True)] <= 4
    assert sim.stats["truncations"] >= 3  # (c), (d) and (f) overwrote their suffixes


def test_figure_8_entries_of_older_terms_are_not_committed_by_counting_replicas() -> None:
    sim = Simulation(0, scripted(nodes=5, max_entries_per_append=1))
    conf = fixed_cluster(sim.ids)
    # Figure 8 (c): S1 leads again in term 4; index 2 (term 2) is on S1 and S2; S5 holds a
    # conflicting index 2 from term 3 and is down.
    sim.install_state("n0", HardState(term=3), entries_with_terms([1, 2]), conf)
    sim.install_state("n1", HardState(term=3), entries_with_terms([1, 2]), conf)
    sim.install_state("n2", HardState(term=3), entries_with_terms([1]), conf)
    sim.install_state("n3", HardState(term=3), entries_with_terms([1]), conf)
    sim.install_state("n4", HardState(term=3), entries_with_terms([1, 3]), conf)
    sim.crash("n4")
    s1 = core_of(sim, "n0")
    s1.campaign()
    step_until(sim, lambda: s1.role is Role.LEADER)
    assert s1.term == 4
    sim.block_one_way("n0", "n1")

    def index_2_on_a_majority() -> bool:
        progress = [s1.progress(node) for node in ("n2", "n3")]
        return all(p is not None and p.match >= 2 for p in progress)

    step_until(sim, index_2_on_a_majority)
    # S1, S3 and S4 hold index 2, but it is from term 2: counting its replicas must not commit it
    # (if S1 crashed now, S5 could still win an election and overwrite it).
    assert s1.commit == 0
    sim.drain()
    assert s1.commit == 3  # the term-4 no-op reached a majority and carries index 2 with it
    sim.heal()
    sim.restart("n4")
    settle_until(sim, lambda: core_of(sim, "n4").commit == 3)
    assert log_terms(core_of(sim, "n4")) == [1, 2, 4]  # S5's term-3 entry was overwritten


def test_partitioned_old_leader_cannot_commit_steps_down_and_truncates_on_rejoin() -> None:
    sim = Simulation(0, scripted(nodes=5))
    old = elect(sim, "n0")
    old_term = old.term
    assert sim.client_write(0, "n0", "x", 1)
    sim.drain()
    sim.isolate("n0")
    assert sim.client_write(1, "n0", "x", 2)  # accepted into the log, never committed
    stranded_index = old.last_index()
    # CheckQuorum: a full election timeout without hearing from a quorum (the window that was
    # running at the partition may still count old replies, hence up to two).
    for _ in range(2 * ELECTION):
        sim.settle_round()
        assert old.commit < stranded_index
    assert role_of(old) is Role.FOLLOWER
    settle_until(sim, lambda: sim.leader() not in (None, "n0"))
    new_leader_id = sim.leader()
    assert new_leader_id is not None
    assert sim.client_write(2, new_leader_id, "x", 3)
    sim.drain()
    sim.heal()
    new_leader = core_of(sim, new_leader_id)
    settle_until(sim, lambda: old.last_index() == new_leader.last_index() and old.commit == new_leader.commit)
    assert old.term_at(stranded_index) != old_term  # the stranded entry was overwritten
    assert log_terms(old) == log_terms(new_leader)
    stranded = [op for op in sim.history if op.kind.value == "write" and op.value == 2]
    assert stranded[0].failed or stranded[0].response == float("inf")
    assert sim.nodes["n0"].kv == {"x": 3}


@pytest.mark.parametrize("pre_vote", [True, False])
def test_rejoining_node_disrupts_the_cluster_only_without_pre_vote(pre_vote: bool) -> None:
    sim = Simulation(0, scripted(nodes=3, pre_vote=pre_vote, check_quorum=pre_vote))
    leader = elect(sim, "n0")
    term = leader.term
    sim.isolate("n2")
    for _ in range(6 * ELECTION):
        sim.settle_round()
    rejoining = core_of(sim, "n2")
    sim.heal()
    for _ in range(3 * ELECTION):
        sim.settle_round()
    if pre_vote:
        assert rejoining.term == term  # pre-votes failed, so it never bumped its term
        assert role_of(leader) is Role.LEADER and leader.term == term
    else:
        assert leader.term > term  # its higher term deposed the healthy leader


def test_total_crash_and_restart_restores_state_from_storage() -> None:
    sim = Simulation(0, scripted(nodes=3))
    leader = elect(sim, "n1")
    for value in range(1, 6):
        assert sim.client_write(0, "n1", f"k{value % 2}", value)
        sim.drain()
    term, vote = leader.term, leader.vote
    assert len(sim.acked_writes) == 5
    for node_id in sim.ids:
        sim.crash(node_id)
    for node_id in sim.ids:
        sim.restart(node_id)
    restarted = core_of(sim, "n1")
    assert (restarted.term, restarted.vote) == (term, vote)
    assert restarted.last_index() == leader.last_index()
    settle_until(sim, lambda: sim.leader() is not None and all(n.applied >= 8 for n in sim.nodes.values()))
    for node in sim.nodes.values():
        assert node.kv == {"k0": 4, "k1": 5}


def test_follower_behind_the_compaction_point_gets_a_snapshot() -> None:
    sim = Simulation(0, scripted(nodes=3, compact_threshold=5))
    leader = elect(sim, "n0")
    sim.isolate("n2")
    for value in range(20):
        assert sim.client_write(value % 4, "n0", f"k{value % 3}", value)
        sim.drain()
    assert sim.compact("n0")
    lagging = core_of(sim, "n2")
    assert lagging.last_index() < leader.first_index() - 1  # its next entry is gone from the log
    sim.heal()
    settle_until(sim, lambda: sim.nodes["n2"].applied == sim.nodes["n0"].applied)
    assert sim.stats["snapshots_installed"] == 1
    assert sim.nodes["n2"].kv == sim.nodes["n0"].kv
    assert lagging.snapshot.index == leader.snapshot.index
    # It keeps replicating normally afterwards.
    assert sim.client_write(0, "n0", "k0", 100)
    sim.drain()
    assert sim.nodes["n2"].kv["k0"] == 100


def test_removing_the_leader_makes_it_step_down_after_the_removal_commits() -> None:
    sim = Simulation(0, scripted(nodes=3))
    leader = elect(sim, "n0")
    accepted = leader.propose_conf_change(ConfChange(ConfChangeKind.REMOVE_NODE, "n0"))
    assert leader.conf_state.voters == ("n1", "n2")  # in effect as soon as it is appended
    with pytest.raises(ProposalRejectedError):
        leader.propose(b"late")
    sim.drain()
    assert leader.commit >= accepted.index
    assert role_of(leader) is Role.FOLLOWER
    settle_until(sim, lambda: sim.leader() in ("n1", "n2"))
    new_leader_id = sim.leader()
    assert new_leader_id is not None
    assert sim.client_write(0, new_leader_id, "x", 1)
    sim.drain()
    assert sim.acked_writes
    for _ in range(3 * ELECTION):  # the removed node must not disturb the rest
        sim.settle_round()
    assert sim.leader() == new_leader_id
    assert role_of(leader) is not Role.LEADER


def test_transfer_leadership_to_a_slow_node_waits_for_it_to_catch_up() -> None:
    sim = Simulation(0, scripted(nodes=3))
    leader = elect(sim, "n0")
    sim.isolate("n2")
    for value in range(6):
        assert sim.client_write(0, "n0", "x", value)
        sim.drain()
    slow = core_of(sim, "n2")
    assert slow.last_index() < leader.last_index()
    sim.heal()
    leader.transfer_leadership("n2")
    assert not sim.client_write(1, "n0", "x", 99)  # refused during the transfer
    settle_until(sim, lambda: slow.role is Role.LEADER, rounds=ELECTION - 1)
    assert slow.term == leader.term and role_of(leader) is Role.FOLLOWER
    assert sim.client_write(1, "n2", "x", 7)
    sim.drain()
    assert all(node.kv == {"x": 7} for node in sim.nodes.values())


def test_transfer_to_an_unreachable_node_is_aborted_after_an_election_timeout() -> None:
    sim = Simulation(0, scripted(nodes=3))
    leader = elect(sim, "n0")
    sim.isolate("n2")
    assert sim.client_write(0, "n0", "x", 1)
    sim.drain()
    leader.transfer_leadership("n2")
    assert leader.lead_transferee == "n2"
    with pytest.raises(ProposalRejectedError):
        leader.propose(b"refused")
    for _ in range(ELECTION):
        sim.settle_round()
    assert role_of(leader) is Role.LEADER and leader.lead_transferee is None
    assert sim.client_write(0, "n0", "x", 2)


def test_read_index_on_a_fresh_leader_waits_for_its_first_commit() -> None:
    sim = Simulation(0, scripted(nodes=3))
    elect(sim, "n0")
    assert sim.client_write(0, "n0", "x", 1)
    sim.drain()
    candidate = core_of(sim, "n1")
    core_of(sim, "n0").transfer_leadership("n1")  # the others are in the lease: no plain election
    step_until(sim, lambda: candidate.role is Role.LEADER)
    noop_index = candidate.last_index()
    assert candidate.commit < noop_index  # it does not know what is committed yet
    assert sim.client_read(1, "n1", "x")
    sim.process("n1")
    assert sim.read_states == []
    sim.drain()
    [(node_id, read, _)] = sim.read_states
    assert node_id == "n1" and read.index >= noop_index
    assert [op.value for op in sim.operations() if op.kind.value == "read"] == [1]


def test_read_index_needs_a_quorum_round_but_lease_reads_do_not() -> None:
    for mode, expect_immediate in (("read_index", False), ("lease", True)):
        sim = Simulation(0, scripted(nodes=3, read_mode=mode))
        leader = elect(sim, "n0")
        sim.isolate("n0")
        leader.read_index(b"ctx")
        rd = leader.ready()
        assert bool(rd.read_states) is expect_immediate, mode
        if not expect_immediate:
            heartbeats = [m for m in rd.messages if m.type is MessageType.HEARTBEAT]
            assert {m.context for m in heartbeats} == {b"ctx"}
        leader.advance(rd)


def test_learner_catches_up_without_voting_then_is_promoted() -> None:
    sim = Simulation(0, scripted(nodes=3, spare_nodes=1))
    leader = elect(sim, "n0")
    for value in range(5):
        assert sim.client_write(0, "n0", "x", value)
        sim.drain()
    leader.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, "n3", address="10.0.0.3:7000"))
    with pytest.raises(ProposalRejectedError, match="not committed yet"):
        leader.propose_conf_change(ConfChange(ConfChangeKind.ADD_VOTER, "n3"))  # one at a time
    sim.drain()
    learner = core_of(sim, "n3")
    assert learner.conf_state.learners == ("n3",)
    assert sim.nodes["n3"].kv == {"x": 4}
    assert leader.addresses["n3"] == "10.0.0.3:7000"
    sim.isolate("n3")
    assert sim.client_write(0, "n0", "x", 10)  # learners do not count for the quorum
    sim.drain()
    assert sim.nodes["n0"].kv == {"x": 10}
    for _ in range(3 * ELECTION):
        sim.settle_round()
    assert role_of(learner) is Role.FOLLOWER and learner.term == leader.term  # never campaigned
    sim.heal()
    sim.settle_round()
    leader.propose_conf_change(ConfChange(ConfChangeKind.ADD_VOTER, "n3"))
    sim.drain()
    assert set(learner.conf_state.voters) == {"n0", "n1", "n2", "n3"}
    assert list(learner.conf_state.learners) == []
    assert leader.progress("n3") is not None
