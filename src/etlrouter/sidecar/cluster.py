"""The sidecar's client of the router cluster: registration, heartbeats, and Assign/Revoke commands.

- `register(services)` announces the sidecar and its services (RegisterSidecar) and applies the commands
  the answer carries; DAGs it ran that the answer no longer mentions are revoked locally (a registering
  sidecar gets its complete set of work).
- `run()` heartbeats every interval with health, load, stage reports and the highest fencing token applied
  per DAG, sends the service list when discovery changed it (`update_services`), applies the answers'
  commands, registers again when the router says `reregister`, and rides out leader changes and outages
  (the data plane keeps running; one warning per outage; retries with backoff). Heartbeats travel on one
  long-lived HeartbeatStream to the leader, opened after a heartbeat call found it; when the stream
  ends (a leader change, a refusal) that heartbeat goes as a call, which follows the leader and reports
  refusals exactly as before, and the stream is opened again to whoever answered.
- `deregister()` leaves the cluster after draining.
- Services the router leaves out of the registration (their name is registered elsewhere with another
  kind) are `rejected`: logged once per change, counted in a gauge, shown in readiness; the rest run.
  While any is rejected, every heartbeat resends the full list, so one joins as soon as the clash is gone.

Commands are applied in order by one worker, apart from the heartbeat loop, so a slow Revoke (it drains
in-flight batches) never delays heartbeats. The fencing rule lives in `is_stale` and is checked in
`_apply_one` only: a command whose token is below the highest applied for its DAG is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client import Counter, Gauge

from etlrouter import __version__
from etlrouter._proto.v1 import control_grpc, control_pb2
from etlrouter.client.router import ClusterUnreachableError, RouterClient, StreamedCall
from etlrouter.core.metrics import REGISTRY
from etlrouter.flow.retry import Backoff
from etlrouter.sidecar.model import AssignmentTarget, LocalService, ServiceKind

log = logging.getLogger(__name__)

HEARTBEATS = Counter(
    "etlrouter_sidecar_control_heartbeats_total",
    "Heartbeats this sidecar sent to the router cluster, by outcome (sent, failed).",
    ["outcome"],
    registry=REGISTRY,
)
REGISTRATIONS = Counter(
    "etlrouter_sidecar_control_registrations_total",
    "RegisterSidecar calls, by outcome (registered, failed).",
    ["outcome"],
    registry=REGISTRY,
)
COMMANDS = Counter(
    "etlrouter_sidecar_control_commands_total",
    "Assign/Revoke commands from the router cluster, by type and outcome"
    " (applied, ignored_stale, failed, invalid).",
    ["type", "outcome"],
    registry=REGISTRY,
)

SERVICES_REJECTED = Gauge(
    "etlrouter_sidecar_services_rejected",
    "1 for each service this sidecar offers that the router cluster did not register (its name is"
    " registered with another kind).",
    ["service"],
    registry=REGISTRY,
)

_KIND_TO_PROTO: dict[ServiceKind, Any] = {
    "source": control_pb2.SERVICE_KIND_SOURCE,
    "transform": control_pb2.SERVICE_KIND_TRANSFORM,
    "sink": control_pb2.SERVICE_KIND_SINK,
    "lookup": control_pb2.SERVICE_KIND_LOOKUP,
}
_KIND_NAMES = {value: key for key, value in _KIND_TO_PROTO.items()}
# A router refusal that retrying the same request cannot fix.
_REFUSED = frozenset({Status.INVALID_ARGUMENT, Status.FAILED_PRECONDITION, Status.ALREADY_EXISTS})
# FAILED_PRECONDITION on a service list is a kind clash that appeared after the router's check (the retry
# is split again); tries before giving up on the list, as for other refusals.
_LIST_RETRIES = 3
# Retries while the cluster is unreachable: 0.2 s doubling, never longer than one heartbeat interval, with
# 20 % jitter so that the sidecars of a cluster that comes back do not all call at the same instant.
_OUTAGE_FIRST_S = 0.2
_OUTAGE_JITTER = 0.2


# --- pure part ---------------------------------------------------------------------------------------


def is_stale(applied: Mapping[str, int], dag_id: str, token: int) -> bool:
    """The fencing rule: a command is stale when its token is below the highest applied for its DAG.
    An equal token is not stale (a Revoke and an Assign of one change share a token; re-applying the
    same Assign is idempotent)."""
    return token < applied.get(dag_id, 0)


def tokens_to_forget(forget: Iterable[str], running: Mapping[str, object]) -> list[str]:
    """The DAGs whose fencing tokens may be dropped: the router keeps nothing for this sidecar there, and
    nothing of them runs here. A later Assign of such a DAG carries a newer token than any dropped one (the
    router's tokens are Raft indices), so fencing holds; the table stays bounded under pipeline churn."""
    return [dag_id for dag_id in forget if dag_id not in running]


def with_spec(assign: control_pb2.Assign, specs: Mapping[str, control_pb2.DagSpec]) -> bool:
    """Complete an Assign that came without its DagSpec from the one held (the router leaves it out only
    for the generation the heartbeat reported); False when none is held (the sidecar reports none, so the
    router sends it in full next time)."""
    if assign.HasField("dag"):
        return True
    held = specs.get(assign.dag_id)
    if held is None:
        return False
    assign.dag.CopyFrom(held)
    return True


def command_dag(command: control_pb2.AssignmentCommand) -> tuple[str, str]:
    """("assign"|"revoke", dag id) of a command; ("", "") when it carries neither or no DAG id."""
    which = command.WhichOneof("command")
    if which == "assign":
        return "assign", command.assign.dag_id or command.assign.dag.id
    if which == "revoke":
        return "revoke", command.revoke.dag_id
    return "", ""


def instance_of(service: LocalService, sidecar_id: str) -> control_pb2.ServiceInstance:
    return control_pb2.ServiceInstance(
        name=service.name,
        kind=_KIND_TO_PROTO[service.kind],
        endpoint=service.endpoint,
        sidecar_id=sidecar_id,
        capabilities=service.capabilities_proto,
    )


def mentioned_dags(commands: Iterable[control_pb2.AssignmentCommand]) -> set[str]:
    return {dag for _, dag in map(command_dag, commands) if dag}


@dataclasses.dataclass(frozen=True)
class RejectedService:
    """A service the router cluster left out of this sidecar's registration."""

    name: str
    offered: str  # kind names ("source", ...); "unknown" for a kind this version does not know
    registered: str
    message: str

    def describe(self) -> str:
        return f"{self.name} (offered as a {self.offered}, registered as a {self.registered})"


def rejected_of(replies: Iterable[control_pb2.RejectedService]) -> dict[str, RejectedService]:
    """service name -> why it was left out, from a RegisterSidecar or Heartbeat answer."""
    return {
        r.name: RejectedService(
            r.name,
            _KIND_NAMES.get(r.offered_kind, "unknown"),
            _KIND_NAMES.get(r.registered_kind, "unknown"),
            r.message,
        )
        for r in replies
    }


# --- I/O part ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Batch:
    commands: list[control_pb2.AssignmentCommand]
    done: asyncio.Future[None]
    # After applying: revoke locally every running DAG not in this set (None: leave them alone).
    keep_only: set[str] | None = None
    keys: list[bytes] = dataclasses.field(default_factory=list)
    # After applying: DAGs whose fencing tokens the router said it keeps nothing for (forget_dags).
    forget: list[str] = dataclasses.field(default_factory=list)


class ClusterClient:
    def __init__(
        self,
        sidecar_id: str,
        data_address: str,
        routers: RouterClient,
        target: AssignmentTarget,
        heartbeat_interval_s: float = 5.0,
        version: str = __version__,
        *,
        labels: Mapping[str, str] | None = None,
        call_timeout_s: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not sidecar_id:
            raise ValueError("ClusterClient needs a sidecar id")
        if not data_address:
            raise ValueError("ClusterClient needs the sidecar's data-plane address")
        if heartbeat_interval_s <= 0:
            raise ValueError(f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}")
        self.sidecar_id = sidecar_id
        self.data_address = data_address
        self.routers = routers
        self.target = target
        self.heartbeat_interval_s = heartbeat_interval_s
        self.version = version
        self.labels = dict(labels or {})
        # How long one call may look for a router that answers (default: max(interval, 2 s)).
        self.call_timeout_s = call_timeout_s
        self._rng = rng  # the backoff's jitter source (None: a shared one; seed it in tests)
        self.health: Any = control_pb2.HEALTH_SERVING
        self.registered = False
        self.revision = 0  # Raft index of the last registration
        # Highest fencing token applied per DAG (revoked DAGs included): sent in every heartbeat.
        self.applied: dict[str, int] = {}
        # The DagSpec of each DAG this sidecar was assigned, so an Assign of the same generation can come
        # without it (heartbeat spec_generations).
        self.specs: dict[str, control_pb2.DagSpec] = {}
        # Local stage ids of every DAG this sidecar runs (what `register` revokes when unmentioned).
        self.running: dict[str, set[str]] = {}
        self.stale_ignored = 0
        self._services: list[LocalService] = []
        self._services_version = 0
        self._services_sent_version = 0
        self._list_refusals = 0
        # Offered services the cluster did not register (name -> why), from the last answer to a list.
        self.rejected: dict[str, RejectedService] = {}
        self._router_interval_s = 0.0
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue()
        # Commands queued or being applied: a heartbeat answer repeats them until they are applied.
        self._pending: dict[bytes, int] = {}
        self._worker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._outage = False
        self._heartbeats = StreamedCall(
            routers, control_grpc.SidecarCoordinatorStub, "Heartbeat", "HeartbeatStream"
        )

    # --- services ------------------------------------------------------------------------------------

    @property
    def services(self) -> list[LocalService]:
        return list(self._services)

    def update_services(self, services: Sequence[LocalService]) -> None:
        """Discovery found a different set: send it with the next heartbeat (which comes at once)."""
        self._services = list(services)
        self._services_version += 1
        self._wake.set()

    @property
    def services_changed(self) -> bool:
        return self._services_version != self._services_sent_version

    def readiness_note(self) -> str:
        """For the sidecar's readiness reason: the rejected services, or ""."""
        if not self.rejected:
            return ""
        return "services not registered (kind clash): " + ", ".join(
            self.rejected[name].describe() for name in sorted(self.rejected)
        )

    def _set_rejected(self, rejected: dict[str, RejectedService], *, answered: bool = True) -> None:
        """Record the answer to a service list; log and count only what changed. `answered=False`:
        the list was refused whole, so what was rejected before is simply unknown now."""
        for name in sorted(rejected.keys() - self.rejected.keys()):
            why = rejected[name]
            log.warning(
                "the router cluster did not register service `%s`: it is offered as a %s but registered"
                " as a %s elsewhere (%s); the other services run, and this one is offered again with"
                " every heartbeat",
                name,
                why.offered,
                why.registered,
                why.message,
                extra={"fields": {"service": name, "offered": why.offered, "registered": why.registered}},
            )
            SERVICES_REJECTED.labels(name).set(1)
        for name in sorted(self.rejected.keys() - rejected.keys()):
            if answered and any(service.name == name for service in self._services):
                log.info("service `%s` is registered now", name, extra={"fields": {"service": name}})
            with contextlib.suppress(KeyError):
                SERVICES_REJECTED.remove(name)
        self.rejected = rejected

    # --- registration --------------------------------------------------------------------------------

    async def register(self, services: Sequence[LocalService] | None = None, *, wait: bool = True) -> None:
        """RegisterSidecar with `services` (default: the current list) and apply the returned commands
        (waiting for them unless wait=False). Raises ClusterUnreachableError or the router's GRPCError."""
        if services is not None:
            self.update_services(services)
        version = self._services_version
        request = control_pb2.RegisterSidecarRequest(
            sidecar_id=self.sidecar_id,
            data_address=self.data_address,
            services=[instance_of(s, self.sidecar_id) for s in self._services],
            labels=self.labels,
            version=self.version,
        )
        try:
            reply = await self.routers.call(
                control_grpc.SidecarCoordinatorStub,
                "RegisterSidecar",
                request,
                write=True,
                timeout=self._call_timeout(),
            )
        except (ClusterUnreachableError, GRPCError):
            REGISTRATIONS.labels("failed").inc()
            raise
        REGISTRATIONS.labels("registered").inc()
        self.registered = True
        self.revision = reply.revision
        self._services_sent_version = version
        self._set_rejected(rejected_of(reply.rejected_services))
        self._router_interval_s = reply.heartbeat_interval_ms / 1000
        log.info(
            "registered with the router cluster",
            extra={
                "fields": {
                    "sidecar_id": self.sidecar_id,
                    "services": len(request.services),
                    "commands": len(reply.commands),
                    "revision": reply.revision,
                }
            },
        )
        done = self._submit(list(reply.commands), keep_only=mentioned_dags(reply.commands))
        if wait:
            await done

    async def deregister(self, timeout: float = 5.0) -> bool:
        """Leave the cluster (after draining): stops heartbeats and sends DeregisterSidecar. Returns False
        (with a warning) when the cluster could not be told; it will expire the sidecar instead."""
        self._stopping = True
        self.health = control_pb2.HEALTH_NOT_SERVING
        self._wake.set()
        try:
            await self.routers.call(
                control_grpc.SidecarCoordinatorStub,
                "DeregisterSidecar",
                control_pb2.DeregisterSidecarRequest(sidecar_id=self.sidecar_id),
                write=True,
                timeout=timeout,
            )
        except GRPCError as e:
            if e.status != Status.NOT_FOUND:
                log.warning("deregistering from the router cluster failed: %s: %s", e.status.name, e.message)
                return False
        except ClusterUnreachableError as e:
            log.warning("deregistering from the router cluster failed: %s", e)
            return False
        self.registered = False
        log.info("deregistered from the router cluster", extra={"fields": {"sidecar_id": self.sidecar_id}})
        return True

    # --- heartbeats ----------------------------------------------------------------------------------

    @property
    def interval_s(self) -> float:
        """The configured interval, or the router's if it asks for more frequent heartbeats."""
        if 0 < self._router_interval_s < self.heartbeat_interval_s:
            return self._router_interval_s
        return self.heartbeat_interval_s

    def heartbeat_request(self) -> control_pb2.SidecarHeartbeatRequest:
        request = control_pb2.SidecarHeartbeatRequest(
            sidecar_id=self.sidecar_id,
            health=self.health,
            applied_tokens=self.applied,
            spec_generations={dag_id: spec.generation for dag_id, spec in self.specs.items()},
        )
        try:
            request.load.CopyFrom(self.target.load())
            request.stages.extend(self.target.stage_reports())
        except Exception:
            log.exception("the data plane failed to report load and stages; heartbeating without them")
        if self.services_changed or self.rejected:
            request.services_changed = True
            request.services.extend(instance_of(s, self.sidecar_id) for s in self._services)
        return request

    async def heartbeat(self) -> control_pb2.SidecarHeartbeatResponse:
        """Send one heartbeat and queue the answer's commands. Raises like RouterClient.call."""
        version = self._services_version
        request = self.heartbeat_request()
        try:
            reply: control_pb2.SidecarHeartbeatResponse = await self._heartbeats(
                request, self._call_timeout()
            )
        except GRPCError as e:
            HEARTBEATS.labels("failed").inc()
            if request.services_changed and e.status in _REFUSED:
                self._list_refusals += 1
                if e.status != Status.FAILED_PRECONDITION or self._list_refusals >= _LIST_RETRIES:
                    # Resending a list the router refuses would fail every heartbeat (and lose their
                    # commands). Keep the last accepted list until discovery reports another.
                    log.error(
                        "the router cluster refused the new service list (%s: %s); keeping the previous one",
                        e.status.name,
                        e.message,
                    )
                    self._services_sent_version = version
                    self._list_refusals = 0
                    self._set_rejected({}, answered=False)
            raise
        except ClusterUnreachableError:
            HEARTBEATS.labels("failed").inc()
            raise
        HEARTBEATS.labels("sent").inc()
        if reply.reregister:
            self.registered = False
        else:
            if request.services_changed:
                self._services_sent_version = version
                self._list_refusals = 0
                self._set_rejected(rejected_of(reply.rejected_services))
            if reply.commands or reply.forget_dags:
                self._submit(list(reply.commands), skip_pending=True, forget=list(reply.forget_dags))
        return reply

    async def run(self) -> None:
        """Register (if not yet) and heartbeat until `deregister()` or cancellation."""
        try:
            await self._heartbeat_loop()
        finally:
            await self._heartbeats.close()

    async def _heartbeat_loop(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                if not self.registered:
                    await self.register(wait=False)
                else:
                    reply = await self.heartbeat()
                    if reply.reregister:
                        log.info("the router cluster does not know this sidecar; registering again")
                        continue
            except (ClusterUnreachableError, GRPCError) as e:
                failures += 1
                self._note_outage(e)
                await self._sleep(self._backoff(failures))
                continue
            if self._outage:
                self._outage = False
                log.info(
                    "the router cluster answers again",
                    extra={"fields": {"leader": self.routers.leader_address}},
                )
            failures = 0
            await self._sleep(self.interval_s)

    def _note_outage(self, error: BaseException) -> None:
        if isinstance(error, ClusterUnreachableError):
            if not self._outage:
                log.warning("router cluster unreachable; the data plane keeps running: %s", error)
            self._outage = True
        else:
            assert isinstance(error, GRPCError)
            log.warning("the router cluster refused a call: %s: %s", error.status.name, error.message)

    def _call_timeout(self) -> float:
        return self.call_timeout_s or max(self.interval_s, 2.0)

    def _backoff(self, failures: int) -> float:
        # Built per failure: the cap is the heartbeat interval, which the router's answer may shorten.
        cap = self.interval_s
        return Backoff(min(_OUTAGE_FIRST_S, cap), cap, jitter=_OUTAGE_JITTER).delay(failures, self._rng)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    # --- commands ------------------------------------------------------------------------------------

    async def apply_commands(self, commands: Sequence[control_pb2.AssignmentCommand]) -> None:
        """Apply commands in order (after any queued before them), with the fencing rule."""
        await self._submit(list(commands))

    def _submit(
        self,
        commands: list[control_pb2.AssignmentCommand],
        *,
        keep_only: set[str] | None = None,
        skip_pending: bool = False,
        forget: Sequence[str] = (),
    ) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = [command.SerializeToString(deterministic=True) for command in commands]
        if skip_pending:
            fresh = [(c, k) for c, k in zip(commands, keys, strict=True) if k not in self._pending]
            commands, keys = [c for c, _ in fresh], [k for _, k in fresh]
        for key in keys:
            self._pending[key] = self._pending.get(key, 0) + 1
        self._queue.put_nowait(_Batch(commands, done, keep_only, keys, list(forget)))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._apply_queued(), name=f"commands-{self.sidecar_id}")
        return done

    async def _apply_queued(self) -> None:
        while True:
            batch = await self._queue.get()
            try:
                await self._apply_batch(batch)
            except Exception as e:  # _apply_one already contains target failures; this is a bug
                log.exception("applying commands failed")
                if not batch.done.done():
                    batch.done.set_exception(e)
            else:
                if not batch.done.done():
                    batch.done.set_result(None)
            finally:
                self._forget_pending(batch)
                if not batch.done.done():  # cancelled while applying
                    batch.done.cancel()

    def _forget_pending(self, batch: _Batch) -> None:
        for key in batch.keys:
            count = self._pending.get(key, 0) - 1
            if count > 0:
                self._pending[key] = count
            else:
                self._pending.pop(key, None)
        batch.keys = []

    async def _apply_batch(self, batch: _Batch) -> None:
        failed_dags: set[str] = set()
        for command in batch.commands:
            _, dag_id = command_dag(command)
            if dag_id in failed_dags:
                continue  # a later command of a DAG whose earlier one failed: the router resends both
            if not await self._apply_one(command):
                failed_dags.add(dag_id)
        if batch.keep_only is not None:
            for dag_id in sorted(set(self.running) - batch.keep_only):
                # Work the cluster no longer gives this sidecar: stop it, at the token already applied.
                revoke = control_pb2.AssignmentCommand(
                    fencing_token=self.applied.get(dag_id, 0), revoke=control_pb2.Revoke(dag_id=dag_id)
                )
                await self._apply_one(revoke)
        # In queue order, after the commands: an Assign queued before this batch has already been applied.
        for dag_id in tokens_to_forget(batch.forget, self.running):
            self.applied.pop(dag_id, None)
            self.specs.pop(dag_id, None)

    async def _apply_one(self, command: control_pb2.AssignmentCommand) -> bool:
        """Apply one command to the target; False when the target failed (the router will resend)."""
        which, dag_id = command_dag(command)
        token = command.fencing_token
        if not dag_id:
            COMMANDS.labels(which or "none", "invalid").inc()
            log.warning("ignoring an assignment command without a DAG id: %s", command)
            return True
        if is_stale(self.applied, dag_id, token):
            self.stale_ignored += 1
            COMMANDS.labels(which, "ignored_stale").inc()
            log.debug(
                "ignoring a stale %s of DAG %s: token %d < applied %d",
                which,
                dag_id,
                token,
                self.applied.get(dag_id, 0),
            )
            return True
        if which == "assign" and not with_spec(command.assign, self.specs):
            COMMANDS.labels(which, "failed").inc()
            log.warning("an Assign of DAG %s came without a spec this sidecar holds; asking again", dag_id)
            return False
        try:
            if which == "assign":
                await self.target.assign(token, command.assign)
            else:
                await self.target.revoke(token, command.revoke)
        except asyncio.CancelledError:
            raise
        except Exception:
            COMMANDS.labels(which, "failed").inc()
            log.exception("the data plane failed to apply %s of DAG %s (token %d)", which, dag_id, token)
            return False
        COMMANDS.labels(which, "applied").inc()
        self.applied[dag_id] = max(self.applied.get(dag_id, 0), token)
        if which == "assign":
            self.specs[dag_id] = command.assign.dag
            self.running[dag_id] = {placement.stage_id for placement in command.assign.local}
            if not self.running[dag_id]:
                del self.running[dag_id]
        else:
            stages = set(command.revoke.stage_ids)
            left = self.running.get(dag_id, set()) - stages if stages else set()
            if left:
                self.running[dag_id] = left
            else:
                self.running.pop(dag_id, None)
                self.specs.pop(dag_id, None)
        return True

    async def close(self) -> None:
        """Stop the command worker (commands still queued are dropped; the router resends them)."""
        self._stopping = True
        self._wake.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while not self._queue.empty():
            batch = self._queue.get_nowait()
            self._forget_pending(batch)
            if not batch.done.done():
                batch.done.cancel()
