"""The pure Raft consensus core, in the style of etcd-io/raft.

`RaftCore` is a deterministic state machine: no clocks, sockets, files or global randomness. The
driver feeds it time (`tick()`), messages from peers (`step(msg)`) and client requests (`propose`,
`propose_conf_change`, `read_index`, `transfer_leadership`), then drains its decisions with
`ready()` and acknowledges them with `advance(ready)`.

The driver contract (what makes the core's decisions safe):

1. `rd = core.ready()` (only when `core.has_ready()`; never twice without `advance` in between).
2. Persist, durably (fsync), in this order: `rd.snapshot` with `rd.snapshot_data` (installing a
   snapshot replaces the stored snapshot and discards every stored entry), then discard stored
   entries with index >= `rd.truncate_from` when it is set, then append `rd.entries` (the first
   one always lands right after the last stored index), then `rd.hard_state` when set.
   `truncate_from` is the first index whose previously emitted entry was overwritten.
3. Only after that fsync: send `rd.messages`. Votes and append acknowledgements in there promise
   that the state in (2) is durable. A SNAPSHOT message carries only `snapshot` metadata; the
   driver attaches `snapshot_data` from the state machine snapshot taken at `snapshot.index`
   (the one it passed to `compact`) before sending.
4. Install `rd.snapshot` into the state machine (if set), then apply `rd.committed_entries` in
   order. `rd.read_states` are linearizable reads: serve each once the state machine has applied
   `read_state.index`. `rd.dropped_reads` lists read contexts that will never complete (leadership
   was lost): fail or retry them.
5. `core.advance(rd)`. Steps and ticks may be interleaved between `ready()` and `advance()`.

`rd.soft_state` (leader, role, term) and `rd.conf_state` (membership) are set when they changed;
they are informational (nothing to persist). `core.addresses` maps members to the addresses their
conf changes carried. Compaction: after snapshotting the state machine at an applied index `i`,
call `meta = core.compact(i)` (or `core.snapshot_meta_at(i)` first), store the snapshot with
`meta`, and drop stored entries up to `i`. If a SNAPSHOT message asks for a snapshot the driver no
longer holds (it compacted again since), drop the message and call
`core.report_snapshot(peer, success=False)`; the leader then sends a fresh one.

A crash at any point is fine: restart with `RaftCore(config, hard_state, snapshot_meta, entries)`
from what storage holds (see `bootstrap()` for a brand-new cluster). The leader counts itself
towards a commit quorum only for entries it has persisted (acknowledged through `advance`).

Design choices:
- Membership changes are single-server changes that take effect as soon as the entry is appended
  (Raft dissertation §4.1), not when committed: every node uses the latest configuration in its
  log, and reverts it if that entry is truncated. A leader accepts a change only once an entry of
  its own term has committed and no earlier change is uncommitted (the fix for the known
  single-server-change bug). A leader that removed itself keeps replicating, without counting its
  own vote, until the removal commits, then steps down.
- The initial cluster is bootstrapped with conf-change entries in the log (as etcd does), so a node
  that joins with an empty log learns the whole membership history by replicating it.
- Votes are granted regardless of whether the candidate is in our configuration (it may know a
  newer one; refusing can deadlock elections). Removed nodes are kept from disrupting the cluster
  by PreVote and the CheckQuorum lease: nodes that hear from a live leader ignore their campaigns.
- ReadIndex (`ReadOnlyMode.SAFE`) confirms leadership with a heartbeat round that carries the read
  context; `ReadOnlyMode.LEASE_BASED` answers from the leader's lease alone and is weaker: it is
  only correct if clocks drift less than the gap between the election timeout and a lost lease.
- Non-leaders refuse proposals and reads with `NotLeaderError(leader_hint)`; forwarding to the
  leader is the driver's job.
"""

from __future__ import annotations

import bisect
import enum
import random
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from etlrouter.raft.types import (
    ConfChange,
    ConfChangeKind,
    ConfState,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    NodeId,
    SnapshotMeta,
)

NO_NODE: NodeId = ""
# VOTE context marking a campaign started by TIMEOUT_NOW: voters skip the lease check for it.
TRANSFER_CONTEXT = b"transfer"


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class ReadOnlyMode(enum.Enum):
    SAFE = "safe"  # ReadIndex: a heartbeat round confirms leadership for every read
    LEASE_BASED = "lease_based"  # trusts the CheckQuorum lease: needs bounded clock drift


class ProgressState(enum.Enum):
    PROBE = "probe"  # one append per heartbeat until the follower's match index is found
    REPLICATE = "replicate"  # pipelined appends, bounded by the in-flight window
    SNAPSHOT = "snapshot"  # waiting for the follower to install a snapshot


class RaftError(Exception):
    """Base for requests the core refuses."""


class NotLeaderError(RaftError):
    def __init__(self, node: NodeId, leader_hint: NodeId | None) -> None:
        self.leader_hint = leader_hint
        super().__init__(f"raft node {node!r} is not the leader (leader hint: {leader_hint or 'unknown'})")


class ProposalRejectedError(RaftError):
    """The leader refused the request; the message says why (retrying later may succeed)."""


