"""Unit tests of RaftCore's API and Ready contract, driven by hand-made messages."""

from __future__ import annotations

import random

import pytest

from etlrouter.raft.core import (
    EMPTY_SNAPSHOT,
    NotLeaderError,
    ProgressState,
    ProposalRejectedError,
    RaftConfig,
    RaftCore,
    ReadOnlyMode,
    Ready,
    Role,
    bootstrap,
    decode_conf_change,
    encode_conf_change,
)
from etlrouter.raft.types import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    SnapshotMeta,
)


def config(node: str, **changes: object) -> RaftConfig:
    return RaftConfig(node_id=node, rng=random.Random(7), **changes)  # type: ignore[arg-type]


def new_core(node: str, voters: tuple[str, ...], **changes: object) -> RaftCore:
    meta = SnapshotMeta(index=0, term=0, conf=ConfState(voters=voters))
    return RaftCore(config(node, **changes), HardState(term=1), meta, [])


def handle(core: RaftCore) -> Ready:
    """Act as a driver that persists instantly: take one Ready and advance it."""
    rd = core.ready()
    core.advance(rd)
    return rd


def make_leader(voters: tuple[str, ...] = ("a", "b", "c"), **changes: object) -> RaftCore:
    core = new_core(voters[0], voters, **changes)
    core.campaign()
    handle(core)
    for voter in voters[1:]:
        core.step(Message(type=MessageType.PRE_VOTE_RESP, sender=voter, to=core.id, term=core.term + 1))
    handle(core)
    for voter in voters[1:]:
        core.step(Message(type=MessageType.VOTE_RESP, sender=voter, to=core.id, term=core.term))
    assert core.role is Role.LEADER
    handle(core)
    return core


def ack(core: RaftCore, sender: str, index: int) -> None:
    core.step(Message(type=MessageType.APPEND_RESP, sender=sender, to=core.id, term=core.term, index=index))


def appends_to(rd: Ready, node: str) -> list[Message]:
    return [m for m in rd.messages if m.to == node and m.type is MessageType.APPEND]


def test_single_node_commits_only_what_it_has_persisted() -> None:
    boot = bootstrap(["solo"])
    core = RaftCore(config("solo"), boot.hard_state, boot.snapshot_meta, boot.entries)
    assert core.conf_state.voters == ("solo",)
    core.campaign()
    assert core.role is Role.LEADER
    rd = core.ready()
    assert [e.index for e in rd.entries] == [2]  # the no-op after the bootstrap entry
    assert rd.hard_state is not None and rd.hard_state.commit == 1
    core.advance(rd)
    accepted = core.propose(b"cmd")
    assert (accepted.index, accepted.term) == (3, core.term)
    rd = core.ready()
    assert rd.committed_entries == () or rd.committed_entries[-1].index < 3  # not persisted yet
    core.advance(rd)
    rd = handle(core)
    assert [e.data for e in rd.committed_entries][-1] == b"cmd"


def test_bootstrap_writes_membership_as_committed_entries() -> None:
    boot = bootstrap(["a", "b"], {"a": "h1:1"})
    assert boot.hard_state.commit == 2
    assert [decode_conf_change(e.data).node for e in boot.entries] == ["a", "b"]
    assert all(e.kind is EntryKind.CONF_CHANGE for e in boot.entries)
    core = RaftCore(config("b"), boot.hard_state, boot.snapshot_meta, boot.entries)
    assert core.conf_state == ConfState(voters=("a", "b"))
    assert core.addresses == {"a": "h1:1"}
    with pytest.raises(ValueError, match="distinct"):
        bootstrap(["a", "a"])


def test_followers_refuse_requests_with_a_leader_hint() -> None:
    follower = new_core("b", ("a", "b", "c"))
    follower.step(Message(type=MessageType.HEARTBEAT, sender="a", to="b", term=2))
    for request in (lambda: follower.propose(b"x"), lambda: follower.read_index(b"r")):
        with pytest.raises(NotLeaderError) as refused:
            request()
        assert refused.value.leader_hint == "a"
        assert "'b' is not the leader" in str(refused.value)


def test_granted_vote_is_persisted_in_the_same_ready_as_the_reply() -> None:
    voter = new_core("b", ("a", "b", "c"))
    voter.step(Message(type=MessageType.VOTE, sender="a", to="b", term=5, index=0, log_term=0))
    rd = voter.ready()
    assert rd.hard_state == HardState(term=5, vote="a", commit=0)
    [reply] = rd.messages
    assert reply.type is MessageType.VOTE_RESP and not reply.reject and reply.term == 5
    voter.advance(rd)
    voter.step(Message(type=MessageType.VOTE, sender="c", to="b", term=5))
    [second] = handle(voter).messages
    assert second.reject  # one vote per term


