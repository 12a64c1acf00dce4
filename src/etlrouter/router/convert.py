"""Conversions between the router's model values and the wire messages (admin.proto, control.proto), in one
place: the control plane's structs, the admin use cases' results, and the live statistics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from etlrouter._proto.v1 import admin_pb2, control_pb2
from etlrouter.control import (
    Assign,
    AssignmentCommand,
    DagSpec,
    Diagnostic,
    PipelineChange,
    PipelineStatus,
    ServiceInstance,
    StagePlacement,
)
from etlrouter.control.liveness import Health, LoadReport
from etlrouter.dsl import DslError, StageKind
from etlrouter.router.admin import ClusterView, InvalidRequestError, require_name
from etlrouter.router.stats import (
    MAX_EDGES_PER_STAGE,
    EdgeSample,
    EdgeStats,
    LiveStats,
    SidecarLive,
    StageSample,
    StageStats,
)

_KIND_TO_PROTO: dict[str, Any] = {
    "source": control_pb2.SERVICE_KIND_SOURCE,
    "transform": control_pb2.SERVICE_KIND_TRANSFORM,
    "sink": control_pb2.SERVICE_KIND_SINK,
    "lookup": control_pb2.SERVICE_KIND_LOOKUP,
}
_KIND_FROM_PROTO = {value: key for key, value in _KIND_TO_PROTO.items()}
_PHASE_TO_PROTO: dict[str, Any] = {
    "pending": admin_pb2.PIPELINE_PHASE_PENDING,
    "running": admin_pb2.PIPELINE_PHASE_RUNNING,
    "degraded": admin_pb2.PIPELINE_PHASE_DEGRADED,
}
_ACTION_TO_PROTO: dict[str, Any] = {
    "created": admin_pb2.PipelineChange.ACTION_CREATED,
    "updated": admin_pb2.PipelineChange.ACTION_UPDATED,
    "unchanged": admin_pb2.PipelineChange.ACTION_UNCHANGED,
    "deleted": admin_pb2.PipelineChange.ACTION_DELETED,
}
_ACTION_FROM_PROTO: dict[int, Any] = {number: name for name, number in _ACTION_TO_PROTO.items()}
_HEALTH_TO_PROTO: dict[Health, control_pb2.Health] = {
    "unknown": control_pb2.HEALTH_UNKNOWN,
    "serving": control_pb2.HEALTH_SERVING,
    "degraded": control_pb2.HEALTH_DEGRADED,
    "not_serving": control_pb2.HEALTH_NOT_SERVING,
}
_HEALTH_FROM_PROTO: dict[int, Health] = {number: name for name, number in _HEALTH_TO_PROTO.items()}
# Messages the model mirrors name for name: copied by these names, one list per pair of types.
_DIAGNOSTIC_FIELDS = ("file", "line", "column", "message", "hint", "excerpt")
_LOAD_FIELDS = ("records_per_second", "buffer_utilization", "cpu_seconds", "rss_bytes", "running_stages")
# A forwarded snapshot is network input: bounded like the heartbeats that feed it.
MAX_FORWARDED_ITEMS = 100_000
# A stage report's last error is network input too: kept short.
MAX_ERROR_CHARS = 1000


def _fields(source: object, names: tuple[str, ...]) -> dict[str, Any]:
    return {name: getattr(source, name) for name in names}


def kind_to_proto(kind: StageKind) -> Any:
    return _KIND_TO_PROTO[kind]


def kind_from_proto(kind: int, field: str) -> StageKind:
    try:
        return _KIND_FROM_PROTO[kind]  # type: ignore[return-value]
    except KeyError:
        raise InvalidRequestError(
            f"{field}: a service kind (source, transform, sink or lookup) is required"
        ) from None


def instance_from_proto(pb: control_pb2.ServiceInstance, field: str, sidecar_id: str = "") -> ServiceInstance:
    return ServiceInstance(
        name=require_name(pb.name, f"{field}.name"),
        kind=kind_from_proto(pb.kind, f"{field}.kind"),
        endpoint=pb.endpoint,
        sidecar_id=sidecar_id or pb.sidecar_id,
        capabilities=pb.capabilities,
        labels=dict(pb.labels),
    )


def instance_to_proto(instance: ServiceInstance) -> control_pb2.ServiceInstance:
    return control_pb2.ServiceInstance(
        name=instance.name,
        kind=kind_to_proto(instance.kind),
        endpoint=instance.endpoint,
        sidecar_id=instance.sidecar_id,
        capabilities=instance.capabilities,
        labels=instance.labels,
    )


def dag_to_proto(dag: DagSpec) -> control_pb2.DagSpec:
    return control_pb2.DagSpec(
        id=dag.id,
        generation=dag.generation,
        stages=[
            control_pb2.StageSpec(
                id=stage.id,
                kind=kind_to_proto(stage.kind),
                service=stage.service,
                options=stage.options,
                downstream=stage.downstream,
                pipelines=stage.pipelines,
                parallelism=stage.parallelism,
                shed_after_ms=stage.shed_after_ms,
            )
            for stage in dag.stages
        ],
    )


def placement_to_proto(placement: StagePlacement) -> control_pb2.StagePlacement:
    return control_pb2.StagePlacement(
        stage_id=placement.stage_id,
        sidecar_id=placement.sidecar_id,
        data_address=placement.data_address,
        replica=placement.replica,
    )


def command_to_proto(
    command: AssignmentCommand, held_specs: Mapping[str, int] | None = None
) -> control_pb2.AssignmentCommand:
    """`held_specs`: the spec generations the sidecar holds (its heartbeat's spec_generations); an Assign
    of a generation it holds goes without the DagSpec."""
    out = control_pb2.AssignmentCommand(fencing_token=command.fencing_token)
    inner = command.command
    if isinstance(inner, Assign):
        out.assign.dag_id = inner.dag.id
        if held_specs is None or held_specs.get(inner.dag.id) != inner.dag.generation:
            out.assign.dag.CopyFrom(dag_to_proto(inner.dag))
        out.assign.placements.extend(placement_to_proto(p) for p in inner.placements)
        out.assign.local.extend(placement_to_proto(p) for p in inner.local)
    else:
        out.revoke.dag_id = inner.dag_id
        out.revoke.stage_ids.extend(inner.stage_ids)
    return out


def pipeline_to_proto(status: PipelineStatus) -> admin_pb2.Pipeline:
    return admin_pb2.Pipeline(
        name=status.name,
        definition=status.definition,
        generation=status.generation,
        phase=_PHASE_TO_PROTO[status.phase],
        dag_id=status.dag_id,
        stage_ids=status.stage_ids,
        conditions=status.conditions,
        revision=status.revision,
    )


def diagnostic_to_proto(diagnostic: Diagnostic) -> admin_pb2.Diagnostic:
    return admin_pb2.Diagnostic(**_fields(diagnostic, _DIAGNOSTIC_FIELDS))


def change_to_proto(change: PipelineChange) -> admin_pb2.PipelineChange:
    return admin_pb2.PipelineChange(
        name=change.name, action=_ACTION_TO_PROTO[change.action], generation=change.generation
    )


def change_from_proto(change: admin_pb2.PipelineChange) -> PipelineChange:
    return PipelineChange(
        name=change.name,
        action=_ACTION_FROM_PROTO.get(change.action, "unchanged"),
        generation=change.generation,
    )


def diagnostic_from_proto(diagnostic: admin_pb2.Diagnostic) -> Diagnostic:
    return Diagnostic(**_fields(diagnostic, _DIAGNOSTIC_FIELDS))


def dsl_error_to_proto(error: DslError, *, excerpt: bool) -> admin_pb2.Diagnostic:
    """A DSL error as a Diagnostic; `excerpt` carries the compiler-style rendering (ValidatePipelines)."""
    return admin_pb2.Diagnostic(
        file=error.filename,
        line=error.line,
        column=error.col,
        message=error.message,
        hint=error.hint or "",
        excerpt=error.render() if excerpt else "",
    )


def cluster_to_proto(view: ClusterView) -> admin_pb2.ClusterStatus:
    status = view.status
    return admin_pb2.ClusterStatus(
        node_id=status.node_id,
        leader_id=status.leader_id,
        leader_address=status.leader_address,
        term=status.term,
        commit_index=status.commit_index,
        applied_index=status.applied_index,
        last_snapshot_index=status.snapshot_index,
        members=[
            admin_pb2.ClusterMember(
                id=m.member.id,
                address=m.member.address,
                voter=m.member.voter,
                leader=m.leader,
                match_index=m.member.match_index,
                lag=m.lag,
                reachable=m.member.reachable,
            )
            for m in view.members
        ],
    )


def health_to_proto(health: Health) -> control_pb2.Health:
    return _HEALTH_TO_PROTO.get(health, control_pb2.HEALTH_UNKNOWN)


def health_from_proto(health: int) -> Health:
    return _HEALTH_FROM_PROTO.get(health, "unknown")


def load_from_proto(load: control_pb2.SidecarLoad) -> LoadReport:
    return LoadReport(**_fields(load, _LOAD_FIELDS))


def load_to_proto(load: LoadReport) -> control_pb2.SidecarLoad:
    return control_pb2.SidecarLoad(**_fields(load, _LOAD_FIELDS))


def stage_sample_from_proto(report: control_pb2.StageReport, at_ms: int) -> StageSample:
    """One StageReport as received, stamped with the router's clock (rates never mix two clocks)."""
    return StageSample(
        at_ms=at_ms,
        records_in=report.records_in,
        records_out=report.records_out,
        bytes_in=report.bytes_in,
        bytes_out=report.bytes_out,
        errors=report.errors,
        dead_lettered=report.dead_lettered,
        watermark_ms=report.watermark_ms,
        acked_records=report.acked_records,
        acked_offsets=dict(report.acked_offsets),
        last_error=report.last_error[:MAX_ERROR_CHARS],
        edges=tuple(
            EdgeSample(
                to_stage=e.to_stage_id,
                records_sent=e.records_sent,
                credits_available=e.credits_available,
                starved_s=max(0.0, e.starved_seconds_total),
                in_flight=e.in_flight_batches,
                oldest_in_flight_s=max(0.0, e.oldest_in_flight_seconds),
            )
            for e in report.edges[:MAX_EDGES_PER_STAGE]
        ),
    )


def live_stats_to_proto(live: LiveStats) -> admin_pb2.LiveStats:
    out = admin_pb2.LiveStats(at_ms=live.at_ms, leader_id=live.leader_id)
    for s in live.stages:
        stage = out.stages.add(
            dag_id=s.dag_id,
            stage_id=s.stage_id,
            replicas=s.replicas,
            sidecar_ids=s.sidecars,
            records_in=s.records_in,
            records_out=s.records_out,
            bytes_in=s.bytes_in,
            bytes_out=s.bytes_out,
            records_in_per_second=s.records_in_per_s,
            records_out_per_second=s.records_out_per_s,
            bytes_in_per_second=s.bytes_in_per_s,
            bytes_out_per_second=s.bytes_out_per_s,
            errors=s.errors,
            dead_lettered=s.dead_lettered,
            watermark_ms=s.watermark_ms,
            acked_records=s.acked_records,
            acked_offsets=s.acked_offsets,
            last_error=s.last_error,
        )
        if s.watermark_lag_ms is not None:
            stage.watermark_lag_ms = s.watermark_lag_ms
    for e in live.edges:
        out.edges.add(
            dag_id=e.dag_id,
            from_stage_id=e.from_stage,
            to_stage_id=e.to_stage,
            records_sent=e.records_sent,
            records_per_second=e.records_per_s,
            credits_available=e.credits_available,
            starved_seconds_total=e.starved_s,
            starved_ratio=e.starved_ratio,
            in_flight_batches=e.in_flight,
            oldest_in_flight_seconds=e.oldest_in_flight_s,
            backpressure_origin=e.origin,
        )
    for c in live.sidecars:
        sidecar = out.sidecars.add(
            sidecar_id=c.sidecar_id,
            health=_HEALTH_TO_PROTO[c.health],
            silent=c.silent,
            registered=c.registered,
        )
        if c.age_ms is not None:
            sidecar.last_heartbeat_age_ms = c.age_ms
        if c.load is not None:
            sidecar.load.CopyFrom(load_to_proto(c.load))
    return out


def _bounded(name: str, items: Sequence[Any]) -> None:
    if len(items) > MAX_FORWARDED_ITEMS:
        raise ValueError(f"LiveStats.{name} has {len(items)} entries, at most {MAX_FORWARDED_ITEMS}")


def live_stats_from_proto(reply: admin_pb2.LiveStats) -> LiveStats:
    """The inverse of `live_stats_to_proto` (on a follower); `backpressure` is derived by the same rule."""
    _bounded("stages", reply.stages)
    _bounded("edges", reply.edges)
    _bounded("sidecars", reply.sidecars)
    stages = [
        StageStats(
            dag_id=s.dag_id,
            stage_id=s.stage_id,
            replicas=s.replicas,
            records_in=s.records_in,
            records_out=s.records_out,
            bytes_in=s.bytes_in,
            bytes_out=s.bytes_out,
            records_in_per_s=s.records_in_per_second,
            records_out_per_s=s.records_out_per_second,
            bytes_in_per_s=s.bytes_in_per_second,
            bytes_out_per_s=s.bytes_out_per_second,
            errors=s.errors,
            dead_lettered=s.dead_lettered,
            watermark_ms=s.watermark_ms,
            watermark_lag_ms=s.watermark_lag_ms if s.HasField("watermark_lag_ms") else None,
            acked_records=s.acked_records,
            acked_offsets=dict(s.acked_offsets),
            last_error=s.last_error[:MAX_ERROR_CHARS],
            sidecars=list(s.sidecar_ids),
        )
        for s in reply.stages
    ]
    edges = [
        EdgeStats(
            dag_id=e.dag_id,
            from_stage=e.from_stage_id,
            to_stage=e.to_stage_id,
            records_sent=e.records_sent,
            records_per_s=e.records_per_second,
            credits_available=e.credits_available,
            starved_s=e.starved_seconds_total,
            starved_ratio=e.starved_ratio,
            in_flight=e.in_flight_batches,
            oldest_in_flight_s=e.oldest_in_flight_seconds,
            origin=e.backpressure_origin,
        )
        for e in reply.edges
    ]
    sidecars = [
        SidecarLive(
            c.sidecar_id,
            health=health_from_proto(c.health),
            load=load_from_proto(c.load) if c.HasField("load") else None,
            age_ms=c.last_heartbeat_age_ms if c.HasField("last_heartbeat_age_ms") else None,
            silent=c.silent,
            registered=c.registered,
        )
        for c in reply.sidecars
    ]
    return LiveStats(reply.at_ms, reply.leader_id, stages, edges, sidecars)
