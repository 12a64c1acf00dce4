"""A deterministic simulation of a Raft cluster built from `RaftCore`s, for randomized safety tests.

Everything is driven by one seeded `random.Random`: the network (delay and reordering by picking
which in-flight message to deliver next, drops, duplicates, partitions, asymmetric links), the
clock (ticks), crashes and restarts, and clients that write and read a small key-value store.

The driver contract of `etlrouter.raft.core` is modelled exactly: a node's `Ready` is persisted
to its `DurableState` (the simulated fsync), then its messages are sent, then committed entries
are applied. A crash loses everything else: the core, the state machine, unsent messages. A
crash may also strike between the fsync and the sending.

After every step the simulation checks election safety (one leader per term), log matching,
leader completeness and state machine safety; `finish()` heals everything and checks that every
acknowledged write is applied on every node and that the client history is linearizable.
A failure raises `SimulationFailure` with the seed, the options, the event trace and a command
that replays the seed.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import msgspec

from etlrouter.raft.core import (
    EMPTY_SNAPSHOT,
    BootState,
    NotLeaderError,
    ProposalRejectedError,
    RaftConfig,
    RaftCore,
    ReadOnlyMode,
    ReadState,
    Ready,
    Role,
    bootstrap,
)
from etlrouter.raft.types import (
    ConfChange,
    ConfChangeKind,
    Entry,
    EntryKind,
    HardState,
    Message,
    MessageType,
    NodeId,
    SnapshotMeta,
)
from etlrouter.testing.linearizability import CheckResult, Operation, OpKind, check_kv_history


class KvCommand(msgspec.Struct, array_like=True, frozen=True, tag="kv.set.v1"):
    """The replicated command: set `key` to `value`. `op_id` identifies the client operation."""

    op_id: int
    key: str
    value: int


class KvSnapshot(msgspec.Struct, array_like=True, frozen=True, tag="kv.snapshot.v1"):
    index: int
    data: dict[str, int]


_encode = msgspec.msgpack.encode
_decode_cmd = msgspec.msgpack.Decoder(KvCommand).decode
_decode_snapshot = msgspec.msgpack.Decoder(KvSnapshot).decode


class SimulationFailure(AssertionError):
    """A safety or liveness property was violated; the message holds everything to replay it."""


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Shape and chaos of a simulated run. `SCRIPTED` (below) is a calm network for scenario tests."""

    nodes: int = 3  # founding voters
    spare_nodes: int = 0  # extra nodes that membership changes may add (and remove again)
    steps: int = 1000
    election_tick: int = 5
    drop_rate: float = 0.05
    duplicate_rate: float = 0.03
    crash_mid_ready_rate: float = 0.01
    async_ready_rate: float = 0.2  # how often a Ready's fsync overlaps with further steps
    compact_threshold: int = 8  # a node may snapshot once this many entries are applied past its last
    max_entries_per_append: int = 4  # small, so that batching and back-off are exercised
    max_inflight_appends: int = 4
    read_mode: str = "read_index"  # "read_index", "lease" or "local" (deliberately unsafe)
    check_quorum: bool = True
    pre_vote: bool = True
    keys: int = 2
    clients: int = 4
    client_timeout_steps: int = 120
    check_linearizability: bool = True
    # Relative weights of the random actions.
    w_deliver: int = 60
    w_process: int = 35
    w_tick: int = 8
    w_write: int = 7
    w_read: int = 6
    w_partition: int = 1
    w_heal: int = 4
    w_crash: int = 1
    w_restart: int = 3
    w_compact: int = 2
    w_conf_change: int = 0
    w_transfer: int = 0


@dataclass
class DurableState:
    """What survived the last simulated fsync."""

    hard_state: HardState
    snapshot: SnapshotMeta
    snapshot_data: bytes
    entries: list[Entry]

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index


@dataclass
class _PendingWrite:
    op_index: int  # position in Simulation.history
    op_id: int
    log_index: int


