"""The asyncio driver of one Raft node: the pure core, durable storage, the gRPC transport, a state machine.

One loop does what the core's Ready asks, in the order the core's contract requires (core.py docstring):
persist (one fsync for everything that accumulated: group commit), then send, then install a snapshot and
apply committed entries, then serve reads, then advance. Proposals that arrive while a save is in progress
wait in the core and go out together in the next Ready.

The state machine is any object with `apply(index, data) -> result`, `snapshot() -> bytes` and
`restore(data)`. `apply` must be deterministic: every node applies the same entries in the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgspec
from prometheus_client import Counter, Gauge, Histogram

from etlrouter.core.config import TransportConfig
from etlrouter.core.metrics import REGISTRY
from etlrouter.raft.core import (
    NO_NODE,
    NotLeaderError,
    ProposalAccepted,
    RaftConfig,
    RaftCore,
    ReadOnlyMode,
    Ready,
    Role,
    bootstrap,
)
from etlrouter.raft.storage import AsyncRaftStorage, RaftStorage, StorageOptions
from etlrouter.raft.transport import RaftTransport
from etlrouter.raft.types import (
    ConfChange,
    ConfChangeKind,
    EntryKind,
    Message,
    MessageType,
    NodeId,
    SnapshotMeta,
)
from etlrouter.security.context import Security

log = logging.getLogger(__name__)

TERM = Gauge("etlrouter_raft_term", "Current Raft term.", registry=REGISTRY)
COMMIT_INDEX = Gauge(
    "etlrouter_raft_commit_index", "Highest log index known to be committed.", registry=REGISTRY
)
APPLIED_INDEX = Gauge(
    "etlrouter_raft_applied_index", "Highest log index applied to the state machine.", registry=REGISTRY
)
IS_LEADER = Gauge("etlrouter_raft_is_leader", "1 while this node is the leader.", registry=REGISTRY)
PROPOSALS = Counter("etlrouter_raft_proposals_total", "Proposals by outcome.", ["outcome"], registry=REGISTRY)
SAVE_SECONDS = Histogram(
    "etlrouter_raft_save_seconds",
    "Time to persist one Ready (write + fsync).",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
    registry=REGISTRY,
)
HEARTBEAT_INTERVAL = Histogram(
    "etlrouter_raft_heartbeat_interval_seconds",
    "Time between two rounds of heartbeats a leader sends (one per heartbeat_ticks ticks when healthy; "
    "longer when the event loop or the WAL holds the driver up).",
    buckets=(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
ENTRIES_PER_SAVE = Histogram(
    "etlrouter_raft_entries_per_save",
    "Log entries written per fsync (group commit).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)


class StateMachine(Protocol):
    def apply(self, index: int, data: bytes) -> Any: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


class UnknownOutcomeError(Exception):
    """Leadership was lost while a proposal was in flight: it may or may not be applied.

    Retry with the same client id and sequence number; the state machine suppresses the duplicate.
    """


class ProposalDroppedError(Exception):
    """The proposal's log entry was overwritten by another leader's entry: it was definitely not applied."""


class NodeUnavailableError(RuntimeError):
    """The node cannot serve anything now: not started yet, or stopped after a failure (answer UNAVAILABLE:
    a client tries another router)."""


class NotLeader(Exception):
    """This node cannot serve the request; `leader_id`/`leader_address` say where to go (may be empty)."""

    def __init__(self, node_id: NodeId, leader_id: NodeId, leader_address: str) -> None:
        self.leader_id = leader_id
        self.leader_address = leader_address
        hint = f"{leader_id} at {leader_address}" if leader_id else "unknown"
        super().__init__(f"node {node_id!r} is not the leader (leader: {hint})")


@dataclass(frozen=True, slots=True)
class NodeOptions:
    node_id: NodeId
    cluster_id: str
    data_dir: Path
    # Founding members, this node included: used only when the data directory is empty. Empty = join later
    # (the node waits for a leader to add it).
    bootstrap_peers: Mapping[NodeId, str]
    tick_s: float = 0.05
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    lease_reads: bool = False
    fsync: bool = True
    snapshot_every: int = 10_000
    max_entries_per_append: int = 512
    max_inflight_appends: int = 64
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class MemberStatus:
    id: NodeId
    address: str
    voter: bool
    match_index: int
    reachable: bool


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node_id: NodeId
    role: str
    leader_id: NodeId
    leader_address: str
    term: int
    commit_index: int
    applied_index: int
    snapshot_index: int
    members: tuple[MemberStatus, ...]


class RaftNode:
    def __init__(
        self,
        options: NodeOptions,
        state_machine: StateMachine,
        *,
        transport_config: TransportConfig | None = None,
        security: Security | None = None,
    ) -> None:
        self.options = options
        self.id = options.node_id
        self.state_machine = state_machine
        self.transport = RaftTransport(
            options.node_id,
            options.cluster_id,
            self._on_message,
            on_snapshot_sent=self._on_snapshot_sent,
            transport_config=transport_config,
            security=security,
            rpc_timeout_s=max(0.2, options.tick_s * options.election_ticks),
        )
        self.core: RaftCore | None = None
        self._storage: AsyncRaftStorage | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._proposals: dict[int, tuple[int, asyncio.Future[Any]]] = {}
        self._read_ids = itertools.count(1)
        self._reads: dict[bytes, asyncio.Future[int]] = {}
        self._applied_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._snapshot_meta: SnapshotMeta | None = None
        self._snapshot_data = b""
        self._leader_changed = asyncio.Condition()
        self._stopped = False
        self._failure: BaseException | None = None
        self._last_heartbeat: tuple[int, float] | None = None  # (term, monotonic time) of the last round

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        opts = self.options
        storage, loaded = await asyncio.to_thread(
            RaftStorage.open, opts.data_dir, StorageOptions(fsync=opts.fsync)
        )
        self._storage = AsyncRaftStorage(storage)
        hard_state, snapshot, entries = loaded.hard_state, loaded.snapshot, list(loaded.entries)
        if hard_state.term == 0 and not entries and snapshot is None and opts.bootstrap_peers:
            boot = bootstrap(sorted(opts.bootstrap_peers), dict(opts.bootstrap_peers))
            await self._storage.save(hard_state=boot.hard_state, entries=boot.entries, sync=True)
            hard_state, entries = boot.hard_state, list(boot.entries)
            log.info("bootstrapped a new cluster", extra={"fields": {"voters": sorted(opts.bootstrap_peers)}})
        if snapshot is not None:
            self.state_machine.restore(loaded.snapshot_data or b"")
            self._snapshot_meta, self._snapshot_data = snapshot, loaded.snapshot_data or b""
        config = RaftConfig(
            node_id=opts.node_id,
            rng=random.Random(opts.seed),
            election_tick=opts.election_ticks,
            heartbeat_tick=opts.heartbeat_ticks,
            pre_vote=opts.pre_vote,
            check_quorum=opts.check_quorum,
            read_only_mode=ReadOnlyMode.LEASE_BASED if opts.lease_reads else ReadOnlyMode.SAFE,
            max_entries_per_append=opts.max_entries_per_append,
            max_inflight_appends=opts.max_inflight_appends,
        )
        self.core = RaftCore(config, hard_state, snapshot, entries)
        self.transport.update_peers(self.core.addresses)
        self._tasks = [asyncio.ensure_future(self._ticker()), asyncio.ensure_future(self._run())]
        self._wake.set()
        log.info(
            "raft node started",
            extra={
                "fields": {
                    "node": self.id,
                    "term": hard_state.term,
                    "last_index": self.core.last_index(),
                    "snapshot_index": snapshot.index if snapshot else 0,
                }
            },
        )

    async def stop(self) -> None:
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.transport.close()
        self._fail_waiters(UnknownOutcomeError("the node stopped"))
        if self._storage is not None:
            with contextlib.suppress(Exception):
                await self._storage.sync()
            await self._storage.close()

    # -- requests --------------------------------------------------------------------------------------

    @property
    def _core(self) -> RaftCore:
        if self.core is None:
            raise NodeUnavailableError(f"raft node {self.id!r} is not started")
        if self._failure is not None:
            raise NodeUnavailableError(f"raft node {self.id!r} stopped after a failure: {self._failure}")
        return self.core

    def is_leader(self) -> bool:
        return self.core is not None and self.core.role is Role.LEADER

    def leader(self) -> tuple[NodeId, str]:
        core = self._core
        leader = core.leader
        if leader == NO_NODE:
            return "", ""
        return leader, core.addresses.get(leader, "")

    def _not_leader(self) -> NotLeader:
        leader_id, address = self.leader()
        return NotLeader(self.id, leader_id, address)

    async def propose(self, data: bytes, *, timeout: float = 5.0) -> Any:
        """Replicate `data` and return what the state machine's apply returned for it."""
        return await self._await_proposal(lambda core: core.propose(data), timeout)

    async def change_membership(self, change: ConfChange, *, timeout: float = 10.0) -> None:
        await self._await_proposal(lambda core: core.propose_conf_change(change), timeout)

    async def add_member(self, node: NodeId, address: str, *, voter: bool = True) -> None:
        """Add a node as a learner, wait until it has caught up, then (if `voter`) promote it."""
        await self.change_membership(ConfChange(ConfChangeKind.ADD_LEARNER, node, address))
        if not voter:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            progress = self._core.progress(node)
            if (
                progress is not None
                and self._core.commit - progress.match <= self.options.max_entries_per_append
            ):
                break
            await asyncio.sleep(self.options.tick_s)
        else:
            raise TimeoutError(f"learner {node!r} did not catch up within 30 s")
        await self.change_membership(ConfChange(ConfChangeKind.ADD_VOTER, node, address))

    async def remove_member(self, node: NodeId) -> None:
        if node == self.id and self.is_leader():
            await self.transfer_leadership()
            raise self._not_leader()
        await self.change_membership(ConfChange(ConfChangeKind.REMOVE_NODE, node))

    async def transfer_leadership(self, target: NodeId = "", *, timeout: float = 5.0) -> NodeId:
        core = self._core
        if core.role is not Role.LEADER:
            raise self._not_leader()
        if not target:
            candidates = [
                (p.match, node)
                for node in core.conf_state.voters
                if node != self.id and (p := core.progress(node)) is not None
            ]
            if not candidates:
                raise ValueError("no other voter to transfer leadership to")
            target = max(candidates)[1]
        core.transfer_leadership(target)
        self._wake.set()
        deadline = time.monotonic() + timeout
        async with self._leader_changed:
            while core.leader != target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"leadership did not move to {target!r} within {timeout} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._leader_changed.wait(), remaining)
        return target

    async def read_barrier(self, *, timeout: float = 5.0) -> int:
        """Wait until a linearizable read may be served locally; returns the read index.

        ReadIndex: the leader confirms it still leads (a heartbeat round, or its lease when lease reads are
        configured) and this node waits until it has applied at least that index.
        """
        core = self._core
        if core.role is not Role.LEADER:
            raise self._not_leader()
        context = next(self._read_ids).to_bytes(8, "big")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reads[context] = fut
        try:
            core.read_index(context)
        except NotLeaderError:
            self._reads.pop(context, None)
            raise self._not_leader() from None
        self._wake.set()
        try:
            index = await asyncio.wait_for(fut, timeout)
            await self.wait_applied(index, timeout=timeout)
            return index
        finally:
            self._reads.pop(context, None)

    async def wait_applied(self, index: int, *, timeout: float = 5.0) -> None:
        if self._core.applied >= index:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied_waiters.append((index, fut))
        await asyncio.wait_for(fut, timeout)

    async def wait_for_leader(self, *, timeout: float = 10.0) -> NodeId:
        deadline = time.monotonic() + timeout
        async with self._leader_changed:
            while self._core.leader == NO_NODE:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no leader known to {self.id!r} after {timeout} s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._leader_changed.wait(), remaining)
        return self._core.leader

    def status(self) -> NodeStatus:
        core = self._core
        addresses = core.addresses
        conf = core.conf_state
        leader_id, leader_address = self.leader()
        members = []
        for node in (*conf.voters, *conf.learners):
            progress = core.progress(node) if core.role is Role.LEADER else None
            match = core.last_index() if node == self.id else (progress.match if progress else 0)
            reachable = node == self.id or (progress is not None and progress.recent_active)
            members.append(MemberStatus(node, addresses.get(node, ""), node in conf.voters, match, reachable))
        return NodeStatus(
            node_id=self.id,
            role=core.role.value,
            leader_id=leader_id,
            leader_address=leader_address,
            term=core.term,
            commit_index=core.commit,
            applied_index=core.applied,
            snapshot_index=core.snapshot.index,
            members=tuple(members),
        )

    async def _await_proposal(self, submit: Any, timeout: float) -> Any:
        core = self._core
        try:
            accepted: ProposalAccepted = submit(core)
        except NotLeaderError:
            PROPOSALS.labels("not_leader").inc()
            raise self._not_leader() from None
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._proposals[accepted.index] = (accepted.term, fut)
        self._wake.set()
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            PROPOSALS.labels("timeout").inc()
            raise UnknownOutcomeError(
                f"proposal at index {accepted.index} not applied within {timeout} s; it may still be"
            ) from None
        finally:
            self._proposals.pop(accepted.index, None)

    # -- the loop --------------------------------------------------------------------------------------

    def _on_message(self, msg: Message) -> None:
        if self.core is None or self._stopped:
            return
        self.core.step(msg)
        self._wake.set()

    def _on_snapshot_sent(self, peer: NodeId, ok: bool) -> None:
        if self.core is not None and not self._stopped:
            self.core.report_snapshot(peer, ok)
            self._wake.set()

    async def _ticker(self) -> None:
        interval = self.options.tick_s
        next_tick = time.monotonic()
        while True:
            next_tick += interval
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
            if self.core is not None:
                self.core.tick()
                self._wake.set()

    async def _run(self) -> None:
        assert self.core is not None
        core = self.core
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while core.has_ready():
                    await self._handle_ready(core, core.ready())
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            # Storage failures and state machine bugs stop the node: continuing could lose committed data.
            self._failure = e
            log.critical("raft node %s stopped: %s", self.id, e, exc_info=True)
            self._fail_waiters(UnknownOutcomeError(f"raft node stopped: {e}"))
            raise

    async def _handle_ready(self, core: RaftCore, rd: Ready) -> None:
        assert self._storage is not None
        if rd.snapshot is not None:
            await self._storage.save_snapshot(rd.snapshot, rd.snapshot_data)
        if rd.must_sync or rd.truncate_from is not None:
            t0 = time.perf_counter()
            await self._storage.save(
                hard_state=rd.hard_state,
                entries=rd.entries,
                truncate_after=rd.truncate_from - 1 if rd.truncate_from is not None else None,
                sync=True,
            )
            SAVE_SECONDS.observe(time.perf_counter() - t0)
            if rd.entries:
                ENTRIES_PER_SAVE.observe(len(rd.entries))
        if any(msg.type is MessageType.HEARTBEAT for msg in rd.messages):
            self._observe_heartbeat_round(core.term)
        for msg in rd.messages:
            if msg.type is MessageType.SNAPSHOT and not msg.snapshot_data:
                attached = self._attach_snapshot(msg)
                if attached is None:
                    # We compacted past the snapshot the core asked for: it will ask again with a newer one.
                    core.report_snapshot(msg.to, False)
                    continue
                msg = attached
            self.transport.send(msg)
        if rd.snapshot is not None:
            self.state_machine.restore(rd.snapshot_data)
            self._snapshot_meta, self._snapshot_data = rd.snapshot, rd.snapshot_data
            self._fail_proposals_up_to(rd.snapshot.index)
        applied = None
        for entry in rd.committed_entries:
            result: Any = None
            if entry.kind is EntryKind.NORMAL and entry.data:
                result = self.state_machine.apply(entry.index, entry.data)
            waiter = self._proposals.pop(entry.index, None)
            if waiter is not None:
                term, fut = waiter
                if fut.done():
                    pass
                elif term == entry.term:
                    PROPOSALS.labels("applied").inc()
                    fut.set_result(result)
                else:
                    PROPOSALS.labels("dropped").inc()
                    fut.set_exception(
                        ProposalDroppedError(f"entry {entry.index} was replaced by another leader")
                    )
            applied = entry.index
        for read in rd.read_states:
            fut_read = self._reads.get(read.context)
            if fut_read is not None and not fut_read.done():
                fut_read.set_result(read.index)
        for context in rd.dropped_reads:
            fut_read = self._reads.get(context)
            if fut_read is not None and not fut_read.done():
                fut_read.set_exception(self._not_leader())
        if rd.conf_state is not None:
            self.transport.update_peers(core.addresses)
        core.advance(rd)
        if rd.soft_state is not None:
            await self._on_soft_state(core)
        self._publish_metrics(core)
        if applied is not None or rd.snapshot is not None:
            self._release_applied_waiters(core.applied)
            await self._maybe_snapshot(core)

    def _observe_heartbeat_round(self, term: int) -> None:
        """One round of heartbeats goes out (one message per peer, in one Ready): observe the time since
        the previous round of the same term; the first round of a leadership has nothing to compare."""
        now = time.monotonic()
        previous = self._last_heartbeat
        if previous is not None and previous[0] == term:
            HEARTBEAT_INTERVAL.observe(now - previous[1])
        self._last_heartbeat = (term, now)

    def _attach_snapshot(self, msg: Message) -> Message | None:
        meta = self._snapshot_meta
        if meta is None or msg.snapshot is None or meta.index != msg.snapshot.index:
            return None
        return msgspec.structs.replace(msg, snapshot_data=self._snapshot_data)

    async def _maybe_snapshot(self, core: RaftCore) -> None:
        assert self._storage is not None
        since = core.applied - core.snapshot.index
        if since < self.options.snapshot_every:
            return
        index = core.applied
        data = self.state_machine.snapshot()
        meta = core.snapshot_meta_at(index)
        await self._storage.save_snapshot(meta, data)
        core.compact(index, meta)
        self._snapshot_meta, self._snapshot_data = meta, data
        removed = await self._storage.compact(index)
        log.info(
            "snapshot taken, log compacted",
            extra={"fields": {"index": index, "bytes": len(data), "segments_removed": removed}},
        )

    async def _on_soft_state(self, core: RaftCore) -> None:
        if core.role is not Role.LEADER:
            # Our in-flight proposals may still commit under the new leader, or be overwritten: we cannot
            # tell which without waiting, so tell the callers now (hashicorp/raft's ErrLeadershipLost).
            self._fail_waiters(UnknownOutcomeError("leadership lost while the proposal was in flight"))
        async with self._leader_changed:
            self._leader_changed.notify_all()
        log.info(
            "raft role changed",
            extra={
                "fields": {
                    "node": self.id,
                    "raft_role": core.role.value,
                    "term": core.term,
                    "leader": core.leader,
                },
            },
        )

    def _fail_waiters(self, error: Exception) -> None:
        for _, fut in self._proposals.values():
            if not fut.done():
                fut.set_exception(error)
        self._proposals.clear()
        for fut_read in self._reads.values():
            if not fut_read.done():
                fut_read.set_exception(error)

    def _fail_proposals_up_to(self, index: int) -> None:
        for proposal_index in [i for i in self._proposals if i <= index]:
            _, fut = self._proposals.pop(proposal_index)
            if not fut.done():
                fut.set_exception(UnknownOutcomeError("a snapshot replaced the log around the proposal"))

    def _release_applied_waiters(self, applied: int) -> None:
        keep = []
        for index, fut in self._applied_waiters:
            if index <= applied:
                if not fut.done():
                    fut.set_result(None)
            else:
                keep.append((index, fut))
        self._applied_waiters = keep

    def _publish_metrics(self, core: RaftCore) -> None:
        TERM.set(core.term)
        COMMIT_INDEX.set(core.commit)
        APPLIED_INDEX.set(core.applied)
        IS_LEADER.set(1 if core.role is Role.LEADER else 0)


__all__: Sequence[str] = [
    "NodeOptions",
    "NodeStatus",
    "NotLeader",
    "ProposalDroppedError",
    "RaftNode",
    "StateMachine",
    "UnknownOutcomeError",
]