def test_stale_log_does_not_get_the_vote() -> None:
    meta = SnapshotMeta(index=0, term=0, conf=ConfState(voters=("a", "b", "c")))
    voter = RaftCore(config("b"), HardState(term=3), meta, [Entry(1, 1), Entry(2, 3)])
    voter.step(Message(type=MessageType.VOTE, sender="a", to="b", term=4, index=5, log_term=2))
    [reply] = handle(voter).messages
    assert reply.reject and voter.vote == ""


def test_proposals_coalesce_into_pipelined_batches_within_the_window() -> None:
    leader = make_leader(max_entries_per_append=4, max_inflight_appends=2)
    ack(leader, "b", leader.last_index())  # b enters REPLICATE
    handle(leader)
    progress = leader.progress("b")
    assert progress is not None and progress.state is ProgressState.REPLICATE
    for i in range(10):
        leader.propose(f"cmd{i}".encode())
    rd = leader.ready()
    assert len(rd.entries) == 10  # one write for all ten proposals
    sent = appends_to(rd, "b")
    assert [len(m.entries) for m in sent] == [4, 4]  # two in flight, four entries each
    leader.advance(rd)
    ack(leader, "b", sent[0].entries[-1].index)
    more = appends_to(handle(leader), "b")
    assert [len(m.entries) for m in more] == [2]  # the freed slot carries the rest


def test_append_batches_are_capped_by_bytes() -> None:
    leader = make_leader(max_bytes_per_append=1000)
    ack(leader, "b", leader.last_index())
    handle(leader)
    for _ in range(5):
        leader.propose(b"x" * 400)
    sizes = [len(m.entries) for m in appends_to(handle(leader), "b")]
    assert sizes and max(sizes) == 2 and sum(sizes) == 5


def test_rejection_hint_skips_a_whole_conflicting_term() -> None:
    leader = make_leader()
    for i in range(5):
        leader.propose(str(i).encode())
    handle(leader)
    last = leader.last_index()
    # The follower has only index 1 with a term older than ours.
    leader.step(
        Message(
            type=MessageType.APPEND_RESP,
            sender="c",
            to="a",
            term=leader.term,
            index=last,
            reject=True,
            reject_hint=1,
            reject_term=1,
        )
    )
    progress = leader.progress("c")
    assert progress is not None and progress.next <= 2


def test_read_index_waits_for_a_heartbeat_quorum() -> None:
    leader = make_leader()
    ack(leader, "b", leader.last_index())  # commits the no-op of this term
    handle(leader)
    leader.read_index(b"r1")
    leader.read_index(b"r2")
    rd = handle(leader)
    assert rd.read_states == ()
    heartbeats = [m for m in rd.messages if m.type is MessageType.HEARTBEAT]
    # Reads that arrive together share one heartbeat round, carrying the newest context.
    assert sorted((m.to, m.context) for m in heartbeats) == [("b", b"r2"), ("c", b"r2")]
    leader.step(Message(type=MessageType.HEARTBEAT_RESP, sender="c", to="a", term=leader.term, context=b"r2"))
    reads = handle(leader).read_states
    assert [(read.context, read.index) for read in reads] == [(b"r1", leader.commit), (b"r2", leader.commit)]
    with pytest.raises(ValueError, match="non-empty"):
        leader.read_index(b"")


def test_lease_reads_answer_without_a_round_trip() -> None:
    leader = make_leader(read_only_mode=ReadOnlyMode.LEASE_BASED)
    ack(leader, "b", leader.last_index())
    handle(leader)
    leader.read_index(b"r1")
    assert [r.context for r in handle(leader).read_states] == [b"r1"]
    with pytest.raises(ValueError, match="check_quorum"):
        config("a", read_only_mode=ReadOnlyMode.LEASE_BASED, check_quorum=False)


def test_pending_reads_are_reported_dropped_when_leadership_is_lost() -> None:
    leader = make_leader()
    leader.read_index(b"early")  # before the no-op commits: queued
    leader.step(Message(type=MessageType.HEARTBEAT, sender="b", to="a", term=leader.term + 1))
    assert leader.role is Role.FOLLOWER
    assert handle(leader).dropped_reads == (b"early",)


