"""A router node: a Raft member replicating the control state, with the leader's duties on top.

Wiring only; the rules live elsewhere: what a command does in `control.state`, where stages run in
`control.placement`, when a sidecar counts as dead in `control.liveness`, consensus in `raft`. The leader
additionally runs a control loop that expires silent sidecars and direct services and proposes placement
changes, whenever the state changes and at least once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.control import (
    ApplyResult,
    ClientSession,
    Command,
    ControlState,
    DeregisterService,
    DeregisterSidecar,
    ForgetReleased,
    Liveness,
    encode_command,
    place,
)
from etlrouter.core.config import Config
from etlrouter.core.metrics import REGISTRY
from etlrouter.core.offload import WorkerPool
from etlrouter.raft.node import NodeOptions, NotLeader, RaftNode
from etlrouter.router.stats import StatsStore
from etlrouter.router.watch import WatchHub
from etlrouter.security.context import Security

log = logging.getLogger(__name__)

REGISTRY_SIZE = Gauge(
    "etlrouter_registry_objects", "Objects in the replicated registry.", ["kind"], registry=REGISTRY
)
EXPIRED = Counter(
    "etlrouter_router_expired_total",
    "Sidecars and direct services deregistered because they stopped heartbeating.",
    ["kind"],
    registry=REGISTRY,
)
PLACEMENT_INTERVAL_S = 5.0
PASS_REST_FACTOR = 2.0  # the control loop rests this many times a pass's duration after it
PLACEMENT_CHANGES = Counter(
    "etlrouter_router_placement_changes_total", "Replica moves proposed by the leader.", registry=REGISTRY
)


def now_ms() -> int:
    return int(time.monotonic() * 1000)


class ControlMachine:
    """The Raft state machine: ControlState plus a notification after every change."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.state = ControlState()
        self._on_change = on_change

    def apply(self, index: int, data: bytes) -> ApplyResult:
        result = self.state.apply(index, data)
        if result.ok and not result.duplicate and result.revision == index:
            self._on_change()
        return result

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, data: bytes) -> None:
        if data:
            self.state.restore(data)
        self._on_change()


