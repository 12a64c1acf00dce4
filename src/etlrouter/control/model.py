"""Value types shared by the control plane's commands, state machine and placement.

They mirror the messages of proto/etlrouter/v1/control.proto and admin.proto field for field where
one exists (the gRPC layer converts), but use the DSL's `StageKind` strings instead of proto enums.
All are frozen msgspec Structs, so they are hashable, comparable and encode to stable bytes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import msgspec

from etlrouter.dsl import DagStage, OptionValue, StageKind
from etlrouter.dsl.model import render_value

DEFAULT_PARALLELISM = 1

PipelinePhase = Literal["pending", "running", "degraded"]
ChangeAction = Literal["created", "updated", "unchanged", "deleted"]


class ServiceInstance(msgspec.Struct, frozen=True, kw_only=True):
    """One user service instance (control.proto `ServiceInstance`)."""

    name: str
    kind: StageKind
    endpoint: str = ""
    # The sidecar fronting it; "" for a service registered directly.
    sidecar_id: str = ""
    # An encoded etlrouter.v1.Capabilities, kept opaque.
    capabilities: bytes = b""
    labels: dict[str, str] = {}


class ReplicaKey(NamedTuple):
    """One replica of one stage: the unit placement hands to a sidecar."""

    dag_id: str
    stage_id: str
    replica: int


class ReplicaAssignment(msgspec.Struct, frozen=True):
    """`key` runs on `sidecar_id`; an empty `sidecar_id` means the replica is unassigned."""

    dag_id: str
    stage_id: str
    replica: int
    sidecar_id: str

    @property
    def key(self) -> ReplicaKey:
        return ReplicaKey(self.dag_id, self.stage_id, self.replica)


class StagePlacement(msgspec.Struct, frozen=True):
    """control.proto `StagePlacement`."""

    stage_id: str
    sidecar_id: str
    data_address: str
    replica: int


class DagStageSpec(msgspec.Struct, frozen=True):
    """control.proto `StageSpec`: options in their canonical text form."""

    id: str
    kind: StageKind
    service: str
    options: dict[str, str]
    downstream: tuple[str, ...]
    pipelines: tuple[str, ...]
    parallelism: int
    # The policy of the edge into this stage: 0 = block, else shed after this many ms of starvation.
    shed_after_ms: int = 0


class DagSpec(msgspec.Struct, frozen=True):
    """control.proto `DagSpec`. `generation` is the log index of the last change to the DAG."""

    id: str
    stages: tuple[DagStageSpec, ...]
    generation: int


class Assign(msgspec.Struct, frozen=True, tag="assign"):
    dag: DagSpec
    placements: tuple[StagePlacement, ...]
    local: tuple[StagePlacement, ...]


class Revoke(msgspec.Struct, frozen=True, tag="revoke"):
    dag_id: str
    # Empty means the whole DAG.
    stage_ids: tuple[str, ...] = ()


class AssignmentCommand(msgspec.Struct, frozen=True):
    """control.proto `AssignmentCommand`: a sidecar ignores one whose token is below the highest it
    has applied for the same DAG."""

    fencing_token: int
    command: Assign | Revoke


class Diagnostic(msgspec.Struct, frozen=True):
    """admin.proto `Diagnostic`: a problem in a pipeline document, with its position."""

    file: str
    line: int
    column: int
    message: str
    hint: str = ""
    excerpt: str = ""


class PipelineChange(msgspec.Struct, frozen=True):
    name: str
    action: ChangeAction
    generation: int


class PipelineStatus(msgspec.Struct, frozen=True):
    """admin.proto `Pipeline` plus the file it was applied from."""

    name: str
    definition: str
    filename: str
    generation: int
    phase: PipelinePhase
    dag_id: str
    stage_ids: tuple[str, ...]
    conditions: tuple[str, ...]
    revision: int


def parallelism_of(stage: DagStage) -> int:
    """Replicas a stage runs: its `parallelism` option (the DSL bounds it to 1..256), default 1."""
    value = stage.options.get("parallelism", DEFAULT_PARALLELISM)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return DEFAULT_PARALLELISM
    return value


def option_text(value: OptionValue) -> str:
    """The canonical text of an option value, as DagSpec carries it (`2s`, `8MiB`, `true`, `abc`)."""
    if isinstance(value, str):
        return value
    return render_value(value)