def test_membership_change_validation() -> None:
    leader = make_leader()
    with pytest.raises(ProposalRejectedError, match="not committed yet"):
        leader.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, "d"))  # no-op not committed
    ack(leader, "b", leader.last_index())
    handle(leader)
    with pytest.raises(ProposalRejectedError, match="already a voter"):
        leader.propose_conf_change(ConfChange(ConfChangeKind.ADD_VOTER, "b"))
    with pytest.raises(ProposalRejectedError, match="not a member"):
        leader.propose_conf_change(ConfChange(ConfChangeKind.REMOVE_NODE, "zz"))
    leader.propose_conf_change(ConfChange(ConfChangeKind.ADD_LEARNER, "d"))
    assert leader.conf_state.learners == ("d",)
    assert leader.progress("d") is not None
    with pytest.raises(ValueError, match="not a voter"):
        leader.transfer_leadership("d")


def test_truncated_conf_change_is_reverted() -> None:
    meta = SnapshotMeta(index=0, term=0, conf=ConfState(voters=("a", "b", "c")))
    follower = RaftCore(config("c"), HardState(term=2), meta, [Entry(1, 1)])
    change = ConfChange(ConfChangeKind.REMOVE_NODE, "b")
    uncommitted = Entry(2, 2, EntryKind.CONF_CHANGE, encode_conf_change(change))
    follower.step(
        Message(
            type=MessageType.APPEND, sender="a", to="c", term=2, index=1, log_term=1, entries=(uncommitted,)
        )
    )
    assert follower.conf_state.voters == ("a", "c")
    follower.step(
        Message(
            type=MessageType.APPEND, sender="b", to="c", term=3, index=1, log_term=1, entries=(Entry(2, 3),)
        )
    )
    assert list(follower.conf_state.voters) == ["a", "b", "c"]
    rd = follower.ready()
    assert rd.truncate_from is None or rd.truncate_from == 2
    assert [e.term for e in rd.entries] == [3]


def test_ready_reports_truncation_of_already_emitted_entries() -> None:
    meta = SnapshotMeta(index=0, term=0, conf=ConfState(voters=("a", "b", "c")))
    follower = RaftCore(config("c"), HardState(term=2), meta, [Entry(1, 1)])
    entries = (Entry(2, 2), Entry(3, 2))
    follower.step(
        Message(type=MessageType.APPEND, sender="a", to="c", term=2, index=1, log_term=1, entries=entries)
    )
    handle(follower)
    follower.step(
        Message(
            type=MessageType.APPEND, sender="b", to="c", term=3, index=1, log_term=1, entries=(Entry(2, 3),)
        )
    )
    rd = follower.ready()
    assert rd.truncate_from == 2 and [e.index for e in rd.entries] == [2]


def test_compaction_and_restart_from_a_snapshot() -> None:
    leader = make_leader(("a",))
    for i in range(5):
        leader.propose(str(i).encode())
    while leader.has_ready():
        handle(leader)
    applied = leader.applied
    meta = leader.compact(applied)
    assert meta.index == applied and leader.first_index() == applied + 1
    assert meta.conf.voters == ("a",)
    with pytest.raises(ValueError, match="cannot describe"):
        leader.snapshot_meta_at(applied + 100)
    restarted = RaftCore(config("a"), leader.hard_state(), meta, [])
    assert restarted.last_index() == applied and restarted.applied == applied
    assert restarted.term_at(applied) == meta.term and restarted.term_at(applied - 1) is None


def test_driver_misuse_is_reported() -> None:
    core = new_core("a", ("a",))
    core.campaign()
    rd = core.ready()
    with pytest.raises(RuntimeError, match="before advance"):
        core.ready()
    core.advance(rd)
    with pytest.raises(RuntimeError, match="without an outstanding"):
        core.advance(rd)
    with pytest.raises(ValueError, match="addressed to"):
        core.step(Message(type=MessageType.HEARTBEAT, sender="b", to="zz", term=1))
    with pytest.raises(ValueError, match="not contiguous"):
        RaftCore(config("a"), HardState(), EMPTY_SNAPSHOT, [Entry(1, 1), Entry(3, 1)])
    with pytest.raises(ValueError, match="beyond the last"):
        RaftCore(config("a"), HardState(term=1, commit=5), EMPTY_SNAPSHOT, [Entry(1, 1)])
    with pytest.raises(ValueError, match="heartbeat_tick"):
        config("a", election_tick=1)
