"""The router's gRPC APIs: ServiceRegistry, SidecarCoordinator, PipelineAdmin, BackupService.

Each handler validates its request (errors name the field), turns it into a control command, a read or an
admin use case (router/admin.py, shared with GraphQL), and maps the outcome onto a gRPC status. A follower
answers writes and linearizable reads with FAILED_PRECONDITION and the leader's address in the
`etlrouter-leader` trailer; RouterClient follows it.
"""

from __future__ import annotations

import functools
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream
from prometheus_client import Counter, Gauge, Histogram

from etlrouter._proto.v1 import admin_grpc, admin_pb2, control_grpc, control_pb2
from etlrouter.client.router import RETRY_AFTER, SESSION_CLIENT, SESSION_SEQ, leader_trailer
from etlrouter.control import (
    ClientSession,
    DeregisterService,
    DeregisterSidecar,
    RegisterService,
    RegisterSidecar,
    Restore,
    ServiceInstance,
    SnapshotError,
)
from etlrouter.control.state import ControlState
from etlrouter.core.metrics import REGISTRY
from etlrouter.core.offload import OverloadedError, WorkTimeoutError
from etlrouter.dsl import ExplainFormat
from etlrouter.raft.node import NodeUnavailableError, NotLeader, UnknownOutcomeError
from etlrouter.router import admin
from etlrouter.router.admin import (
    NO_QUORUM,
    CommandRejectedError,
    InvalidRequestError,
    NotFoundError,
    require_name,
)
from etlrouter.router.convert import (
    change_to_proto,
    cluster_to_proto,
    command_to_proto,
    dag_to_proto,
    diagnostic_to_proto,
    dsl_error_to_proto,
    health_from_proto,
    health_to_proto,
    instance_from_proto,
    instance_to_proto,
    kind_to_proto,
    live_stats_to_proto,
    load_from_proto,
    pipeline_to_proto,
    placement_to_proto,
    stage_sample_from_proto,
)
from etlrouter.router.node import RouterNode, now_ms
from etlrouter.router.watch import SubscriberLaggedError

log = logging.getLogger(__name__)

SNAPSHOT_CHUNK = 1 << 20
MAX_RESTORE_BYTES = 256 << 20

_STATUS_OF_CODE = {
    "invalid_argument": Status.INVALID_ARGUMENT,
    "not_found": Status.NOT_FOUND,
    "already_exists": Status.ALREADY_EXISTS,
    "failed_precondition": Status.FAILED_PRECONDITION,
    "stale_index": Status.ABORTED,
}
_EXPLAIN_FORMATS: dict[int, ExplainFormat] = {0: "tree", 1: "dot", 2: "mermaid"}

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[None]])


