"""The control plane's pure core: the replicated state machine, placement and liveness.

    state = ControlState()
    result = state.apply(index, encode_command(ApplyPipelines(definition=text, filename="p.etl")))
    plan = place(state.dags(), liveness.views(state.sidecar_services()), state.assignment())
    if (command := plan.to_command()) is not None:
        propose(encode_command(command))           # the leader; applied on every node
    commands = state.commands_for_sidecar(sidecar_id, applied_tokens)   # Heartbeat / Register answer

No I/O, no clocks: the Raft driver feeds entries, the router wires the rest.
"""

from etlrouter.control.commands import (
    COMMAND_FORMAT_VERSION,
    ApplyPipelines,
    AssignStages,
    ClientSession,
    Command,
    CommandDecodeError,
    CommandEnvelope,
    DeletePipeline,
    DeregisterService,
    DeregisterSidecar,
    ForgetReleased,
    RegisterService,
    RegisterSidecar,
    Restore,
    RevokeStages,
    decode_command,
    encode_command,
)
from etlrouter.control.liveness import Health, Liveness, LoadReport, SidecarPulse
from etlrouter.control.model import (
    Assign,
    AssignmentCommand,
    DagSpec,
    DagStageSpec,
    Diagnostic,
    PipelineChange,
    PipelinePhase,
    PipelineStatus,
    ReplicaAssignment,
    ReplicaKey,
    Revoke,
    ServiceInstance,
    StagePlacement,
    parallelism_of,
)
from etlrouter.control.placement import PlacementPlan, SidecarView, UnplacedStage, place
from etlrouter.control.state import (
    STATE_FORMAT_VERSION,
    ApplyResult,
    CommandError,
    ControlSnapshot,
    ControlState,
    PipelineRecord,
    ServiceRecord,
    SidecarRecord,
    SnapshotError,
)

__all__ = [
    "COMMAND_FORMAT_VERSION",
    "STATE_FORMAT_VERSION",
    "ApplyPipelines",
    "ApplyResult",
    "Assign",
    "AssignStages",
    "AssignmentCommand",
    "ClientSession",
    "Command",
    "CommandDecodeError",
    "CommandEnvelope",
    "CommandError",
    "ControlSnapshot",
    "ControlState",
    "DagSpec",
    "DagStageSpec",
    "DeletePipeline",
    "DeregisterService",
    "DeregisterSidecar",
    "Diagnostic",
    "ForgetReleased",
    "Health",
    "Liveness",
    "LoadReport",
    "PipelineChange",
    "PipelinePhase",
    "PipelineRecord",
    "PipelineStatus",
    "PlacementPlan",
    "RegisterService",
    "RegisterSidecar",
    "ReplicaAssignment",
    "ReplicaKey",
    "Restore",
    "Revoke",
    "RevokeStages",
    "ServiceInstance",
    "ServiceRecord",
    "SidecarPulse",
    "SidecarRecord",
    "SidecarView",
    "SnapshotError",
    "StagePlacement",
    "UnplacedStage",
    "decode_command",
    "encode_command",
    "parallelism_of",
    "place",
]
