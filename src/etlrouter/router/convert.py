"""Conversions between the control plane's structs and the wire messages, in one place."""

from __future__ import annotations

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
from etlrouter.dsl import StageKind

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
MAX_NAME = 253  # a Kubernetes DNS subdomain: service and sidecar names come from there


class InvalidRequestError(ValueError):
    """A request field is missing or malformed; the message names the field path."""


def kind_to_proto(kind: StageKind) -> Any:
    return _KIND_TO_PROTO[kind]


def kind_from_proto(kind: int, field: str) -> StageKind:
    try:
        return _KIND_FROM_PROTO[kind]  # type: ignore[return-value]
    except KeyError:
        raise InvalidRequestError(
            f"{field}: a service kind (source, transform, sink or lookup) is required"
        ) from None


def require_name(value: str, field: str) -> str:
    if not value:
        raise InvalidRequestError(f"{field} must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidRequestError(f"{field} is {len(value)} characters long; the limit is {MAX_NAME}")
    return value


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


def command_to_proto(command: AssignmentCommand) -> control_pb2.AssignmentCommand:
    out = control_pb2.AssignmentCommand(fencing_token=command.fencing_token)
    inner = command.command
    if isinstance(inner, Assign):
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
    return admin_pb2.Diagnostic(
        file=diagnostic.file,
        line=diagnostic.line,
        column=diagnostic.column,
        message=diagnostic.message,
        hint=diagnostic.hint,
        excerpt=diagnostic.excerpt,
    )


def change_to_proto(change: PipelineChange) -> admin_pb2.PipelineChange:
    return admin_pb2.PipelineChange(
        name=change.name, action=_ACTION_TO_PROTO[change.action], generation=change.generation
    )