API_SECONDS = Histogram(
    "etlrouter_api_request_seconds",
    "Router gRPC API latency by method and status.",
    ["method", "status"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
HEARTBEATS = Counter(
    "etlrouter_sidecar_heartbeats_total", "Sidecar heartbeats received by the leader.", registry=REGISTRY
)
HEARTBEAT_STREAMS = Gauge(
    "etlrouter_sidecar_heartbeat_streams",
    "Heartbeat streams open on this router (sidecars heartbeating on a stream rather than by call).",
    registry=REGISTRY,
)


def handles_errors(handler: _Handler) -> _Handler:
    """Map the router's exceptions onto gRPC statuses (the leader trailer for NotLeader); time the call."""
    method = handler.__name__

    @functools.wraps(handler)
    async def wrapper(self: Any, stream: Stream[Any, Any]) -> None:
        started = time.perf_counter()
        status = "OK"
        try:
            await _map_errors(handler, self, stream)
        except GRPCError as e:
            status = e.status.name
            raise
        finally:
            API_SECONDS.labels(method, status).observe(time.perf_counter() - started)

    return wrapper  # type: ignore[return-value]


def _refusal(error: Exception) -> tuple[Status, str, dict[str, str] | None] | None:
    """The gRPC status, message and trailing metadata a router exception is answered with (None: not one
    of the router's own, left to grpclib). The one mapping of unary calls and of heartbeat streams."""
    if isinstance(error, NotLeader):
        return Status.FAILED_PRECONDITION, str(error), leader_trailer(error.leader_id, error.leader_address)
    if isinstance(error, InvalidRequestError):
        return Status.INVALID_ARGUMENT, str(error), None
    if isinstance(error, NotFoundError):
        return Status.NOT_FOUND, str(error), None
    if isinstance(error, CommandRejectedError):
        return _STATUS_OF_CODE.get(error.code, Status.UNKNOWN), error.message, None
    if isinstance(error, OverloadedError):
        return Status.RESOURCE_EXHAUSTED, str(error), {RETRY_AFTER: f"{error.retry_after_s:g}"}
    if isinstance(error, NodeUnavailableError):  # starting or failed: another router can answer
        return Status.UNAVAILABLE, str(error), None
    if isinstance(error, WorkTimeoutError):  # before TimeoutError: answered, it gave up on the work
        return Status.DEADLINE_EXCEEDED, f"the router stopped this request: {error}", None
    if isinstance(error, UnknownOutcomeError):
        return Status.UNAVAILABLE, f"outcome unknown: {error}; retry with the same session", None
    if isinstance(error, TimeoutError):
        return Status.UNAVAILABLE, NO_QUORUM, None
    return None


def _status_name(error: Exception) -> str:
    if isinstance(error, GRPCError):
        return error.status.name
    refusal = _refusal(error)
    return refusal[0].name if refusal is not None else Status.UNKNOWN.name


async def _map_errors(handler: Callable[..., Awaitable[None]], self: Any, stream: Stream[Any, Any]) -> None:
    try:
        await handler(self, stream)
    except GRPCError:
        raise
    except Exception as e:
        refusal = _refusal(e)
        if refusal is None:
            raise
        status, message, trailers = refusal
        if trailers is None:
            raise GRPCError(status, message) from None
        await stream.send_trailing_metadata(status=status, status_message=message, metadata=trailers)


def session_of(stream: Stream[Any, Any]) -> ClientSession | None:
    metadata = dict(stream.metadata or {})
    client, seq = metadata.get(SESSION_CLIENT), metadata.get(SESSION_SEQ)
    if not client or not seq:
        return None
    try:
        return ClientSession(str(client), int(str(seq)))
    except ValueError:
        raise InvalidRequestError(f"metadata {SESSION_SEQ} must be an integer, got {seq!r}") from None


async def recv(stream: Stream[Any, Any]) -> Any:
    request = await stream.recv_message()
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "request message missing")
    return request


def without_kind_conflicts(
    state: ControlState, sidecar_id: str, services: tuple[ServiceInstance, ...]
) -> tuple[tuple[ServiceInstance, ...], list[control_pb2.RejectedService]]:
    """Split a sidecar's offered services into those the state accepts and those clashing on kind with
    another registration, so one misnamed service does not keep the sidecar's others out. The state
    machine still checks on apply: a clash that appears in between rejects the command, and the
    sidecar's retry is split again."""
    conflicts = state.kind_conflicts(sidecar_id, services)
    if not conflicts:
        return services, []
    clashing = {(c.service, c.offered) for c in conflicts}
    kept = tuple(s for s in services if (s.name, s.kind) not in clashing)
    rejected = [
        control_pb2.RejectedService(
            name=c.service,
            offered_kind=kind_to_proto(c.offered),
            registered_kind=kind_to_proto(c.registered),
            message=f"service `{c.service}` is already registered as a {c.registered}, not a {c.offered}",
        )
        for c in conflicts
    ]
    return kept, rejected


class _Base:
    def __init__(self, node: RouterNode) -> None:
        self.node = node

    async def read(self, consistency: int) -> None:
        if consistency == admin_pb2.READ_CONSISTENCY_LINEARIZABLE:
            await admin.linearizable_read(self.node)


class RegistryService(_Base, control_grpc.ServiceRegistryBase):
    @handles_errors
    async def Register(self, stream: Stream[Any, Any]) -> None:
        request: control_pb2.RegisterServiceRequest = await recv(stream)
        instance = instance_from_proto(request.instance, "instance")
        result = admin.checked(
            await self.node.propose(
                RegisterService(instance=instance, ttl_ms=request.ttl_ms), session_of(stream)
            )
        )
        self.node.heard_from_direct_service(result.instance_id, request.ttl_ms)
        await stream.send_message(
            control_pb2.RegisterServiceResponse(instance_id=result.instance_id, revision=result.revision)
        )

    @handles_errors
    async def Heartbeat(self, stream: Stream[Any, Any]) -> None:
        request: control_pb2.ServiceHeartbeatRequest = await recv(stream)
        self.node.require_leader()
        record = next(
            (r for r in self.node.state.direct_services() if r.instance_id == request.instance_id), None
        )
        if record is None:
            raise GRPCError(Status.NOT_FOUND, f"no registration {request.instance_id!r}: register again")
        self.node.heard_from_direct_service(record.instance_id, record.ttl_ms)
        await stream.send_message(control_pb2.ServiceHeartbeatResponse())

    @handles_errors
    async def Deregister(self, stream: Stream[Any, Any]) -> None:
        request: control_pb2.DeregisterServiceRequest = await recv(stream)
        require_name(request.instance_id, "instance_id")
        result = admin.checked(
            await self.node.propose(DeregisterService(instance_id=request.instance_id), session_of(stream))
        )
        await stream.send_message(control_pb2.DeregisterServiceResponse(revision=result.revision))

    @handles_errors
    async def Watch(self, stream: Stream[Any, Any]) -> None:
        request: control_pb2.WatchRequest = await recv(stream)
        kinds = frozenset(k.rstrip("s") for k in request.kinds)
        types = {"put": control_pb2.WatchEvent.TYPE_PUT, "delete": control_pb2.WatchEvent.TYPE_DELETE}
        try:
            async for event in self.node.watch.subscribe(kinds):
                if event.type != "bookmark" and event.revision <= request.since_revision:
                    continue
                await stream.send_message(
                    control_pb2.WatchEvent(
                        type=types.get(event.type, control_pb2.WatchEvent.TYPE_BOOKMARK),
                        revision=event.revision,
                        kind=event.kind,
                        name=event.name,
                        json=event.json,
                    )
                )
        except SubscriberLaggedError as e:
            raise GRPCError(Status.RESOURCE_EXHAUSTED, str(e)) from None


class CoordinatorService(_Base, control_grpc.SidecarCoordinatorBase):
    @handles_errors
    async def RegisterSidecar(self, stream: Stream[Any, Any]) -> None:
        request: control_pb2.RegisterSidecarRequest = await recv(stream)
        sidecar_id = require_name(request.sidecar_id, "sidecar_id")
        require_name(request.data_address, "data_address")
        services = tuple(
            instance_from_proto(s, f"services[{i}]", sidecar_id) for i, s in enumerate(request.services)
        )
        self.node.require_leader()  # the kinds check below reads the leader's state
        services, rejected = without_kind_conflicts(self.node.state, sidecar_id, services)
        command = RegisterSidecar(
            sidecar_id=sidecar_id,
            data_address=request.data_address,
            services=services,
            labels=dict(request.labels),
            version=request.version,
        )
        result = admin.checked(await self.node.propose(command, session_of(stream)))
        self.node.sidecar_liveness.heartbeat(sidecar_id, now_ms())
        self.node._poke.set()
        commands = self.node.state.commands_for_sidecar(sidecar_id, {})
        await stream.send_message(
            control_pb2.RegisterSidecarResponse(
                commands=[command_to_proto(c) for c in commands],
                heartbeat_interval_ms=self.node.config.sidecar.heartbeat_interval_ms,
                revision=result.revision,
                rejected_services=rejected,
            )
        )

    @handles_errors
    async def Heartbeat(self, stream: Stream[Any, Any]) -> None:
        request: control_pb2.SidecarHeartbeatRequest = await recv(stream)
        await stream.send_message(await self._beat(request))

    async def HeartbeatStream(self, stream: Stream[Any, Any]) -> None:
        # Not @handles_errors: that would time the whole stream as one call. Each heartbeat on it is
        # timed on its own; errors end the stream with the status a unary Heartbeat would get.
        HEARTBEAT_STREAMS.inc()
        try:
            await _map_errors(CoordinatorService._heartbeat_stream, self, stream)
        finally:
            HEARTBEAT_STREAMS.dec()

    async def _heartbeat_stream(self, stream: Stream[Any, Any]) -> None:
        sidecar_id = ""
        while (request := await stream.recv_message()) is not None:
            started = time.perf_counter()
            status = "OK"
            try:
                # The caller's identity was checked against the first request's sidecar id
                # (security/authz.py): the stream stays that sidecar's.
                if sidecar_id and request.sidecar_id != sidecar_id:
                    raise GRPCError(
                        Status.INVALID_ARGUMENT,
                        f"sidecar_id: this heartbeat stream carries the heartbeats of {sidecar_id!r},"
                        f" not of {request.sidecar_id!r}",
                    )
                reply = await self._beat(request)
                sidecar_id = request.sidecar_id
            except Exception as e:
                status = _status_name(e)
                raise
            finally:
                API_SECONDS.labels("HeartbeatStream", status).observe(time.perf_counter() - started)
            await stream.send_message(reply)

    async def _beat(
        self, request: control_pb2.SidecarHeartbeatRequest
    ) -> control_pb2.SidecarHeartbeatResponse:
        """One heartbeat: note the sidecar alive with its load and stage reports; the commands it lacks."""
        sidecar_id = require_name(request.sidecar_id, "sidecar_id")
        self.node.require_leader()
        HEARTBEATS.inc()
        state = self.node.state
        if state.sidecar(sidecar_id) is None:
            return control_pb2.SidecarHeartbeatResponse(reregister=True)
        self.node.sidecar_liveness.heartbeat(
            sidecar_id,
            now_ms(),
            health=health_from_proto(request.health),
            load=load_from_proto(request.load),
        )
        rejected: list[control_pb2.RejectedService] = []
        if request.services_changed:
            services = tuple(
                instance_from_proto(s, f"services[{i}]", sidecar_id) for i, s in enumerate(request.services)
            )
            services, rejected = without_kind_conflicts(state, sidecar_id, services)
            record = state.sidecar(sidecar_id)
            assert record is not None
            # A sidecar with rejected services resends its list every heartbeat: propose only a change.
            if tuple(sorted(services, key=lambda s: (s.name, s.endpoint))) != record.services:
                admin.checked(
                    await self.node.propose(
                        RegisterSidecar(
                            sidecar_id=sidecar_id,
                            data_address=record.data_address,
                            services=services,
                            labels=record.labels,
                            version=record.version,
                        )
                    )
                )
        # Leader-local live stats for the dashboard (router/stats.py), stamped with this router's clock.
        received = now_ms()
        self.node.live_stats.record(
            sidecar_id,
            received,
            ((r.dag_id, r.stage_id, stage_sample_from_proto(r, received)) for r in request.stages),
        )
        applied = dict(request.applied_tokens)
        for report in request.stages:
            applied[report.dag_id] = max(applied.get(report.dag_id, 0), report.fencing_token)
        commands = state.commands_for_sidecar(sidecar_id, applied)
        self.node.note_applied_tokens(sidecar_id, applied)
        return control_pb2.SidecarHeartbeatResponse(
            commands=[command_to_proto(c, dict(request.spec_generations)) for c in commands],
            rejected_services=rejected,
            forget_dags=state.forgettable_dags(sidecar_id, dict(request.applied_tokens)),
        )

    @handles_errors
    async def DeregisterSidecar(self, stream: Stream[Any, Any]) -> None:
        request: control_pb2.DeregisterSidecarRequest = await recv(stream)
        sidecar_id = require_name(request.sidecar_id, "sidecar_id")
        admin.checked(
            await self.node.propose(
                DeregisterSidecar(sidecar_id=sidecar_id, reason="left"), session_of(stream)
            )
        )
        self.node.sidecar_liveness.forget(sidecar_id)
        await stream.send_message(control_pb2.DeregisterSidecarResponse())


class AdminService(_Base, admin_grpc.PipelineAdminBase):
    @handles_errors
    async def ApplyPipelines(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.ApplyPipelinesRequest = await recv(stream)
        outcome = await admin.apply_pipelines(
            self.node,
            request.definition,
            request.filename,
            prune=request.prune,
            dry_run=request.dry_run,
            session=None if request.dry_run else session_of(stream),
        )
        await stream.send_message(
            admin_pb2.ApplyPipelinesResponse(
                changes=[change_to_proto(c) for c in outcome.changes],
                diagnostics=[diagnostic_to_proto(d) for d in outcome.diagnostics],
                revision=outcome.revision,
            )
        )

    async def _single(self, stream: Stream[Any, Any], outcome: admin.ApplyOutcome) -> None:
        response = admin_pb2.PipelineResponse(
            diagnostics=[diagnostic_to_proto(d) for d in outcome.diagnostics]
        )
        if outcome.changes:
            status = self.node.state.pipeline(outcome.changes[0].name)
            if status is not None:
                response.pipeline.CopyFrom(pipeline_to_proto(status))
        await stream.send_message(response)

    @handles_errors
    async def CreatePipeline(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.CreatePipelineRequest = await recv(stream)
        outcome = await admin.apply_pipelines(
            self.node, request.definition, request.filename, mode="create", session=session_of(stream)
        )
        await self._single(stream, outcome)

    @handles_errors
    async def UpdatePipeline(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.UpdatePipelineRequest = await recv(stream)
        outcome = await admin.apply_pipelines(
            self.node,
            request.definition,
            request.filename,
            mode="update",
            expected_generation=request.expected_generation,
            session=session_of(stream),
        )
        await self._single(stream, outcome)

    @handles_errors
    async def DeletePipeline(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.DeletePipelineRequest = await recv(stream)
        name = require_name(request.name, "name")
        revision = await admin.delete_pipeline(
            self.node, name, request.expected_generation, session_of(stream)
        )
        await stream.send_message(admin_pb2.DeletePipelineResponse(revision=revision))

    @handles_errors
    async def GetPipeline(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.GetPipelineRequest = await recv(stream)
        name = require_name(request.name, "name")
        await self.read(request.consistency)
        status = admin.pipeline(self.node, name)
        await stream.send_message(admin_pb2.PipelineResponse(pipeline=pipeline_to_proto(status)))

    @handles_errors
    async def ListPipelines(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.ListPipelinesRequest = await recv(stream)
        await self.read(request.consistency)
        state = self.node.state
        await stream.send_message(
            admin_pb2.ListPipelinesResponse(
                pipelines=[pipeline_to_proto(p) for p in state.pipelines()],
                dags=[dag_to_proto(d) for d in state.dag_specs()],
                revision=state.revision,
            )
        )

    @handles_errors
    async def ValidatePipelines(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.ValidatePipelinesRequest = await recv(stream)
        errors = await admin.validate_pipelines(self.node, request.definition, request.filename)
        await stream.send_message(
            admin_pb2.ValidatePipelinesResponse(
                valid=not errors, diagnostics=[dsl_error_to_proto(e, excerpt=True) for e in errors]
            )
        )

    @handles_errors
    async def ExplainPipelines(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.ExplainPipelinesRequest = await recv(stream)
        fmt: ExplainFormat = _EXPLAIN_FORMATS.get(request.format, "tree")
        explained = await admin.explain_pipelines(self.node, request.definition, request.filename, fmt)
        await stream.send_message(
            admin_pb2.ExplainPipelinesResponse(
                rendered=explained.rendered,
                diagnostics=[dsl_error_to_proto(e, excerpt=False) for e in explained.diagnostics],
                dags=[dag_to_proto(d) for d in explained.dags],
            )
        )

    @handles_errors
    async def ListServices(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.ListServicesRequest = await recv(stream)
        await self.read(request.consistency)
        await stream.send_message(
            admin_pb2.ListServicesResponse(
                services=[instance_to_proto(s) for s in self.node.state.services()]
            )
        )

    @handles_errors
    async def ListSidecars(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.ListSidecarsRequest = await recv(stream)
        await self.read(request.consistency)
        state, liveness, now = self.node.state, self.node.sidecar_liveness, now_ms()
        leader = self.node.raft.is_leader()
        out = []
        for record in state.sidecars():
            info = admin_pb2.SidecarInfo(
                sidecar_id=record.id,
                data_address=record.data_address,
                services=[instance_to_proto(s) for s in record.services],
                version=record.version,
            )
            pulse = liveness.pulse(record.id) if leader else None
            if pulse is not None:
                info.health = health_to_proto(pulse.health)
                info.last_heartbeat_age_ms = max(0, now - pulse.last_heartbeat_ms)
                if pulse.load is not None:
                    info.load.records_per_second = pulse.load.records_per_second
                    info.load.buffer_utilization = pulse.load.buffer_utilization
                    info.load.rss_bytes = pulse.load.rss_bytes
                    info.load.running_stages = pulse.load.running_stages
            info.stages.extend(placement_to_proto(p) for p in admin.sidecar_stages(self.node, record))
            out.append(info)
        await stream.send_message(admin_pb2.ListSidecarsResponse(sidecars=out))

    def _cluster_status(self) -> admin_pb2.ClusterStatus:
        return cluster_to_proto(admin.cluster_status(self.node))

    @handles_errors
    async def GetClusterStatus(self, stream: Stream[Any, Any]) -> None:
        await recv(stream)
        await stream.send_message(self._cluster_status())

    @handles_errors
    async def AddMember(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.AddMemberRequest = await recv(stream)
        node_id = require_name(request.node_id, "node_id")
        require_name(request.address, "address")
        self.node.require_leader()
        await self.node.raft.add_member(node_id, request.address, voter=not request.learner_only)
        await stream.send_message(self._cluster_status())

    @handles_errors
    async def RemoveMember(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.RemoveMemberRequest = await recv(stream)
        node_id = require_name(request.node_id, "node_id")
        self.node.require_leader()
        await self.node.raft.remove_member(node_id)
        await stream.send_message(self._cluster_status())

    @handles_errors
    async def TransferLeadership(self, stream: Stream[Any, Any]) -> None:
        request: admin_pb2.TransferLeadershipRequest = await recv(stream)
        self.node.require_leader()
        await self.node.raft.transfer_leadership(request.node_id)
        await stream.send_message(self._cluster_status())

    @handles_errors
    async def GetLiveStats(self, stream: Stream[Any, Any]) -> None:
        await recv(stream)
        self.node.require_leader()  # only the leader hears the heartbeats: followers send the leader trailer
        live = admin.live_stats_of(self.node, now_ms=now_ms(), wall_ms=int(time.time() * 1000))
        await stream.send_message(live_stats_to_proto(live))


class BackupService(_Base, admin_grpc.BackupServiceBase):
    @handles_errors
    async def CreateSnapshot(self, stream: Stream[Any, Any]) -> None:
        await recv(stream)
        self.node.require_leader()
        await self.node.linearizable()
        state = self.node.state
        data, index = state.snapshot(), state.applied_index
        info = admin_pb2.SnapshotInfo(
            index=index,
            term=self.node.raft.status().term,
            size=len(data),
            format=1,
            cluster_id=self.node.config.router.cluster_id,
            created_at_ms=int(time.time() * 1000),
        )
        chunks = range(0, max(len(data), 1), SNAPSHOT_CHUNK)
        for i, offset in enumerate(chunks):
            last = i == len(chunks) - 1
            chunk = admin_pb2.SnapshotChunk(data=data[offset : offset + SNAPSHOT_CHUNK], last=last)
            if i == 0:
                chunk.info.CopyFrom(info)
            if last:
                chunk.crc32 = zlib.crc32(data)
            await stream.send_message(chunk)

    @handles_errors
    async def RestoreSnapshot(self, stream: Stream[Any, Any]) -> None:
        parts: list[bytes] = []
        size, crc, last = 0, None, False
        async for chunk in stream:
            size += len(chunk.data)
            if size > MAX_RESTORE_BYTES:
                raise GRPCError(Status.RESOURCE_EXHAUSTED, f"snapshot exceeds {MAX_RESTORE_BYTES} bytes")
            parts.append(chunk.data)
            if chunk.last:
                crc, last = chunk.crc32, True
                break
        data = b"".join(parts)
        if not last:
            raise GRPCError(Status.INVALID_ARGUMENT, "snapshot stream ended before the chunk marked last")
        if crc != zlib.crc32(data):
            raise GRPCError(
                Status.DATA_LOSS, f"snapshot CRC mismatch: got {zlib.crc32(data)}, expected {crc}"
            )
        try:
            result = admin.checked(await self.node.propose(Restore(snapshot=data), session_of(stream)))
        except SnapshotError as e:
            raise GRPCError(Status.INVALID_ARGUMENT, f"not a snapshot this version can read: {e}") from None
        state = self.node.state
        await stream.send_message(
            admin_pb2.RestoreSnapshotResponse(
                index=result.index,
                pipelines=len(state.pipelines()),
                services=len(state.direct_services()),
                sidecars=len(state.sidecars()),
            )
        )


def router_services(node: RouterNode) -> list[Any]:
    return [
        node.raft.transport.service,
        RegistryService(node),
        CoordinatorService(node),
        AdminService(node),
        BackupService(node),
    ]