@dataclass(frozen=True, slots=True)
class RaftConfig:
    node_id: NodeId
    rng: random.Random  # seeds the randomized election timeout; the only source of randomness
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    read_only_mode: ReadOnlyMode = ReadOnlyMode.SAFE
    max_entries_per_append: int = 64
    max_bytes_per_append: int = 1 << 20
    max_inflight_appends: int = 64  # per follower, in REPLICATE state

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("RaftConfig.node_id must be a non-empty node id")
        if self.heartbeat_tick < 1 or self.election_tick <= self.heartbeat_tick:
            raise ValueError(
                f"RaftConfig needs 1 <= heartbeat_tick < election_tick, got heartbeat_tick="
                f"{self.heartbeat_tick} election_tick={self.election_tick}"
            )
        if self.max_entries_per_append < 1 or self.max_inflight_appends < 1:
            raise ValueError("RaftConfig.max_entries_per_append and max_inflight_appends must be >= 1")
        if self.read_only_mode is ReadOnlyMode.LEASE_BASED and not self.check_quorum:
            raise ValueError("ReadOnlyMode.LEASE_BASED requires check_quorum=True (the lease comes from it)")


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the driver may want to observe; never persisted."""

    leader: NodeId  # NO_NODE when unknown
    role: Role
    term: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """A completed ReadIndex request: reading after `index` is applied is linearizable."""

    context: bytes
    index: int


@dataclass(frozen=True, slots=True)
class ProposalAccepted:
    """Where an accepted proposal sits. It is committed iff the entry applied at `index` has `term`."""

    index: int
    term: int


@dataclass(frozen=True, slots=True)
class Ready:
    soft_state: SoftState | None
    hard_state: HardState | None
    truncate_from: int | None
    entries: tuple[Entry, ...]
    snapshot: SnapshotMeta | None
    snapshot_data: bytes
    messages: tuple[Message, ...]
    committed_entries: tuple[Entry, ...]
    read_states: tuple[ReadState, ...]
    dropped_reads: tuple[bytes, ...]
    conf_state: ConfState | None  # the membership changed since the previous Ready

    @property
    def must_sync(self) -> bool:
        return bool(self.entries) or self.hard_state is not None or self.snapshot is not None


@dataclass(slots=True)
class Progress:
    """The leader's view of one follower (etcd's Progress)."""

    match: int
    next: int
    state: ProgressState = ProgressState.PROBE
    probe_sent: bool = False  # PROBE: an append is outstanding; wait for a reply or a heartbeat
    inflight: deque[int] = field(default_factory=deque)  # REPLICATE: last index of each unacked append
    pending_snapshot: int = 0
    snapshot_ticks: int = 0
    recent_active: bool = False

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.probe_sent = False
        self.inflight.clear()
        self.pending_snapshot = 0

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.probe_sent = False
        self.inflight.clear()

    def become_snapshot(self, index: int) -> None:
        self.state = ProgressState.SNAPSHOT
        self.pending_snapshot = index
        self.snapshot_ticks = 0
        self.inflight.clear()

    def maybe_update(self, index: int) -> bool:
        """A follower acknowledged up to `index`; returns whether that is news."""
        updated = index > self.match
        if updated:
            self.match = index
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """An append at `rejected` was refused; returns False when the refusal is stale."""
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.probe_sent = False
        return True

    def is_paused(self, max_inflight: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        if self.state is ProgressState.REPLICATE:
            return len(self.inflight) >= max_inflight
        return True


@dataclass(slots=True)
class _PendingRead:
    context: bytes
    index: int
    acks: set[NodeId]


@dataclass(frozen=True, slots=True)
class _ConfPoint:
    """The configuration that takes effect with the conf-change entry at `index`."""

    index: int
    conf: ConfState
    addresses: dict[NodeId, str]


def encode_conf_change(change: ConfChange) -> bytes:
    return msgspec.msgpack.encode(change)


def decode_conf_change(data: bytes) -> ConfChange:
    return msgspec.msgpack.decode(data, type=ConfChange)


@dataclass(frozen=True, slots=True)
class BootState:
    hard_state: HardState
    snapshot_meta: SnapshotMeta
    entries: tuple[Entry, ...]


EMPTY_SNAPSHOT = SnapshotMeta(index=0, term=0, conf=ConfState())


def bootstrap(voters: Sequence[NodeId], addresses: dict[NodeId, str] | None = None) -> BootState:
    """Initial persisted state for every founding member of a new cluster.

    The membership is written as committed conf-change entries (term 1), so nodes that join later
    with an empty log replay it. Nodes that join later start from `BootState(HardState(),
    EMPTY_SNAPSHOT, ())` instead and wait for the leader to contact them.
    """
    if not voters or len(set(voters)) != len(voters):
        raise ValueError(f"bootstrap needs distinct, non-empty voter ids, got {list(voters)!r}")
    addresses = addresses or {}
    entries = tuple(
        Entry(
            index=i + 1,
            term=1,
            kind=EntryKind.CONF_CHANGE,
            data=encode_conf_change(ConfChange(ConfChangeKind.ADD_VOTER, node, addresses.get(node, ""))),
        )
        for i, node in enumerate(voters)
    )
    return BootState(HardState(term=1, vote="", commit=len(entries)), EMPTY_SNAPSHOT, entries)


def _apply_conf_change(
    conf: ConfState, addresses: dict[NodeId, str], change: ConfChange
) -> tuple[ConfState, dict[NodeId, str]]:
    voters = [v for v in conf.voters if v != change.node]
    learners = [n for n in conf.learners if n != change.node]
    new_addresses = dict(addresses)
    if change.kind is ConfChangeKind.ADD_VOTER:
        voters.append(change.node)
    elif change.kind is ConfChangeKind.ADD_LEARNER:
        learners.append(change.node)
    if change.kind is ConfChangeKind.REMOVE_NODE:
        new_addresses.pop(change.node, None)
    elif change.address:
        new_addresses[change.node] = change.address
    return ConfState(voters=tuple(voters), learners=tuple(learners)), new_addresses


def _entry_size(entry: Entry) -> int:
    return len(entry.data) + 24


class RaftCore:
    """One Raft peer's consensus logic. See the module docstring for the driver contract."""

    def __init__(
        self,
        config: RaftConfig,
        hard_state: HardState | None = None,
        snapshot_meta: SnapshotMeta | None = None,
        entries: Iterable[Entry] = (),
    ) -> None:
        self.config = config
        self.id = config.node_id
        hard_state = hard_state or HardState()
        snapshot_meta = snapshot_meta or EMPTY_SNAPSHOT

        # The log: entries after the snapshot, contiguous. _log[i].index == _offset + 1 + i.
        self._offset = snapshot_meta.index
        self._offset_term = snapshot_meta.term
        self._snapshot = snapshot_meta
        self._log: list[Entry] = []
        for entry in entries:
            if entry.index <= self._offset:
                continue
            if entry.index != self._offset + 1 + len(self._log):
                raise ValueError(
                    f"raft node {self.id!r}: stored entries are not contiguous after snapshot "
                    f"{self._offset}: got index {entry.index}, expected {self._offset + 1 + len(self._log)}"
                )
            self._log.append(entry)

        self.term = hard_state.term
        self.vote = hard_state.vote
        if hard_state.commit > self.last_index():
            raise ValueError(
                f"raft node {self.id!r}: hard state commit {hard_state.commit} is beyond the last "
                f"stored index {self.last_index()}"
            )
        self.commit = max(hard_state.commit, self._offset)
        self.applied = self._offset  # the state machine restarts from the snapshot

        self.role = Role.FOLLOWER
        # Membership: the snapshot's configuration, then every conf-change entry in the log.
        self._base_conf = snapshot_meta.conf
        self._base_addresses = dict(snapshot_meta.addresses)
        self._conf_points: list[_ConfPoint] = []
        self._replay_conf(self._log)

        self.leader: NodeId = NO_NODE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_timeout = config.election_tick
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, Progress] = {}
        self._lead_transferee: NodeId | None = None
        self._pending_conf_index = 0
        self._pending_reads: dict[bytes, _PendingRead] = {}
        self._read_queue: deque[bytes] = deque()
        self._reads_awaiting_term_commit: list[bytes] = []
        self._broadcast_pending = False
        self._read_round_pending = False

        # Ready bookkeeping.
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._dropped_reads: list[bytes] = []
        self._unstable_from = self.last_index() + 1  # entries from here on are not yet handed out
        self._truncate_from: int | None = None
        self._persisted = self.last_index()  # acknowledged through advance(): counts for the quorum
        self._pending_snapshot_install: tuple[SnapshotMeta, bytes] | None = None
        self._prev_hard = HardState(self.term, self.vote, self.commit)
        self._prev_soft = SoftState(self.leader, self.role, self.term)
        self._prev_conf = self.conf_state
        self._ready_outstanding = False
        self._reset_randomized_timeout()

    # ----------------------------------------------------------------------------- log access

    def last_index(self) -> int:
        return self._offset + len(self._log)

    def last_term(self) -> int:
        return self._log[-1].term if self._log else self._offset_term

    def first_index(self) -> int:
        return self._offset + 1

    def term_at(self, index: int) -> int | None:
        """Term of the entry at `index`, or None when it is compacted away or not in the log."""
        if index == self._offset:
            return self._offset_term
        if index < self._offset or index > self.last_index():
            return None
        return self._log[index - self._offset - 1].term

    def entries_between(self, low: int, high: int) -> list[Entry]:
        """Entries with low <= index <= high (clamped to the log)."""
        low = max(low, self._offset + 1)
        high = min(high, self.last_index())
        if low > high:
            return []
        return self._log[low - self._offset - 1 : high - self._offset]

    def _match_term(self, index: int, term: int) -> bool:
        return self.term_at(index) == term

    def _is_up_to_date(self, last_index: int, last_term: int) -> bool:
        return last_term > self.last_term() or (
            last_term == self.last_term() and last_index >= self.last_index()
        )

    # ----------------------------------------------------------------------------- membership

    @property
    def conf_state(self) -> ConfState:
        return self._conf_points[-1].conf if self._conf_points else self._base_conf

    @property
    def addresses(self) -> dict[NodeId, str]:
        return dict(self._conf_points[-1].addresses if self._conf_points else self._base_addresses)

    def _conf_at(self, index: int) -> tuple[ConfState, dict[NodeId, str]]:
        chosen: tuple[ConfState, dict[NodeId, str]] = (self._base_conf, self._base_addresses)
        for point in self._conf_points:
            if point.index > index:
                break
            chosen = (point.conf, point.addresses)
        return chosen

    def _replay_conf(self, entries: Iterable[Entry]) -> None:
        changed = False
        for entry in entries:
            if entry.kind is not EntryKind.CONF_CHANGE:
                continue
            conf, addresses = _apply_conf_change(
                self.conf_state, self.addresses, decode_conf_change(entry.data)
            )
            self._conf_points.append(_ConfPoint(entry.index, conf, addresses))
            changed = True
        if changed:
            self._on_conf_changed()

    def _voters(self) -> tuple[NodeId, ...]:
        return self.conf_state.voters

    def _members(self) -> tuple[NodeId, ...]:
        conf = self.conf_state
        return conf.voters + conf.learners

    def _promotable(self) -> bool:
        return self.id in self.conf_state.voters

    def _quorum(self) -> int:
        return len(self._voters()) // 2 + 1

    def _on_conf_changed(self) -> None:
        if self.role is not Role.LEADER:
            return
        members = set(self._members())
        for node in list(self._progress):
            if node not in members:
                del self._progress[node]
        for node in members:
            if node not in self._progress:
                self._progress[node] = Progress(match=0, next=self.last_index() + 1)
        if self._lead_transferee is not None and self._lead_transferee not in self._voters():
            self._lead_transferee = None
        self._self_progress_sync()
        # A smaller voter set may already make more entries (and reads) safe.
        self._maybe_commit()
        for context in list(self._read_queue):
            self._check_read_quorum(context)

    # ----------------------------------------------------------------------------- role changes

    def _reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NO_NODE
        self.leader = NO_NODE
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_randomized_timeout()
        self._votes = {}
        self._lead_transferee = None
        self._broadcast_pending = False
        self._drop_pending_reads()

    def _reset_randomized_timeout(self) -> None:
        tick = self.config.election_tick
        self._randomized_timeout = tick + self.config.rng.randrange(tick)

    def _drop_pending_reads(self) -> None:
        self._dropped_reads.extend(self._read_queue)
        self._dropped_reads.extend(self._reads_awaiting_term_commit)
        self._pending_reads.clear()
        self._read_queue.clear()
        self._reads_awaiting_term_commit.clear()

    def _become_follower(self, term: int, leader: NodeId) -> None:
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader = leader
        self._progress = {}

    def _become_pre_candidate(self) -> None:
        # PreVote: neither the term nor the vote changes until a real election is won.
        self._votes = {}
        self.leader = NO_NODE
        self.role = Role.PRE_CANDIDATE
        self._progress = {}
        self._reset_randomized_timeout()
        self._drop_pending_reads()

    def _become_candidate(self) -> None:
        self._reset(self.term + 1)
        self.vote = self.id
        self.role = Role.CANDIDATE
        self._progress = {}

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader = self.id
        last = self.last_index()
        self._progress = {node: Progress(match=0, next=last + 1) for node in self._members()}
        self._self_progress_sync()
        noop = Entry(index=last + 1, term=self.term)
        self._append_entries([noop])
        # Conf changes wait until an entry of this term (the no-op) commits.
        self._pending_conf_index = noop.index
        self._broadcast_pending = True

    def _self_progress_sync(self) -> None:
        own = self._progress.get(self.id)
        if own is not None:
            own.match = max(own.match, self._persisted)
            own.next = self.last_index() + 1
            own.recent_active = True

    # ----------------------------------------------------------------------------- local inputs

    def tick(self) -> None:
        """Advance logical time by one tick."""
        if self.role is Role.LEADER:
            self._tick_leader()
        else:
            self._election_elapsed += 1
            if self._promotable() and self._election_elapsed >= self._randomized_timeout:
                self._election_elapsed = 0
                self._campaign(transfer=False)

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self.config.election_tick:
            self._election_elapsed = 0
            if self.config.check_quorum and not self._quorum_active():
                self._become_follower(self.term, NO_NODE)
                return
            # A transfer that did not finish within an election timeout is abandoned.
            self._lead_transferee = None
        for node, progress in self._progress.items():
            if node != self.id and progress.state is ProgressState.SNAPSHOT:
                progress.snapshot_ticks += 1
                # The snapshot or its reply was lost: probe again (which resends it if still needed).
                if progress.snapshot_ticks >= self.config.election_tick:
                    progress.become_probe()
        if self._heartbeat_elapsed >= self.config.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = 0
        for node in self._voters():
            progress = self._progress.get(node)
            if node == self.id or (progress is not None and progress.recent_active):
                active += 1
        for node, progress in self._progress.items():
            if node != self.id:
                progress.recent_active = False
        return active >= self._quorum()

    def campaign(self) -> None:
        """Start an election now (used by tests and by an operator's "hup")."""
        if self.role is not Role.LEADER and self._promotable():
            self._campaign(transfer=False)

    def _campaign(self, transfer: bool) -> None:
        if self.config.pre_vote and not transfer:
            self._become_pre_candidate()
            vote_type, term = MessageType.PRE_VOTE, self.term + 1
        else:
            self._become_candidate()
            vote_type, term = MessageType.VOTE, self.term
        if self._record_vote(self.id, True):
            return
        context = TRANSFER_CONTEXT if transfer else b""
        for node in self._voters():
            if node == self.id:
                continue
            self._send(
                node,
                vote_type,
                term=term,
                index=self.last_index(),
                log_term=self.last_term(),
                context=context,
            )

    def _record_vote(self, node: NodeId, granted: bool) -> bool:
        """Count a vote; returns True when the campaign was decided (won or lost)."""
        if node not in self._voters():
            return False
        self._votes.setdefault(node, granted)
        granted_count = sum(1 for ok in self._votes.values() if ok)
        rejected_count = len(self._votes) - granted_count
        if granted_count >= self._quorum():
            if self.role is Role.PRE_CANDIDATE:
                self._campaign(transfer=True)  # real election; pre-vote already passed
            else:
                self._become_leader()
            return True
        if rejected_count >= self._quorum():
            self._become_follower(self.term, NO_NODE)
            return True
        return False

    def propose(self, data: bytes) -> ProposalAccepted:
        """Append a command to the leader's log; raises NotLeaderError or ProposalRejectedError."""
        return self._propose(EntryKind.NORMAL, data)

    def propose_batch(self, commands: Sequence[bytes]) -> list[ProposalAccepted]:
        return [self._propose(EntryKind.NORMAL, data) for data in commands]

    def propose_conf_change(self, change: ConfChange) -> ProposalAccepted:
        """Propose one membership change; only one may be uncommitted at a time."""
        self._check_can_propose()
        if self._pending_conf_index > self.commit:
            raise ProposalRejectedError(
                f"raft leader {self.id!r}: a membership change (or this term's first entry) at index "
                f"{self._pending_conf_index} is not committed yet (commit={self.commit})"
            )
        conf = self.conf_state
        node = change.node
        if change.kind is ConfChangeKind.ADD_VOTER and node in conf.voters:
            raise ProposalRejectedError(f"raft conf change: {node!r} is already a voter")
        if change.kind is ConfChangeKind.ADD_LEARNER and node in conf.voters + conf.learners:
            raise ProposalRejectedError(
                f"raft conf change: {node!r} is already a member (demotion unsupported)"
            )
        if change.kind is ConfChangeKind.REMOVE_NODE:
            if node not in conf.voters + conf.learners:
                raise ProposalRejectedError(f"raft conf change: {node!r} is not a member")
            if conf.voters == (node,):
                raise ProposalRejectedError(f"raft conf change: cannot remove {node!r}, the last voter")
        accepted = self._propose(EntryKind.CONF_CHANGE, encode_conf_change(change))
        self._pending_conf_index = accepted.index
        return accepted

    def _check_can_propose(self) -> None:
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.id, self.leader or None)
        if self._lead_transferee is not None:
            raise ProposalRejectedError(
                f"raft leader {self.id!r} is transferring leadership to {self._lead_transferee!r}"
            )
        if self.id not in self._members():
            raise ProposalRejectedError(f"raft leader {self.id!r} is being removed from the cluster")

    def _propose(self, kind: EntryKind, data: bytes) -> ProposalAccepted:
        self._check_can_propose()
        entry = Entry(index=self.last_index() + 1, term=self.term, kind=kind, data=data)
        self._append_entries([entry])
        # Sending waits for ready(): proposals made before the driver asks coalesce into one APPEND.
        self._broadcast_pending = True
        return ProposalAccepted(entry.index, entry.term)

    def read_index(self, context: bytes) -> None:
        """Request a linearizable read; the answer arrives as a ReadState in a later Ready."""
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.id, self.leader or None)
        if not context:
            raise ValueError("read_index needs a non-empty, unique context")
        if context in self._pending_reads or context in self._reads_awaiting_term_commit:
            raise ValueError(f"read_index context {context!r} is already pending")
        if not self._committed_in_current_term():
            # A new leader does not know the true commit index until its own entry commits.
            self._reads_awaiting_term_commit.append(context)
            return
        self._start_read(context)

    def _committed_in_current_term(self) -> bool:
        return self.term_at(self.commit) == self.term

    def _start_read(self, context: bytes) -> None:
        if self.config.read_only_mode is ReadOnlyMode.LEASE_BASED or self._voters() == (self.id,):
            self._read_states.append(ReadState(context, self.commit))
            return
        self._pending_reads[context] = _PendingRead(context, self.commit, {self.id})
        self._read_queue.append(context)
        # One heartbeat round (sent at ready()) confirms every read queued before it.
        self._read_round_pending = True

    def transfer_leadership(self, target: NodeId) -> None:
        """Hand leadership to `target` once it has caught up; aborted after an election timeout."""
        if self.role is not Role.LEADER:
            raise NotLeaderError(self.id, self.leader or None)
        if target == self.id:
            self._lead_transferee = None
            return
        if target not in self._voters():
            raise ValueError(f"raft leadership transfer: {target!r} is not a voter")
        if self._lead_transferee == target:
            return
        self._lead_transferee = target
        self._election_elapsed = 0
        progress = self._progress[target]
        if progress.match == self.last_index():
            self._send(target, MessageType.TIMEOUT_NOW)
        else:
            self._send_append(target, send_if_empty=True)

    @property
    def lead_transferee(self) -> NodeId | None:
        return self._lead_transferee

    def report_snapshot(self, node: NodeId, success: bool) -> None:
        """The driver could (not) deliver a snapshot to `node`; unblocks its replication."""
        progress = self._progress.get(node)
        if self.role is not Role.LEADER or progress is None or progress.state is not ProgressState.SNAPSHOT:
            return
        if not success:
            progress.pending_snapshot = 0
        progress.become_probe()
        progress.probe_sent = success  # wait for the follower's reply after a successful send

    def progress(self, node: NodeId) -> Progress | None:
        """The leader's replication state for `node` (read-only use: tests, metrics)."""
        return self._progress.get(node)

    # ----------------------------------------------------------------------------- log mutation

    def _append_entries(self, entries: Sequence[Entry]) -> None:
        """Append entries at their own indices, truncating any conflicting suffix first."""
        if not entries:
            return
        first = entries[0].index
        if first <= self.commit:
            raise AssertionError(f"raft node {self.id!r}: refusing to overwrite committed index {first}")
        if first <= self.last_index():
            del self._log[first - self._offset - 1 :]
            if first < self._unstable_from:
                self._truncate_from = (
                    first if self._truncate_from is None else min(self._truncate_from, first)
                )
                self._unstable_from = first
            self._persisted = min(self._persisted, first - 1)
            while self._conf_points and self._conf_points[-1].index >= first:
                self._conf_points.pop()
                self._pending_conf_index = min(self._pending_conf_index, first - 1)
        self._log.extend(entries)
        self._replay_conf(entries)
        if self.role is Role.LEADER:
            self._self_progress_sync()

    def _maybe_commit(self) -> bool:
        voters = self._voters()
        if not voters or self.role is not Role.LEADER:
            return False
        matches = sorted(
            (self._progress[v].match if v in self._progress else 0 for v in voters), reverse=True
        )
        candidate = matches[self._quorum() - 1]
        # Figure 8: only an entry of the current term is committed by counting replicas.
        if candidate > self.commit and self.term_at(candidate) == self.term:
            self._commit_to(candidate)
            return True
        return False

    def _commit_to(self, index: int) -> None:
        if index <= self.commit:
            return
        self.commit = index
        if self.role is not Role.LEADER:
            return
        self._broadcast_pending = True
        if self._reads_awaiting_term_commit and self._committed_in_current_term():
            waiting, self._reads_awaiting_term_commit = self._reads_awaiting_term_commit, []
            for context in waiting:
                self._start_read(context)
        conf_index = self._conf_points[-1].index if self._conf_points else 0
        if self.id not in self._voters() and self.commit >= conf_index:
            # Our removal (or demotion) is committed: tell followers the commit, then step aside.
            self._broadcast_append_now()
            self._broadcast_heartbeat()
            self._become_follower(self.term, NO_NODE)

    # ----------------------------------------------------------------------------- sending

    def _send(
        self,
        to: NodeId,
        type: MessageType,
        # Not keyword-only on purpose: these defaults are read from a tuple, keyword-only ones from a dict,
        # one lookup each (some 50 ns a message on the hot path). Callers pass them by name all the same.
        term: int | None = None,
        index: int = 0,
        log_term: int = 0,
        entries: tuple[Entry, ...] = (),
        commit: int = 0,
        reject: bool = False,
        reject_hint: int = 0,
        reject_term: int = 0,
        context: bytes = b"",
        snapshot: SnapshotMeta | None = None,
    ) -> None:
        """Queue a message from this node for the next Ready; `term` is the current term unless given."""
        # The one place a Message is built; no **kwargs: that would allocate a dict per message.
        self._msgs.append(
            Message(
                type=type,
                sender=self.id,
                to=to,
                term=self.term if term is None else term,
                log_term=log_term,
                index=index,
                entries=entries,
                commit=commit,
                reject=reject,
                reject_hint=reject_hint,
                reject_term=reject_term,
                context=context,
                snapshot=snapshot,
            )
        )

    def _broadcast_append_now(self) -> None:
        self._broadcast_pending = False
        for node, progress in self._progress.items():
            if node == self.id:
                continue
            sent = self._send_append(node, send_if_empty=True)
            # Pipelining: fill the follower's in-flight window, not just one message.
            while sent and progress.state is ProgressState.REPLICATE:
                sent = self._send_append(node, send_if_empty=False)

    def _broadcast_heartbeat(self, context: bytes | None = None) -> None:
        if context is None:
            context = self._read_queue[-1] if self._read_queue else b""
        for node, progress in self._progress.items():
            if node == self.id:
                continue
            self._send(node, MessageType.HEARTBEAT, commit=min(progress.match, self.commit), context=context)

    def _send_append(self, node: NodeId, send_if_empty: bool) -> bool:
        progress = self._progress[node]
        if progress.is_paused(self.config.max_inflight_appends):
            return False
        prev_index = progress.next - 1
        prev_term = self.term_at(prev_index)
        if prev_term is None:
            return self._send_snapshot(node, progress)
        entries = self._entries_for_append(progress.next)
        if not entries and not send_if_empty:
            return False
        self._send(
            node,
            MessageType.APPEND,
            index=prev_index,
            log_term=prev_term,
            entries=entries,
            commit=self.commit,
        )
        if progress.state is ProgressState.REPLICATE:
            if entries:
                progress.next = entries[-1].index + 1
                progress.inflight.append(entries[-1].index)
        elif progress.state is ProgressState.PROBE:
            progress.probe_sent = True
        return True

    def _entries_for_append(self, start: int) -> tuple[Entry, ...]:
        stop = min(self.last_index(), start + self.config.max_entries_per_append - 1)
        batch = self.entries_between(start, stop)
        budget = self.config.max_bytes_per_append
        size = 0
        for count, entry in enumerate(batch):
            size += _entry_size(entry)
            if size > budget and count > 0:
                return tuple(batch[:count])
        return tuple(batch)

    def _send_snapshot(self, node: NodeId, progress: Progress) -> bool:
        if not progress.recent_active:
            return False  # don't ship a snapshot to a peer that is not answering
        progress.become_snapshot(self._snapshot.index)
        meta = self._snapshot
        self._send(node, MessageType.SNAPSHOT, snapshot=meta, index=meta.index, log_term=meta.term)
        return True

    # ----------------------------------------------------------------------------- step

    def step(self, msg: Message) -> None:
        """Handle one message from a peer."""
        if msg.to != self.id:
            raise ValueError(f"raft node {self.id!r} received a message addressed to {msg.to!r}")
        if msg.term > self.term:
            if msg.type in (MessageType.VOTE, MessageType.PRE_VOTE):
                force = msg.context == TRANSFER_CONTEXT
                in_lease = (
                    self.config.check_quorum
                    and self.leader != NO_NODE
                    and self._election_elapsed < self.config.election_tick
                )
                if in_lease and not force:
                    return  # lease check: we heard from a live leader recently
            if msg.type is MessageType.PRE_VOTE:
                pass  # never change term on a pre-vote request
            elif msg.type is MessageType.PRE_VOTE_RESP and not msg.reject:
                pass  # the term is bumped only once the pre-vote wins
            else:
                leader = msg.sender if msg.type in _LEADER_MESSAGES else NO_NODE
                self._become_follower(msg.term, leader)
        elif msg.term < self.term:
            if msg.type in (MessageType.APPEND, MessageType.HEARTBEAT) and (
                self.config.check_quorum or self.config.pre_vote
            ):
                # Tell a stale leader about the newer term (it may never time out otherwise).
                self._send(msg.sender, MessageType.APPEND_RESP)
            elif msg.type is MessageType.PRE_VOTE:
                self._send(msg.sender, MessageType.PRE_VOTE_RESP, reject=True)
            return

        if msg.type in (MessageType.VOTE, MessageType.PRE_VOTE):
            self._handle_vote_request(msg)
            return
        if self.role is Role.LEADER:
            self._step_leader(msg)
        elif self.role in (Role.CANDIDATE, Role.PRE_CANDIDATE):
            self._step_candidate(msg)
        else:
            self._step_follower(msg)

    def _handle_vote_request(self, msg: Message) -> None:
        can_vote = (
            self.vote == msg.sender
            or (self.vote == NO_NODE and self.leader == NO_NODE)
            or (msg.type is MessageType.PRE_VOTE and msg.term > self.term)
        )
        resp_type = MessageType.VOTE_RESP if msg.type is MessageType.VOTE else MessageType.PRE_VOTE_RESP
        if can_vote and self._is_up_to_date(msg.index, msg.log_term):
            # A granted pre-vote answers with the requested term so the pre-candidate counts it.
            self._send(msg.sender, resp_type, term=msg.term)
            if msg.type is MessageType.VOTE:
                self._election_elapsed = 0
                self.vote = msg.sender
        else:
            self._send(msg.sender, resp_type, reject=True)

    def _step_candidate(self, msg: Message) -> None:
        expected = MessageType.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MessageType.VOTE_RESP
        if msg.type in _LEADER_MESSAGES:
            self._become_follower(msg.term, msg.sender)
            self._step_follower(msg)
        elif msg.type is expected:
            self._record_vote(msg.sender, not msg.reject)

    def _step_follower(self, msg: Message) -> None:
        if msg.type is MessageType.APPEND:
            self._election_elapsed = 0
            self.leader = msg.sender
            self._handle_append(msg)
        elif msg.type is MessageType.HEARTBEAT:
            self._election_elapsed = 0
            self.leader = msg.sender
            if msg.commit > self.commit:
                self._commit_to(min(msg.commit, self.last_index()))
            self._send(msg.sender, MessageType.HEARTBEAT_RESP, context=msg.context)
        elif msg.type is MessageType.SNAPSHOT:
            self._election_elapsed = 0
            self.leader = msg.sender
            self._handle_snapshot(msg)
        elif msg.type is MessageType.TIMEOUT_NOW and self._promotable():
            self._campaign(transfer=True)

    def _handle_append(self, msg: Message) -> None:
        if msg.index < self.commit:
            self._send(msg.sender, MessageType.APPEND_RESP, index=self.commit)
            return
        if self._match_term(msg.index, msg.log_term):
            new_last = msg.index + len(msg.entries)
            conflict = self._find_conflict(msg.entries)
            if conflict:
                self._append_entries(msg.entries[conflict - msg.index - 1 :])
            self._commit_to(min(msg.commit, new_last))
            self._send(msg.sender, MessageType.APPEND_RESP, index=new_last)
            return
        hint_index = min(msg.index, self.last_index())
        hint_index = self._find_conflict_by_term(hint_index, msg.log_term)
        self._send(
            msg.sender,
            MessageType.APPEND_RESP,
            index=msg.index,
            reject=True,
            reject_hint=hint_index,
            reject_term=self.term_at(hint_index) or 0,
        )

    def _find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry that is new or conflicts with ours, 0 when all are present."""
        for entry in entries:
            if not self._match_term(entry.index, entry.term):
                return entry.index
        return 0

    def _find_conflict_by_term(self, index: int, term: int) -> int:
        """Largest index <= `index` whose term is <= `term` (terms never decrease along the log)."""
        if index <= self._offset:
            return index
        hi = index - self._offset  # search _log[:hi]
        pos = bisect.bisect_right(self._log, term, hi=hi, key=lambda entry: entry.term)
        return self._offset + pos if pos > 0 else self._offset

    def _handle_snapshot(self, msg: Message) -> None:
        meta = msg.snapshot
        if meta is None:
            raise ValueError(f"raft node {self.id!r}: SNAPSHOT message from {msg.sender!r} has no metadata")
        installed = self._restore(meta, msg.snapshot_data)
        index = self.last_index() if installed else self.commit
        self._send(msg.sender, MessageType.SNAPSHOT_RESP, index=index)

    def _restore(self, meta: SnapshotMeta, data: bytes) -> bool:
        if meta.index <= self.commit:
            return False
        if self._match_term(meta.index, meta.term):
            # We already have the snapshot's last entry: just learn that it is committed.
            self._commit_to(meta.index)
            return False
        self._log = []
        self._offset = meta.index
        self._offset_term = meta.term
        self._snapshot = meta
        self.commit = meta.index
        self._unstable_from = meta.index + 1
        self._truncate_from = None
        self._persisted = meta.index
        self._base_conf = meta.conf
        self._base_addresses = dict(meta.addresses)
        self._conf_points = []
        self._pending_snapshot_install = (meta, data)
        return True

    def _step_leader(self, msg: Message) -> None:
        progress = self._progress.get(msg.sender)
        if progress is None:
            return  # not (or no longer) a member
        if msg.type is MessageType.APPEND_RESP:
            progress.recent_active = True
            self._handle_append_resp(msg, progress)
        elif msg.type is MessageType.HEARTBEAT_RESP:
            progress.recent_active = True
            progress.probe_sent = False
            if (
                progress.state is ProgressState.REPLICATE
                and progress.inflight
                and progress.is_paused(self.config.max_inflight_appends)
            ):
                progress.inflight.popleft()  # make room for one append: some may have been lost
            if progress.match < self.last_index():
                self._send_append(msg.sender, send_if_empty=True)
            if msg.context:
                self._ack_read(msg.context, msg.sender)
        elif msg.type is MessageType.SNAPSHOT_RESP:
            progress.recent_active = True
            if progress.state is ProgressState.SNAPSHOT:
                progress.maybe_update(msg.index)
                progress.become_probe()
                self._send_append(msg.sender, send_if_empty=True)

    def _handle_append_resp(self, msg: Message, progress: Progress) -> None:
        if msg.reject:
            next_probe = msg.reject_hint
            if msg.reject_term > 0:
                next_probe = self._find_conflict_by_term(msg.reject_hint, msg.reject_term)
            if progress.maybe_decrease_to(msg.index, next_probe):
                if progress.state is ProgressState.REPLICATE:
                    progress.become_probe()
                self._send_append(msg.sender, send_if_empty=True)
            return
        old_paused = progress.is_paused(self.config.max_inflight_appends)
        updated = progress.maybe_update(msg.index)
        answered_probe = progress.state is ProgressState.PROBE and progress.match == msg.index
        if not updated and not answered_probe:
            if progress.state is ProgressState.REPLICATE:
                self._free_inflight(progress, msg.index)
            return
        if progress.state is ProgressState.PROBE:
            progress.become_replicate()
        elif progress.state is ProgressState.SNAPSHOT and progress.match >= progress.pending_snapshot:
            progress.become_probe()
            progress.become_replicate()
        elif progress.state is ProgressState.REPLICATE:
            self._free_inflight(progress, msg.index)
        if self._maybe_commit():
            self._broadcast_append_now()
        elif old_paused or progress.match < self.last_index():
            while self._send_append(msg.sender, send_if_empty=False):
                pass
        if msg.sender == self._lead_transferee and progress.match == self.last_index():
            self._send(msg.sender, MessageType.TIMEOUT_NOW)

    @staticmethod
    def _free_inflight(progress: Progress, index: int) -> None:
        while progress.inflight and progress.inflight[0] <= index:
            progress.inflight.popleft()

    def _ack_read(self, context: bytes, node: NodeId) -> None:
        pending = self._pending_reads.get(context)
        if pending is None:
            return
        pending.acks.add(node)
        self._check_read_quorum(context)

    def _check_read_quorum(self, context: bytes) -> None:
        pending = self._pending_reads.get(context)
        if pending is None:
            return
        voters = self._voters()
        if sum(1 for node in pending.acks if node in voters) < self._quorum():
            return
        # Confirming leadership for this read confirms it for every read queued before it.
        while self._read_queue:
            done = self._read_queue.popleft()
            request = self._pending_reads.pop(done)
            self._read_states.append(ReadState(request.context, request.index))
            if done == context:
                break

    # ----------------------------------------------------------------------------- Ready

    def soft_state(self) -> SoftState:
        return SoftState(self.leader, self.role, self.term)

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.commit)

    def _flush_broadcast(self) -> None:
        if self.role is Role.LEADER:
            if self._broadcast_pending:
                self._broadcast_append_now()
            if self._read_round_pending and self._read_queue:
                self._broadcast_heartbeat(self._read_queue[-1])
        self._broadcast_pending = False
        self._read_round_pending = False

    def has_ready(self) -> bool:
        if self._ready_outstanding:
            return False
        if self._msgs or self._unstable_from <= self.last_index() or self.commit > self.applied:
            return True
        hard, soft = self._prev_hard, self._prev_soft
        return bool(
            ((self._broadcast_pending or self._read_round_pending) and self.role is Role.LEADER)
            or self._pending_snapshot_install is not None
            or self._read_states
            or self._dropped_reads
            or hard.term != self.term
            or hard.vote != self.vote
            or hard.commit != self.commit
            or soft.leader != self.leader
            or soft.role is not self.role
            or soft.term != self.term
            or self.conf_state is not self._prev_conf
        )

    def ready(self) -> Ready:
        if self._ready_outstanding:
            raise RuntimeError(f"raft node {self.id!r}: ready() called again before advance()")
        self._flush_broadcast()
        hard = self.hard_state()
        soft = self.soft_state()
        conf = self.conf_state
        entries = tuple(self.entries_between(self._unstable_from, self.last_index()))
        snapshot, snapshot_data = self._pending_snapshot_install or (None, b"")
        rd = Ready(
            soft_state=soft if soft != self._prev_soft else None,
            hard_state=hard if hard != self._prev_hard else None,
            truncate_from=self._truncate_from,
            entries=entries,
            snapshot=snapshot,
            snapshot_data=snapshot_data,
            messages=tuple(self._msgs),
            committed_entries=tuple(self.entries_between(self.applied + 1, self.commit)),
            read_states=tuple(self._read_states),
            dropped_reads=tuple(self._dropped_reads),
            conf_state=conf if conf != self._prev_conf else None,
        )
        self._msgs = []
        self._read_states = []
        self._dropped_reads = []
        self._prev_hard, self._prev_soft, self._prev_conf = hard, soft, conf
        self._unstable_from = self.last_index() + 1
        self._truncate_from = None
        self._pending_snapshot_install = None
        self._ready_outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver persisted, sent and applied everything in `rd`."""
        if not self._ready_outstanding:
            raise RuntimeError(f"raft node {self.id!r}: advance() without an outstanding ready()")
        self._ready_outstanding = False
        if rd.snapshot is not None:
            self.applied = max(self.applied, rd.snapshot.index)
            self._persisted = max(self._persisted, min(rd.snapshot.index, self.last_index()))
        if rd.committed_entries:
            self.applied = max(self.applied, rd.committed_entries[-1].index)
        for entry in reversed(rd.entries):
            # Entries overwritten since ready() are not durable in their current form.
            if self.term_at(entry.index) == entry.term:
                self._persisted = max(self._persisted, entry.index)
                break
        if self.role is Role.LEADER:
            self._self_progress_sync()
            self._maybe_commit()

    # ----------------------------------------------------------------------------- compaction

    def snapshot_meta_at(self, index: int) -> SnapshotMeta:
        """Metadata for a state machine snapshot taken after applying `index`."""
        term = self.term_at(index)
        if term is None or index > self.applied:
            raise ValueError(
                f"raft node {self.id!r}: cannot describe a snapshot at {index}: applied={self.applied}, "
                f"log holds {self._offset}..{self.last_index()}"
            )
        conf, addresses = self._conf_at(index)
        return SnapshotMeta(index=index, term=term, conf=conf, addresses=dict(addresses))

    def compact(self, index: int, snapshot_meta: SnapshotMeta | None = None) -> SnapshotMeta:
        """Drop entries up to `index`: the driver holds a state machine snapshot taken there."""
        if index <= self._offset:
            return self._snapshot
        meta = self.snapshot_meta_at(index)
        if snapshot_meta is not None and (snapshot_meta.index, snapshot_meta.term) != (meta.index, meta.term):
            raise ValueError(
                f"raft node {self.id!r}: snapshot meta {snapshot_meta.index}/{snapshot_meta.term} does not "
                f"match the log entry {meta.index}/{meta.term}"
            )
        meta = snapshot_meta or meta
        del self._log[: index - self._offset]
        self._offset = index
        self._offset_term = meta.term
        self._snapshot = meta
        while self._conf_points and self._conf_points[0].index <= index:
            point = self._conf_points.pop(0)
            self._base_conf, self._base_addresses = point.conf, point.addresses
        return meta

    @property
    def snapshot(self) -> SnapshotMeta:
        return self._snapshot


_LEADER_MESSAGES = frozenset({MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT})