class RouterNode:
    def __init__(self, config: Config, security: Security | None = None) -> None:
        self.config = config
        rc = config.router
        # Who this router is and how it checks callers; built by the role (core/runtime.py serves with it).
        self.security = security or Security(config.tls, config.auth, kind="router", name=rc.node_id)
        self.machine = ControlMachine(self._state_changed)
        self.state = self.machine.state
        self.watch = WatchHub(self.state)
        # A joining node starts empty and waits for the cluster's leader to add it.
        peers = {} if rc.join else {p.id: p.address for p in rc.peers}
        self.raft = RaftNode(
            NodeOptions(
                node_id=rc.node_id,
                cluster_id=rc.cluster_id,
                data_dir=Path(rc.data_dir),
                bootstrap_peers=peers,
                tick_s=rc.raft.tick_ms / 1000,
                election_ticks=rc.raft.election_ticks,
                heartbeat_ticks=rc.raft.heartbeat_ticks,
                pre_vote=rc.raft.pre_vote,
                check_quorum=rc.raft.check_quorum,
                fsync=rc.raft.fsync,
                snapshot_every=rc.raft.snapshot_every_entries,
                max_entries_per_append=rc.raft.max_append_entries,
                max_inflight_appends=rc.raft.max_inflight_appends,
            ),
            self.machine,
            transport_config=config.transport,
            security=self.security,
        )
        self.sidecar_liveness = Liveness(
            timeout_ms=rc.sidecar_heartbeat_timeout_ms, grace_ms=rc.leader_grace_ms, leader_since_ms=now_ms()
        )
        # The sidecars' stage reports, for live rates and backpressure (router/stats.py). Leader-local.
        self.live_stats = StatsStore()
        # Direct registrations: instance id -> (last heartbeat ms, ttl ms). Leader-local soft state.
        self.direct_heartbeats: dict[str, tuple[int, int]] = {}
        # CPU-heavy admin work (router/admin.py) runs in these processes, never on the Raft loop.
        self.work_pool = WorkerPool(
            "admin",
            workers=rc.work.workers,
            queue=rc.work.queue,
            deadline_s=rc.work.deadline_ms / 1000,
        )
        # Sidecars' confirmed revocations (from heartbeats), replicated as one ForgetReleased by the control
        # loop about once a second, not one entry per heartbeat.
        self.confirmed_releases: dict[str, dict[str, int]] = {}
        self._leader_since_ms = 0
        self._leader_term = 0
        self._poke = asyncio.Event()
        self._pass_compute_s = 0.0  # CPU-bound part of the last control-loop pass (the loop rests after it)
        self._loop_task: asyncio.Task[None] | None = None
        self._join_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self, grpc_address: str) -> None:
        """Start Raft; `grpc_address` is where peers reach this node (its gRPC server is already bound)."""
        rc = self.config.router
        if not rc.peers and not rc.join:
            # No peers configured: a single-node cluster of this node, at the address it actually bound.
            self.raft.options = dataclasses.replace(
                self.raft.options, bootstrap_peers={rc.node_id: grpc_address}
            )
        await self.raft.start()
        self._loop_task = asyncio.ensure_future(self._control_loop())
        if rc.join and self.raft.core is not None and not self.raft.core.conf_state.voters:
            self._join_task = asyncio.ensure_future(self._join(grpc_address))

    async def _join(self, grpc_address: str) -> None:
        """Ask the existing cluster to add this (empty) node; the leader adds it as a learner, waits until it
        has caught up, then promotes it. Retried until it succeeds: the cluster may be electing."""
        rc = self.config.router
        client = RouterClient(
            list(rc.join), timeout=60, transport_config=self.config.transport, security=self.security
        )
        request = admin_pb2.AddMemberRequest(node_id=rc.node_id, address=grpc_address)
        try:
            while True:
                try:
                    await client.call(admin_grpc.PipelineAdminStub, "AddMember", request, write=True)
                    log.info("joined the cluster", extra={"fields": {"via": list(rc.join)}})
                    return
                except Exception as e:
                    log.warning("joining the cluster failed, retrying: %s", e)
                    await asyncio.sleep(1.0)
        finally:
            client.close()

    async def stop(self) -> None:
        if self._join_task is not None:
            self._join_task.cancel()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        await self.raft.stop()
        await self.work_pool.close()

    def ready(self) -> tuple[bool, str]:
        """Ready = part of a cluster with a known leader."""
        if self.raft.core is None:
            return False, "raft not started"
        leader_id, _ = self.raft.leader()
        if not leader_id:
            return False, "no leader known"
        return True, f"leader is {leader_id}"

    # -- writes ----------------------------------------------------------------------------------------

    async def propose(self, command: Command, session: ClientSession | None = None) -> ApplyResult:
        """Replicate a command; raises NotLeader on a follower, UnknownOutcomeError if leadership was lost."""
        result: ApplyResult = await self.raft.propose(encode_command(command, session))
        return result

    async def linearizable(self) -> None:
        """A read barrier: after it, the local state reflects every write acknowledged before the call."""
        await self.raft.read_barrier()

    def require_leader(self) -> None:
        if not self.raft.is_leader():
            leader_id, address = self.raft.leader()
            raise NotLeader(self.raft.id, leader_id, address)

    # -- leader duties ---------------------------------------------------------------------------------

    def _state_changed(self) -> None:
        self._poke.set()
        self.watch.changed()
        for kind, count in self.state.sizes().items():
            REGISTRY_SIZE.labels(kind).set(count)

    def heard_from_direct_service(self, instance_id: str, ttl_ms: int) -> None:
        self.direct_heartbeats[instance_id] = (
            now_ms(),
            ttl_ms or self.config.router.sidecar_heartbeat_timeout_ms,
        )

    async def _control_loop(self) -> None:
        last_placement = 0.0
        while True:
            poked = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), 1.0)
                poked = True
            self._poke.clear()
            if not self.raft.is_leader():
                self._leader_since_ms = 0
                continue
            term = self.raft.status().term
            if term != self._leader_term:
                # Leader in a new term (possibly lost and regained within one wait): start afresh.
                self._leader_term, self._leader_since_ms = term, 0
            if not self._leader_since_ms:
                # New leader: every sidecar gets a full grace period, whatever the old leader knew.
                self._leader_since_ms = now_ms()
                self.sidecar_liveness.become_leader(self._leader_since_ms)
                self.direct_heartbeats.clear()
                last_placement = 0.0
            # Placement depends on the replicated state (which pokes us when it changes) and on sidecar
            # health; without a change, re-place every few seconds only: its cost grows with the sidecars.
            place_now = poked or time.monotonic() - last_placement >= PLACEMENT_INTERVAL_S
            try:
                await self._leader_duties(run_placement=place_now)
                if place_now:
                    last_placement = time.monotonic()
            except NotLeader:
                continue
            except Exception:
                log.exception("leader control loop failed; retrying")
                await asyncio.sleep(0.5)
            # A pass computes in O(sidecars), and every applied entry pokes: under a storm of
            # registrations, passes back to back would take the whole loop. Resting twice as long as
            # the pass computed keeps them to a third of it (its waits for commits do not count: they
            # cost nothing, and an expired sidecar's replicas must move on at once).
            await asyncio.sleep(PASS_REST_FACTOR * self._pass_compute_s)

    def note_applied_tokens(self, sidecar_id: str, applied: Mapping[str, int]) -> None:
        """A heartbeat's applied tokens: remember the revocations they confirm, to forget them (leader)."""
        confirmed = self.state.confirmed_releases(sidecar_id, applied)
        if confirmed:
            self.confirmed_releases.setdefault(sidecar_id, {}).update(confirmed)

    async def _forget_confirmed_releases(self) -> None:
        pending, self.confirmed_releases = self.confirmed_releases, {}
        if pending:  # one log entry for every sidecar's confirmations since the last round
            await self.propose(ForgetReleased(confirmed=pending))

    async def _leader_duties(self, *, run_placement: bool = True) -> None:
        now = now_ms()
        started = time.perf_counter()
        expired = self.sidecar_liveness.expired(now, self.state.sidecar_services())
        self._pass_compute_s = time.perf_counter() - started
        for sidecar_id in expired:
            log.warning(
                "sidecar silent past the timeout: deregistering", extra={"fields": {"sidecar": sidecar_id}}
            )
            EXPIRED.labels("sidecar").inc()
            await self.propose(DeregisterSidecar(sidecar_id=sidecar_id, reason="expired"))
            self.sidecar_liveness.forget(sidecar_id)
        grace_over = now - self._leader_since_ms >= self.config.router.leader_grace_ms
        direct = self.state.direct_services()
        for gone in self.direct_heartbeats.keys() - {record.instance_id for record in direct}:
            del self.direct_heartbeats[gone]  # deregistered by the service itself
        for record in direct:
            # Never heard: counted from now, as for sidecars (control/liveness.py says why).
            seen, ttl = self.direct_heartbeats.setdefault(record.instance_id, (now, record.ttl_ms))
            if grace_over and now - seen > (ttl or self.config.router.sidecar_heartbeat_timeout_ms):
                EXPIRED.labels("service").inc()
                await self.propose(DeregisterService(instance_id=record.instance_id))
                self.direct_heartbeats.pop(record.instance_id, None)
        await self._forget_confirmed_releases()
        if not run_placement:
            return
        started = time.perf_counter()
        plan = place(
            self.state.dags(),
            self.sidecar_liveness.views(self.state.sidecar_services()),
            self.state.assignment(),
        )
        command = plan.to_command()
        self._pass_compute_s += time.perf_counter() - started
        if command is not None:
            PLACEMENT_CHANGES.inc(len(command.assignments))
            result = await self.propose(command)
            if not result.ok:
                log.warning("placement proposal refused: %s", result.error)

    def status_fields(self) -> dict[str, Any]:
        status = self.raft.status()
        return {"leader": status.leader_id, "term": status.term, "commit": status.commit_index}
