"""The commands of the replicated control state, and their encoding into Raft log entries.

A log entry is a msgpack-encoded `CommandEnvelope`: a format version, an optional client session
(for duplicate suppression) and one command from the `Command` tagged union (`"type"` field). Every
node decodes the same bytes into the same command, so `ControlState.apply` sees identical input
everywhere. Decoding never trusts the bytes: anything malformed becomes an error result, not an
exception that would stop one replica and not the others.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from etlrouter.control.model import ReplicaAssignment, ReplicaKey, ServiceInstance
from etlrouter.control.versioned import VersionedCodec

COMMAND_FORMAT_VERSION = 1

ApplyMode = Literal["apply", "create", "update"]
DeregisterReason = Literal["left", "expired"]


class _Command(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    pass


class RegisterService(_Command, frozen=True, kw_only=True, tag="register_service"):
    """A service registering directly (no sidecar). An empty `instance_id` gets one assigned
    (`name@index`), returned in the result."""

    instance: ServiceInstance
    instance_id: str = ""
    ttl_ms: int = 0


class DeregisterService(_Command, frozen=True, kw_only=True, tag="deregister_service"):
    instance_id: str


class RegisterSidecar(_Command, frozen=True, kw_only=True, tag="register_sidecar"):
    """Announce or replace a sidecar. Replacing keeps its assignments for services it still fronts."""

    sidecar_id: str
    data_address: str
    services: tuple[ServiceInstance, ...] = ()
    labels: dict[str, str] = {}
    version: str = ""


class DeregisterSidecar(_Command, frozen=True, kw_only=True, tag="deregister_sidecar"):
    """A sidecar left (drained) or the leader saw it silent past the timeout; its replicas are freed."""

    sidecar_id: str
    reason: DeregisterReason = "left"


class ApplyPipelines(_Command, frozen=True, kw_only=True, tag="apply_pipelines"):
    """The desired state of the pipelines in one DSL document.

    `apply` creates or updates each pipeline; `create` refuses names that exist; `update` refuses
    names that do not, and with `expected_generation` > 0 any pipeline at another generation.
    `prune` deletes pipelines previously applied from the same `filename` that the document lacks.
    """

    definition: str
    filename: str = "<input>"
    prune: bool = False
    mode: ApplyMode = "apply"
    expected_generation: int = 0


class DeletePipeline(_Command, frozen=True, kw_only=True, tag="delete_pipeline"):
    name: str
    # 0 = unconditional.
    expected_generation: int = 0


class AssignStages(_Command, frozen=True, kw_only=True, tag="assign_stages"):
    """Placement decisions from the leader, applied atomically. An assignment with an empty
    `sidecar_id` unassigns the replica; a move is one assignment to the new sidecar."""

    assignments: tuple[ReplicaAssignment, ...]


class RevokeStages(_Command, frozen=True, kw_only=True, tag="revoke_stages"):
    """Unassign replicas without giving them a new home (e.g. shedding with no better sidecar yet)."""

    replicas: tuple[ReplicaKey, ...]


class ForgetReleased(_Command, frozen=True, kw_only=True, tag="forget_released"):
    """Sidecars confirmed (in heartbeats) that they applied these fencing tokens: the record of stages they
    were told to give up at or below them is no longer needed. Keeps the state bounded under churn; one
    entry carries every sidecar's confirmations of about a second."""

    confirmed: dict[str, dict[str, int]]  # sidecar id -> dag id -> highest token it applied


class Restore(_Command, frozen=True, kw_only=True, tag="restore"):
    """Replace the state of a cluster that has no pipelines with a snapshot's pipelines and direct
    services. Sidecars and assignments belong to the old cluster and are not restored: sidecars
    register again (a heartbeat from an unknown sidecar is told to)."""

    snapshot: bytes


Command = (
    RegisterService
    | DeregisterService
    | RegisterSidecar
    | DeregisterSidecar
    | ApplyPipelines
    | DeletePipeline
    | AssignStages
    | RevokeStages
    | ForgetReleased
    | Restore
)


class ClientSession(msgspec.Struct, frozen=True):
    """A client's identity and the sequence number of this request; a retry reuses the number."""

    client_id: str
    seq: int


class CommandEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    format_version: int = COMMAND_FORMAT_VERSION
    command: Command
    session: ClientSession | None = None


class CommandDecodeError(ValueError):
    """The bytes of a log entry are not a command this version understands."""


_codec = VersionedCodec(
    {COMMAND_FORMAT_VERSION: CommandEnvelope},
    what="command",
    not_this="log entry is not a command envelope",
    error=CommandDecodeError,
)


def encode_command(command: Command, session: ClientSession | None = None) -> bytes:
    return _codec.encode(CommandEnvelope(command=command, session=session))


def decode_command(data: bytes) -> CommandEnvelope:
    """Decode a log entry; raise `CommandDecodeError` naming what is wrong with it."""
    return _codec.decode(data)