@dataclass
class SimNode:
    id: NodeId
    durable: DurableState
    core: RaftCore | None = None
    kv: dict[str, int] = field(default_factory=dict)
    applied: int = 0
    pending_writes: dict[int, _PendingWrite] = field(default_factory=dict)  # op_id -> write
    pending_reads: dict[bytes, int] = field(default_factory=dict)  # context -> history slot
    reads_awaiting_apply: list[tuple[int, int]] = field(default_factory=list)  # (index, history slot)
    restarts: int = 0
    inflight_ready: Ready | None = None  # taken from the core, fsync not finished yet

    @property
    def alive(self) -> bool:
        return self.core is not None


@dataclass
class _OpenOp:
    """An operation in flight; becomes an `Operation` when it completes."""

    client: int
    kind: OpKind
    key: str
    value: int | None
    invoke: int
    response: float = math.inf
    started_step: int = 0
    done: bool = False
    failed: bool = False  # definitely had no effect: left out of the checked history
    abandoned: bool = False  # the client stopped waiting: the outcome stays unknown


class Simulation:
    def __init__(self, seed: int, options: SimOptions | None = None) -> None:
        self.seed = seed
        self.options = options or SimOptions()
        self.rng = random.Random(seed)
        self.ids = [f"n{i}" for i in range(self.options.nodes + self.options.spare_nodes)]
        founders = self.ids[: self.options.nodes]
        boot = bootstrap(founders)
        joiner = BootState(HardState(), EMPTY_SNAPSHOT, ())
        self.nodes = {
            node_id: SimNode(node_id, self._durable_from(boot if node_id in founders else joiner))
            for node_id in self.ids
        }
        self.network: list[Message] = []
        self.blocked: set[tuple[NodeId, NodeId]] = set()
        self.time = 0  # logical clock for the client history: one unit per event
        self.step_count = 0
        self.stats: Counter[str] = Counter()  # what the run exercised (tests assert coverage)
        self.read_states: list[tuple[NodeId, ReadState, int]] = []  # (node, read, commit when served)
        self.delivered: Counter[tuple[MessageType, bool]] = Counter()  # (type, reject) -> count
        self.trace: list[str] = []
        self.history: list[_OpenOp] = []
        self.acked_writes: dict[int, int] = {}  # op_id -> log index
        self.next_op_id = 1
        self.next_read = 1
        self.client_busy: dict[int, int] = {}  # client -> history slot of its outstanding op
        # Global knowledge for the invariants.
        self.leaders_by_term: dict[int, NodeId] = {}
        self.applied_entries: dict[int, tuple[int, bytes]] = {}  # index -> (term, data)
        self.max_applied = 0
        self.log_entries: dict[tuple[int, int], tuple[EntryKind, bytes, int | None]] = {}
        self.snapshot_digests: dict[int, bytes] = {}
        for node in self.nodes.values():
            self._start(node)

    # ----------------------------------------------------------------------------- setup

    @staticmethod
    def _durable_from(boot: BootState) -> DurableState:
        return DurableState(boot.hard_state, boot.snapshot_meta, b"", list(boot.entries))

    def _config(self, node: SimNode) -> RaftConfig:
        mode = ReadOnlyMode.LEASE_BASED if self.options.read_mode == "lease" else ReadOnlyMode.SAFE
        # Each incarnation gets its own deterministic election-timeout stream.
        rng = random.Random(f"{self.seed}/{node.id}/{node.restarts}")
        return RaftConfig(
            node_id=node.id,
            rng=rng,
            election_tick=self.options.election_tick,
            read_only_mode=mode,
            check_quorum=self.options.check_quorum,
            pre_vote=self.options.pre_vote,
            max_entries_per_append=self.options.max_entries_per_append,
            max_inflight_appends=self.options.max_inflight_appends,
        )

    def _start(self, node: SimNode) -> None:
        durable = node.durable
        node.core = RaftCore(self._config(node), durable.hard_state, durable.snapshot, list(durable.entries))
        node.kv = {}
        node.applied = durable.snapshot.index
        if durable.snapshot_data:
            snap = _decode_snapshot(durable.snapshot_data)
            node.kv = dict(snap.data)

    def log(self, event: str) -> None:
        self.trace.append(f"{len(self.trace)}: {event}")

    def fail(self, problem: str) -> None:
        tail = "\n".join(self.trace[-80:])
        raise SimulationFailure(
            f"raft simulation seed={self.seed} violated: {problem}\n"
            f"options: {self.options}\n"
            f"last events (of {len(self.trace)}):\n{tail}\n"
            f"replay: RAFT_SIM_SEED={self.seed} .venv/bin/python -m etlrouter.testing.raft_sim"
        )

    # ----------------------------------------------------------------------------- network

    def _send(self, msg: Message) -> None:
        if self.rng.random() < self.options.drop_rate:
            return
        self.network.append(msg)
        if self.rng.random() < self.options.duplicate_rate:
            self.network.append(msg)

    def deliver(self, position: int | None = None) -> bool:
        if not self.network:
            return False
        if position is None:
            # Mostly the oldest messages, sometimes a young one: reordering with bounded delays.
            position = int(self.rng.random() ** 3 * len(self.network))
        msg = self.network.pop(position)
        target = self.nodes[msg.to]
        if target.core is None or (msg.sender, msg.to) in self.blocked:
            self.log(f"lost {msg.type.name} {msg.sender}->{msg.to}")
            return True
        self.log(
            f"deliver {msg.type.name} {msg.sender}->{msg.to} t{msg.term} i{msg.index} n{len(msg.entries)}"
        )
        self.delivered[(msg.type, msg.reject)] += 1
        target.core.step(msg)
        return True

    def isolate(self, node_id: NodeId) -> None:
        for other in self.ids:
            if other != node_id:
                self.blocked.add((node_id, other))
                self.blocked.add((other, node_id))
        self.log(f"isolate {node_id}")

    def split(self, group: set[NodeId]) -> None:
        for a in self.ids:
            for b in self.ids:
                if (a in group) != (b in group):
                    self.blocked.add((a, b))
        self.log(f"split {sorted(group)}")

    def block_one_way(self, src: NodeId, dst: NodeId) -> None:
        self.blocked.add((src, dst))
        self.log(f"block {src}->{dst}")

    def heal(self) -> None:
        self.blocked.clear()
        self.log("heal")

    # ----------------------------------------------------------------------------- nodes

    def crash(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        if node.core is None:
            return
        node.core = None
        node.inflight_ready = None  # the unfinished fsync is lost with everything else
        self._forget_pending(node)
        self.log(f"crash {node_id}")

    def _forget_pending(self, node: SimNode) -> None:
        # Writes in flight may or may not commit: their response time stays infinite.
        for write in node.pending_writes.values():
            self._release_client(write.op_index)
        node.pending_writes.clear()
        for slot in list(node.pending_reads.values()) + [slot for _, slot in node.reads_awaiting_apply]:
            self._fail_op(slot)
        node.pending_reads.clear()
        node.reads_awaiting_apply.clear()

    def restart(self, node_id: NodeId) -> None:
        node = self.nodes[node_id]
        if node.core is not None:
            return
        node.restarts += 1
        self._start(node)
        self.log(
            f"restart {node_id} from term {node.durable.hard_state.term} last {node.durable.last_index()}"
        )

    def tick_all(self) -> None:
        for node in self.nodes.values():
            if node.core is not None:
                node.core.tick()
        self.log("tick")

    def process(self, node_id: NodeId) -> bool:
        """Handle one Ready of a node exactly as a correct driver would."""
        node = self.nodes[node_id]
        core = node.core
        if core is None:
            return False
        rd = node.inflight_ready
        if rd is None:
            if not core.has_ready():
                return False
            rd = core.ready()
            self._check_new_entries(core, rd)
            if self.rng.random() < self.options.async_ready_rate:
                # An asynchronous fsync: the node keeps stepping and ticking until it completes.
                node.inflight_ready = rd
                self.log(f"process {node_id}: ready taken, fsync in flight")
                return True
        node.inflight_ready = None
        self._persist(node, rd)
        if self.rng.random() < self.options.crash_mid_ready_rate:
            self.log(f"process {node_id}: persisted, then crash before sending")
            self.crash(node_id)
            return True
        for msg in rd.messages:
            if msg.type is MessageType.SNAPSHOT:
                if node.durable.snapshot.index != msg.index:
                    # Compacted again since the core asked: that snapshot is gone, let it ask anew.
                    core.report_snapshot(msg.to, success=False)
                    continue
                msg = replace_message(msg, snapshot_data=node.durable.snapshot_data)
            self._send(msg)
        if rd.snapshot is not None:
            self._install_snapshot(node, rd.snapshot, rd.snapshot_data)
        for entry in rd.committed_entries:
            self._apply(node, entry)
        for read in rd.read_states:
            self.read_states.append((node_id, read, core.commit))
            slot = node.pending_reads.pop(read.context, None)
            if slot is not None:
                node.reads_awaiting_apply.append((read.index, slot))
        for context in rd.dropped_reads:
            slot = node.pending_reads.pop(context, None)
            if slot is not None:
                self._fail_op(slot)
        self._complete_reads(node)
        self.log(
            f"process {node_id}: +{len(rd.entries)} entries, {len(rd.messages)} msgs, "
            f"apply {len(rd.committed_entries)}, {rd.soft_state or ''}"
        )
        core.advance(rd)
        return True

    def _persist(self, node: SimNode, rd: Ready) -> None:
        durable = node.durable
        if rd.snapshot is not None:
            durable.snapshot = rd.snapshot
            durable.snapshot_data = rd.snapshot_data
            durable.entries = []
        if rd.truncate_from is not None:
            self.stats["truncations"] += 1
            keep = rd.truncate_from - durable.snapshot.index - 1
            del durable.entries[max(keep, 0) :]
        if rd.entries:
            if rd.entries[0].index != durable.last_index() + 1:
                self.fail(
                    f"{node.id} Ready entries start at {rd.entries[0].index} but storage ends at "
                    f"{durable.last_index()} (truncate_from={rd.truncate_from})"
                )
            durable.entries.extend(rd.entries)
        if rd.hard_state is not None:
            if rd.hard_state.commit > durable.last_index():
                self.fail(
                    f"{node.id} persists commit {rd.hard_state.commit} beyond its log {durable.last_index()}"
                )
            durable.hard_state = rd.hard_state

    def _install_snapshot(self, node: SimNode, meta: SnapshotMeta, data: bytes) -> None:
        snap = _decode_snapshot(data)
        if snap.index != meta.index:
            self.fail(f"{node.id} got snapshot data for {snap.index} with meta {meta.index}")
        self._check_snapshot_digest(meta.index, data)
        node.kv = dict(snap.data)
        node.applied = meta.index
        self.stats["snapshots_installed"] += 1
        # Writes inside the snapshot can no longer be observed one by one: their outcome is unknown.
        for op_id, write in list(node.pending_writes.items()):
            if write.log_index <= meta.index:
                del node.pending_writes[op_id]
                self._release_client(write.op_index)
        self.log(f"{node.id} installed snapshot {meta.index}")

    def _apply(self, node: SimNode, entry: Entry) -> None:
        if entry.index != node.applied + 1:
            self.fail(f"{node.id} applies index {entry.index} after {node.applied}")
        known = self.applied_entries.get(entry.index)
        if known is None:
            self.applied_entries[entry.index] = (entry.term, entry.data)
            self.max_applied = max(self.max_applied, entry.index)
        elif known != (entry.term, entry.data):
            self.fail(
                f"state machine safety: {node.id} applies {entry} at {entry.index}, others applied {known}"
            )
        node.applied = entry.index
        if entry.kind is not EntryKind.NORMAL or not entry.data:
            return
        cmd = _decode_cmd(entry.data)
        node.kv[cmd.key] = cmd.value
        write = node.pending_writes.pop(cmd.op_id, None)
        if write is not None:
            self._complete(write.op_index, None)
            self.acked_writes[cmd.op_id] = entry.index
        # A pending write whose slot was taken by another entry was lost (it never committed).
        for op_id, pending in list(node.pending_writes.items()):
            if pending.log_index <= entry.index:
                del node.pending_writes[op_id]
                self.history[pending.op_index].failed = True
                self._release_client(pending.op_index)

    def _complete_reads(self, node: SimNode) -> None:
        still_waiting = []
        for index, slot in node.reads_awaiting_apply:
            if node.applied >= index:
                op = self.history[slot]
                self._complete(slot, node.kv.get(op.key))
            else:
                still_waiting.append((index, slot))
        node.reads_awaiting_apply = still_waiting

    def compact(self, node_id: NodeId) -> bool:
        node = self.nodes[node_id]
        core = node.core
        if core is None or node.inflight_ready is not None:
            return False  # this driver snapshots between Readies, never during one
        if node.applied - core.snapshot.index < self.options.compact_threshold:
            return False
        data = _encode(KvSnapshot(node.applied, dict(node.kv)))
        self._check_snapshot_digest(node.applied, data)
        meta = core.compact(node.applied)
        durable = node.durable
        durable.snapshot, durable.snapshot_data = meta, data
        durable.entries = [e for e in durable.entries if e.index > meta.index]
        self.log(f"compact {node_id} at {meta.index}")
        return True

    # ----------------------------------------------------------------------------- clients

    def _new_op(self, client: int, kind: OpKind, key: str, value: int | None) -> int:
        self.time += 1
        self.history.append(_OpenOp(client, kind, key, value, self.time, started_step=self.step_count))
        slot = len(self.history) - 1
        self.client_busy[client] = slot
        return slot

    def _complete(self, slot: int, read_value: int | None) -> None:
        op = self.history[slot]
        if op.done or op.abandoned:
            return
        self.time += 1
        op.response = self.time
        op.done = True
        if op.kind is OpKind.READ:
            op.value = read_value
        self._release_client(slot)

    def _fail_op(self, slot: int) -> None:
        op = self.history[slot]
        op.failed = True
        op.done = True
        self._release_client(slot)

    def _release_client(self, slot: int) -> None:
        client = self.history[slot].client
        if self.client_busy.get(client) == slot:
            del self.client_busy[client]

    def client_write(self, client: int, node_id: NodeId, key: str, value: int) -> bool:
        node = self.nodes[node_id]
        slot = self._new_op(client, OpKind.WRITE, key, value)
        if node.core is None:
            self._fail_op(slot)
            return False
        op_id = self.next_op_id
        self.next_op_id += 1
        try:
            accepted = node.core.propose(_encode(KvCommand(op_id, key, value)))
        except (NotLeaderError, ProposalRejectedError):
            self._fail_op(slot)
            return False
        node.pending_writes[op_id] = _PendingWrite(slot, op_id, accepted.index)
        self.log(f"client {client} write {key}={value} at {node_id} index {accepted.index}")
        return True

    def client_read(self, client: int, node_id: NodeId, key: str) -> bool:
        node = self.nodes[node_id]
        slot = self._new_op(client, OpKind.READ, key, None)
        core = node.core
        if core is None:
            self._fail_op(slot)
            return False
        if self.options.read_mode == "local":
            # Deliberately unsafe: trust the local belief of leadership, no quorum round.
            if core.role is not Role.LEADER:
                self._fail_op(slot)
                return False
            self._complete(slot, node.kv.get(key))
            return True
        context = f"read-{self.next_read}".encode()
        self.next_read += 1
        try:
            core.read_index(context)
        except NotLeaderError:
            self._fail_op(slot)
            return False
        node.pending_reads[context] = slot
        self.log(f"client {client} read {key} at {node_id} ctx {context.decode()}")
        return True

    # ----------------------------------------------------------------------------- invariants

    def _check_new_entries(self, core: RaftCore, rd: Ready) -> None:
        """Log matching: an (index, term) pair always names the same entry and the same predecessor."""
        for entry in rd.entries:
            prev_term = core.term_at(entry.index - 1)
            signature = (entry.kind, entry.data, prev_term)
            known = self.log_entries.setdefault((entry.index, entry.term), signature)
            if known != signature:
                self.fail(f"log matching: {core.id} has {entry} after term {prev_term}, elsewhere {known}")

    def _check_snapshot_digest(self, index: int, data: bytes) -> None:
        snap = _decode_snapshot(data)
        digest = _encode(sorted(snap.data.items()))
        known = self.snapshot_digests.setdefault(index, digest)
        if known != digest:
            self.fail(f"state machine safety: snapshots at {index} differ")

    def check_invariants(self) -> None:
        for node in self.nodes.values():
            core = node.core
            if core is None or core.role is not Role.LEADER:
                continue
            holder = self.leaders_by_term.setdefault(core.term, node.id)
            if holder != node.id:
                self.fail(f"election safety: {holder} and {node.id} both lead term {core.term}")
            if holder == node.id and getattr(core, "_sim_checked_term", None) != core.term:
                self._check_leader_completeness(node.id, core)
                core._sim_checked_term = core.term  # type: ignore[attr-defined]

    def _check_leader_completeness(self, node_id: NodeId, core: RaftCore) -> None:
        for index in range(core.first_index(), self.max_applied + 1):
            known = self.applied_entries.get(index)
            if known is None:
                continue
            if core.term_at(index) != known[0]:
                self.fail(
                    f"leader completeness: {node_id} leads term {core.term} without committed entry "
                    f"{index}/{known[0]} (has term {core.term_at(index)})"
                )

    # ----------------------------------------------------------------------------- driving

    def random_step(self) -> None:
        """One random action among those that can do something right now."""
        opts = self.options
        ready_nodes = [
            n.id
            for n in self.nodes.values()
            if n.core is not None and (n.inflight_ready is not None or n.core.has_ready())
        ]
        actions: list[tuple[int, Callable[[], object]]] = [
            (opts.w_tick, self.tick_all),
            (opts.w_write, self._random_write),
            (opts.w_read, self._random_read),
            (opts.w_partition, self._random_partition),
            (opts.w_crash, lambda: self.crash(self.rng.choice(self.ids))),
            (opts.w_compact, lambda: self.compact(self.rng.choice(self.ids))),
        ]
        if self.network:
            actions.append((opts.w_deliver, self.deliver))
        if ready_nodes:
            actions.append((opts.w_process, lambda: self.process(self.rng.choice(ready_nodes))))
        if self.blocked:
            actions.append((opts.w_heal, self.heal))
        if opts.w_conf_change:
            actions.append((opts.w_conf_change, self._random_conf_change))
        if opts.w_transfer:
            actions.append((opts.w_transfer, self._random_transfer))
        crashed = [n.id for n in self.nodes.values() if n.core is None]
        if crashed:
            actions.append((opts.w_restart, lambda: self.restart(self.rng.choice(crashed))))
        total = sum(weight for weight, _ in actions)
        pick = self.rng.randrange(total)
        for weight, action in actions:
            if pick < weight:
                action()
                break
            pick -= weight
        self.check_invariants()
        self.step_count += 1
        self._abandon_stale_ops()

    def _abandon_stale_ops(self) -> None:
        for slot in list(self.client_busy.values()):
            op = self.history[slot]
            if self.step_count - op.started_step > self.options.client_timeout_steps:
                op.abandoned = True
                if op.kind is OpKind.READ:
                    op.failed = True  # an unanswered read has no effect
                self._release_client(slot)

    def _idle_client(self) -> int | None:
        idle = [client for client in range(self.options.clients) if client not in self.client_busy]
        return self.rng.choice(idle) if idle else None

    def _target_node(self) -> NodeId | None:
        """Clients mostly find the leader; without one they mostly back off."""
        leaders = [n.id for n in self.nodes.values() if n.core is not None and n.core.role is Role.LEADER]
        if leaders and self.rng.random() < 0.9:
            return self.rng.choice(leaders)
        if self.rng.random() < 0.2:
            return self.rng.choice(self.ids)
        return None

    def _random_write(self) -> None:
        client, target = self._idle_client(), self._target_node()
        if client is not None and target is not None:
            key = f"k{self.rng.randrange(self.options.keys)}"
            self.client_write(client, target, key, self.next_op_id)

    def _random_read(self) -> None:
        client, target = self._idle_client(), self._target_node()
        if client is not None and target is not None:
            self.client_read(client, target, f"k{self.rng.randrange(self.options.keys)}")

    def _random_conf_change(self) -> None:
        leader_id = self.leader()
        if leader_id is None:
            return
        core = self.nodes[leader_id].core
        assert core is not None
        conf = core.conf_state
        members = conf.voters + conf.learners
        outsiders = [n for n in self.ids if n not in members]
        options: list[ConfChange] = [ConfChange(ConfChangeKind.ADD_VOTER, n) for n in conf.learners]
        options += [ConfChange(self.rng.choice(list(ConfChangeKind)[:2]), n) for n in outsiders]
        if len(conf.voters) > 2:
            options += [ConfChange(ConfChangeKind.REMOVE_NODE, n) for n in members]
        if not options:
            return
        change = self.rng.choice(options)
        try:
            accepted = core.propose_conf_change(change)
        except (NotLeaderError, ProposalRejectedError) as refused:
            self.log(f"conf change {change.kind.name} {change.node} refused: {refused}")
            return
        self.stats["conf_changes"] += 1
        self.log(f"conf change {change.kind.name} {change.node} at {leader_id} index {accepted.index}")

    def _random_transfer(self) -> None:
        leader_id = self.leader()
        if leader_id is None:
            return
        core = self.nodes[leader_id].core
        assert core is not None
        others = [n for n in core.conf_state.voters if n != leader_id]
        if others:
            target = self.rng.choice(others)
            core.transfer_leadership(target)
            self.stats["transfers"] += 1
            self.log(f"transfer leadership {leader_id} -> {target}")

    def members(self) -> tuple[NodeId, ...]:
        """The membership according to the current leader (all nodes when there is none)."""
        leader_id = self.leader()
        core = self.nodes[leader_id].core if leader_id else None
        if core is None:
            return tuple(self.ids)
        return core.conf_state.voters + core.conf_state.learners

    def _random_partition(self) -> None:
        kind = self.rng.randrange(3)
        if kind == 0:
            self.isolate(self.rng.choice(self.ids))
        elif kind == 1:
            size = self.rng.randrange(1, len(self.ids))
            self.split(set(self.rng.sample(self.ids, size)))
        else:
            src, dst = self.rng.sample(self.ids, 2)
            self.block_one_way(src, dst)

    def drain(self, max_iterations: int = 500) -> None:
        """Deliver every message (oldest first) and handle every Ready until nothing moves."""
        for _ in range(max_iterations):
            progressed = False
            while self.network:
                self.deliver(0)
                progressed = True
            for node_id in self.ids:
                while self.process(node_id):
                    progressed = True
            self.check_invariants()
            if not progressed:
                return
        self.fail(f"drain did not quiesce within {max_iterations} iterations")

    def settle_round(self) -> None:
        """One round of a healthy network: tick, then drain."""
        self.tick_all()
        self.drain()

    def install_state(
        self,
        node_id: NodeId,
        hard_state: HardState,
        entries: list[Entry],
        snapshot: SnapshotMeta = EMPTY_SNAPSHOT,
    ) -> None:
        """Replace a node's storage (for scripted scenarios) and restart it from there."""
        node = self.nodes[node_id]
        node.core = None
        node.durable = DurableState(hard_state, snapshot, b"", list(entries))
        self.restart(node_id)

    def leader(self) -> NodeId | None:
        leaders = [n for n in self.nodes.values() if n.core is not None and n.core.role is Role.LEADER]
        if not leaders:
            return None
        return max(leaders, key=lambda n: n.core.term if n.core else 0).id

    def run(self) -> None:
        for _ in range(self.options.steps):
            self.random_step()
        self.finish()

    def finish(self, max_rounds: int = 300) -> None:
        """Heal the world, then check that every acknowledged write reached every node."""
        self.heal()
        saved = self.options
        self.options = replace(
            saved, drop_rate=0.0, duplicate_rate=0.0, crash_mid_ready_rate=0.0, async_ready_rate=0.0
        )
        for node_id in self.ids:
            self.restart(node_id)
        for _ in range(max_rounds):
            self.settle_round()
            target = max(self.acked_writes.values(), default=0)
            if self.leader() is not None and all(self.nodes[n].applied >= target for n in self.members()):
                break
        else:
            applied = {n.id: n.applied for n in self.nodes.values()}
            self.fail(f"liveness: after healing, applied indices {applied} never caught up with the acks")
        self.options = saved
        members = self.members()
        for op_id, index in self.acked_writes.items():
            for node in (self.nodes[n] for n in members):
                if node.applied < index:
                    self.fail(
                        f"acknowledged write {op_id} at {index} missing on {node.id} (applied {node.applied})"
                    )
            term_data = self.applied_entries.get(index)
            if term_data is None or _decode_cmd(term_data[1]).op_id != op_id:
                self.fail(f"acknowledged write {op_id} is not the entry applied at {index}")
        if self.options.check_linearizability:
            result = self.check_history()
            if not result.ok:
                self.fail("linearizability: " + result.explain())

    def operations(self) -> list[Operation]:
        """The client history: failed operations removed, unknown outcomes open-ended."""
        ops = []
        for op in self.history:
            if op.failed or (op.kind is OpKind.READ and not op.done):
                continue
            ops.append(Operation(op.client, op.kind, op.key, op.value, op.invoke, op.response))
        return ops

    def check_history(self) -> CheckResult:
        return check_kv_history(self.operations())


def replace_message(msg: Message, **changes: object) -> Message:
    return msgspec.structs.replace(msg, **changes)


# A reliable world that only changes when a test says so.
SCRIPTED = SimOptions(drop_rate=0.0, duplicate_rate=0.0, crash_mid_ready_rate=0.0, async_ready_rate=0.0)

VARIANTS: tuple[SimOptions, ...] = (
    SimOptions(),
    SimOptions(nodes=5),
    SimOptions(spare_nodes=2, w_conf_change=2, w_transfer=1),
    SimOptions(check_quorum=False, pre_vote=False),
    SimOptions(nodes=5, spare_nodes=1, w_conf_change=2, w_transfer=1, keys=3),
)


def options_for_seed(seed: int) -> SimOptions:
    """The seed also picks the cluster shape, so a seed alone replays a run."""
    return VARIANTS[seed % len(VARIANTS)]


def run_seed(seed: int, options: SimOptions | None = None) -> Simulation:
    sim = Simulation(seed, options or options_for_seed(seed))
    sim.run()
    return sim


def main() -> None:
    import os
    import sys

    seed = int(os.environ.get("RAFT_SIM_SEED", "0"))
    sim = Simulation(seed, options_for_seed(seed))
    try:
        sim.run()
    except SimulationFailure as failure:
        print("\n".join(sim.trace))
        print(failure, file=sys.stderr)
        raise SystemExit(1) from None
    print("\n".join(sim.trace))
    print(
        f"seed {seed}: ok, {len(sim.history)} client operations, {len(sim.acked_writes)} acknowledged writes"
    )


if __name__ == "__main__":
    main()
