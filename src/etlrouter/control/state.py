"""The replicated control state: services, sidecars, pipelines, merged DAGs and assignments.

Raft calls `ControlState.apply(index, data)` on every node with the same entries in the same
order; everything here is a function of those entries alone, so every node reaches the same state.
Determinism rules kept throughout:

* no clocks, no randomness, no environment: the log index is the only notion of time, and every
  generated value (instance ids, generations, fencing tokens, revisions) is derived from it;
* every output and every persisted collection is sorted by key, never left in set or hash order;
* a command is validated completely before anything changes, so a rejected command leaves the state
  exactly as it was (only the session table records the cached error, for retries);
* bad input never raises: it becomes an `ApplyResult` with an error naming the problem and where.

The merged DAGs are derived (the DSL optimizer is deterministic), so a snapshot stores pipelines,
not DAGs, and restoring recomputes them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, NamedTuple

import msgspec

from etlrouter.control.commands import (
    ApplyPipelines,
    AssignStages,
    ClientSession,
    Command,
    CommandDecodeError,
    DeletePipeline,
    DeregisterService,
    DeregisterSidecar,
    ForgetReleased,
    RegisterService,
    RegisterSidecar,
    Restore,
    RevokeStages,
    decode_command,
)
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
    option_text,
    parallelism_of,
)
from etlrouter.control.versioned import VersionedCodec
from etlrouter.dsl import (
    DslError,
    MergedDag,
    Pipeline,
    StageKind,
    analyze,
    optimize,
    parse_with_errors,
)
from etlrouter.dsl import (
    stage_id as dsl_stage_id,
)
from etlrouter.dsl.syntax import Document

STATE_FORMAT_VERSION = 1
# Sessions kept for duplicate suppression; the least recently used is forgotten first.
MAX_SESSIONS = 10_000

ErrorCode = Literal[
    "invalid_argument",  # the command itself is wrong (bad DSL, empty id, malformed entry)
    "not_found",
    "already_exists",
    "failed_precondition",  # valid, but not against the current state (generation mismatch, kind clash)
    "stale_index",  # Raft handed an index at or below the last applied one
]


class CommandError(msgspec.Struct, frozen=True):
    code: ErrorCode
    message: str
    diagnostics: tuple[Diagnostic, ...] = ()


class ApplyResult(msgspec.Struct, frozen=True, kw_only=True):
    """What one log entry did. `revision` is the state's revision after it (unchanged on error)."""

    index: int
    revision: int
    error: CommandError | None = None
    changes: tuple[PipelineChange, ...] = ()
    # Set by RegisterService: the id of the registration.
    instance_id: str = ""
    # True when the session had already applied this request: the cached result, nothing changed.
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


# --- persisted records ----------------------------------------------------------------------------


class ServiceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A directly registered service (services behind a sidecar live in its `SidecarRecord`)."""

    instance_id: str
    instance: ServiceInstance
    ttl_ms: int
    revision: int


class SidecarRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    data_address: str
    services: tuple[ServiceInstance, ...]
    labels: dict[str, str]
    version: str
    revision: int

    def service_names(self) -> frozenset[str]:
        return frozenset(service.name for service in self.services)


class PipelineRecord(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    # The DSL text of this pipeline alone, cut from the document it was applied with.
    definition: str
    filename: str
    generation: int
    revision: int
    spec: Pipeline


class DagPlacementRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Per DAG: the log index of its last spec change, of its last placement or spec change (the
    fencing token sidecars see), and the holder of each replica of each stage ("" = unassigned)."""

    dag_id: str
    generation: int
    token: int
    replicas: dict[str, tuple[str, ...]]


class ReleasedStage(msgspec.Struct, frozen=True, array_like=True):
    """`sidecar_id` stopped holding `stage_id` at log index `index`: it must be told to stop."""

    sidecar_id: str
    dag_id: str
    stage_id: str
    index: int


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    client_id: str
    seq: int
    result: ApplyResult


class ControlSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    format_version: int = STATE_FORMAT_VERSION
    applied_index: int
    revision: int
    services: tuple[ServiceRecord, ...]
    sidecars: tuple[SidecarRecord, ...]
    pipelines: tuple[PipelineRecord, ...]
    dags: tuple[DagPlacementRecord, ...]
    released: tuple[ReleasedStage, ...]
    sessions: tuple[SessionRecord, ...]


class SnapshotError(ValueError):
    """Snapshot bytes this version cannot read."""


class KindConflict(NamedTuple):
    """A service offered as `offered` while another registration holds the name as `registered`."""

    service: str
    registered: StageKind
    offered: StageKind


class _KindClash(NamedTuple):
    position: int  # index of the entry in the offered list
    instance: ServiceInstance
    kind: StageKind  # the kind it clashes with
    within_command: bool  # True: an earlier entry of the same list; False: another registration


class _Rejected(Exception):
    """Internal: a command failed validation. Raised before any mutation, turned into a result."""

    def __init__(self, code: ErrorCode, message: str, diagnostics: tuple[Diagnostic, ...] = ()) -> None:
        super().__init__(message)
        self.error = CommandError(code, message, diagnostics)


@dataclass
class _DagState:
    generation: int
    token: int
    replicas: dict[str, list[str]] = field(default_factory=dict)


_snapshot_codec = VersionedCodec(
    {STATE_FORMAT_VERSION: ControlSnapshot},
    what="snapshot",
    not_this="not a control-state snapshot",
    error=SnapshotError,
)


class ControlState:
    """The control plane's state machine. Implements the DSL `Registry` protocol."""

    def __init__(self) -> None:
        self._applied_index = 0
        self._revision = 0
        self._services: dict[str, ServiceRecord] = {}
        self._sidecars: dict[str, SidecarRecord] = {}
        # sidecar_services(), built again only after a sidecar came, changed or went: the leader's
        # control loop reads it on every pass (at 10,000 sidecars, building it was most of a pass).
        self._services_view: Mapping[str, frozenset[str]] | None = None
        self._pipelines: dict[str, PipelineRecord] = {}
        self._dags: dict[str, MergedDag] = {}
        self._dag_state: dict[str, _DagState] = {}
        # sidecar -> dag -> stage -> index it was released at
        self._released: dict[str, dict[str, dict[str, int]]] = {}
        self._sessions: dict[str, SessionRecord] = {}
        # Derived indexes, rebuilt from the above on restore.
        self._kinds: dict[str, tuple[StageKind, int]] = {}
        self._fronting: dict[str, set[str]] = {}
        self._held: dict[str, dict[str, dict[str, int]]] = {}
        self._root_of: dict[str, str] = {}  # pipeline name -> its DAG (= its source stage id)
        # Heartbeat answers reuse the DagSpec until the DAG's generation (a log index) moves.
        self._spec_cache: dict[str, DagSpec] = {}

    # --- applying log entries ----------------------------------------------------------------------

    def apply(self, index: int, data: bytes) -> ApplyResult:
        """Apply the log entry at `index`. Never raises for bad input; see `ApplyResult`."""
        if index <= self._applied_index:
            return self._error(
                index, "stale_index", f"log index {index} is not above the last applied {self._applied_index}"
            )
        self._applied_index = index
        try:
            envelope = decode_command(data)
        except CommandDecodeError as problem:
            return self._error(index, "invalid_argument", f"entry {index}: {problem}")
        session = envelope.session
        if session is not None:
            cached = self._replay(session)
            if cached is not None:
                return cached
        result = self._dispatch(index, envelope.command)
        if session is not None:
            self._remember(session, result)
        return result

    def preview(self, command: ApplyPipelines) -> ApplyResult:
        """What `command` would do now, without doing it (ApplyPipelines `dry_run`)."""
        try:
            return self._apply_pipelines(self._applied_index, command, commit=False)
        except _Rejected as rejected:
            return ApplyResult(index=self._applied_index, revision=self._revision, error=rejected.error)

    def _error(self, index: int, code: ErrorCode, message: str) -> ApplyResult:
        return ApplyResult(index=index, revision=self._revision, error=CommandError(code, message))

    def _replay(self, session: ClientSession) -> ApplyResult | None:
        record = self._sessions.get(session.client_id)
        if record is None or session.seq > record.seq:
            return None
        if session.seq == record.seq:
            return msgspec.structs.replace(record.result, duplicate=True)
        return ApplyResult(
            index=self._applied_index,
            revision=self._revision,
            duplicate=True,
            error=CommandError(
                "failed_precondition",
                f"client {session.client_id!r} request {session.seq} was superseded by request {record.seq}",
            ),
        )

    def _remember(self, session: ClientSession, result: ApplyResult) -> None:
        self._sessions.pop(session.client_id, None)  # re-insert: dict order is recency order
        self._sessions[session.client_id] = SessionRecord(
            client_id=session.client_id, seq=session.seq, result=result
        )
        while len(self._sessions) > MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

    def _dispatch(self, index: int, command: Command) -> ApplyResult:
        try:
            match command:
                case RegisterService():
                    return self._register_service(index, command)
                case DeregisterService():
                    return self._deregister_service(index, command)
                case RegisterSidecar():
                    return self._register_sidecar(index, command)
                case DeregisterSidecar():
                    return self._deregister_sidecar(index, command)
                case ApplyPipelines():
                    return self._apply_pipelines(index, command, commit=True)
                case DeletePipeline():
                    return self._delete_pipeline(index, command)
                case AssignStages():
                    return self._assign(index, command.assignments, "AssignStages")
                case RevokeStages():
                    revokes = tuple(ReplicaAssignment(*key, "") for key in command.replicas)
                    return self._assign(index, revokes, "RevokeStages")
                case ForgetReleased():
                    return self._forget_released(index, command)
                case Restore():
                    return self._restore_command(index, command)
        except _Rejected as rejected:
            return ApplyResult(index=index, revision=self._revision, error=rejected.error)

    def _changed(
        self, index: int, *, changes: tuple[PipelineChange, ...] = (), instance_id: str = ""
    ) -> ApplyResult:
        self._revision = index
        return ApplyResult(index=index, revision=index, changes=changes, instance_id=instance_id)

    def _unchanged(self, index: int) -> ApplyResult:
        return ApplyResult(index=index, revision=self._revision)

    # --- services ------------------------------------------------------------------------------------

    def _register_service(self, index: int, command: RegisterService) -> ApplyResult:
        instance = command.instance
        where = f"RegisterService {instance.name!r}"
        if not instance.name:
            raise _Rejected("invalid_argument", "RegisterService: the service name is empty")
        if instance.sidecar_id:
            raise _Rejected(
                "invalid_argument",
                f"{where}: a directly registered service has no sidecar_id (got {instance.sidecar_id!r});"
                " services behind a sidecar come with RegisterSidecar",
            )
        if command.ttl_ms < 0:
            raise _Rejected("invalid_argument", f"{where}: ttl_ms is negative ({command.ttl_ms})")
        instance_id = command.instance_id or f"{instance.name}@{index}"
        old = self._services.get(instance_id)
        self._check_kinds(where, [instance], [old.instance] if old else [])
        record = ServiceRecord(
            instance_id=instance_id, instance=instance, ttl_ms=command.ttl_ms, revision=index
        )
        if old is not None and msgspec.structs.replace(old, revision=index) == record:
            return ApplyResult(index=index, revision=self._revision, instance_id=instance_id)
        if old is not None:
            self._count_kinds([old.instance], -1)
        self._count_kinds([instance], +1)
        self._services[instance_id] = record
        return self._changed(index, instance_id=instance_id)

    def _deregister_service(self, index: int, command: DeregisterService) -> ApplyResult:
        old = self._services.pop(command.instance_id, None)
        if old is None:
            raise _Rejected("not_found", f"DeregisterService: no service instance {command.instance_id!r}")
        self._count_kinds([old.instance], -1)
        return self._changed(index, instance_id=command.instance_id)

    def _check_kinds(self, where: str, added: list[ServiceInstance], replaced: list[ServiceInstance]) -> None:
        """Reject `added` at its first kind clash (see `_kind_clashes`)."""
        for clash in self._kind_clashes(added, replaced):
            instance = clash.instance
            if clash.within_command:
                raise _Rejected(
                    "invalid_argument",
                    f"{where}: services[{clash.position}] `{instance.name}` is a {instance.kind}"
                    f" but an earlier entry says {clash.kind}",
                )
            raise _Rejected(
                "failed_precondition",
                f"{where}: service `{instance.name}` is already registered as a {clash.kind},"
                f" not a {instance.kind}",
            )

    def _kind_clashes(
        self, added: Sequence[ServiceInstance], replaced: Sequence[ServiceInstance]
    ) -> Iterator[_KindClash]:
        """The kinds rule, in one place: a service name has one kind cluster-wide. `replaced` instances
        are about to go away (the same sidecar's or registration's previous list), so they do not count.
        Clashes come in entry order; for one entry, a clash with an earlier entry of the same command
        comes before its clash with the registry (the first clash is the error apply reports)."""
        leaving: dict[str, int] = {}
        for instance in replaced:
            leaving[instance.name] = leaving.get(instance.name, 0) + 1
        seen: dict[str, StageKind] = {}
        for position, instance in enumerate(added):
            first = seen.setdefault(instance.name, instance.kind)
            if first != instance.kind:
                yield _KindClash(position, instance, first, within_command=True)
            registered = self._kinds.get(instance.name)
            if registered is None:
                continue
            kind, count = registered
            if kind != instance.kind and count > leaving.get(instance.name, 0):
                yield _KindClash(position, instance, kind, within_command=False)

    def _count_kinds(
        self, instances: tuple[ServiceInstance, ...] | list[ServiceInstance], delta: int
    ) -> None:
        for instance in instances:
            kind, count = self._kinds.get(instance.name, (instance.kind, 0))
            count += delta
            if count > 0:
                self._kinds[instance.name] = (instance.kind if delta > 0 else kind, count)
            else:
                self._kinds.pop(instance.name, None)

    # --- sidecars ------------------------------------------------------------------------------------

    def _register_sidecar(self, index: int, command: RegisterSidecar) -> ApplyResult:
        sidecar_id = command.sidecar_id
        if not sidecar_id:
            raise _Rejected("invalid_argument", "RegisterSidecar: sidecar_id is empty")
        where = f"RegisterSidecar {sidecar_id!r}"
        if not command.data_address:
            raise _Rejected("invalid_argument", f"{where}: data_address is empty")
        services: list[ServiceInstance] = []
        for position, service in enumerate(command.services):
            if not service.name:
                raise _Rejected("invalid_argument", f"{where}: services[{position}] has an empty name")
            if service.sidecar_id not in ("", sidecar_id):
                raise _Rejected(
                    "invalid_argument",
                    f"{where}: services[{position}] `{service.name}` names another sidecar"
                    f" ({service.sidecar_id!r})",
                )
            services.append(msgspec.structs.replace(service, sidecar_id=sidecar_id))
        old = self._sidecars.get(sidecar_id)
        self._check_kinds(where, services, list(old.services) if old else [])
        record = SidecarRecord(
            id=sidecar_id,
            data_address=command.data_address,
            services=tuple(sorted(services, key=lambda service: (service.name, service.endpoint))),
            labels=dict(sorted(command.labels.items())),
            version=command.version,
            revision=index,
        )
        if old is not None and msgspec.structs.replace(old, revision=index) == record:
            return self._unchanged(index)
        if old is not None:
            self._forget_sidecar_services(old)
            kept = record.service_names()
            for dag_id, stage_id, replica in self._replicas_held_by(sidecar_id):
                stage = self._dags[dag_id].stage(stage_id)
                if stage.service not in kept:
                    self._set_holder(dag_id, stage_id, replica, "", index)
                elif old.data_address != record.data_address:
                    self._dag_state[dag_id].token = index  # peers route to the new address
        self._sidecars[sidecar_id] = record
        self._services_view = None
        self._count_kinds(record.services, +1)
        for name in record.service_names():
            self._fronting.setdefault(name, set()).add(sidecar_id)
        return self._changed(index)

    def _forget_sidecar_services(self, record: SidecarRecord) -> None:
        self._count_kinds(record.services, -1)
        for name in record.service_names():
            fronts = self._fronting.get(name)
            if fronts is not None:
                fronts.discard(record.id)
                if not fronts:
                    del self._fronting[name]

    def _deregister_sidecar(self, index: int, command: DeregisterSidecar) -> ApplyResult:
        record = self._sidecars.get(command.sidecar_id)
        if record is None:
            raise _Rejected("not_found", f"DeregisterSidecar: no sidecar {command.sidecar_id!r}")
        for dag_id, stage_id, replica in self._replicas_held_by(record.id):
            self._set_holder(dag_id, stage_id, replica, "", index)
        del self._sidecars[record.id]
        self._services_view = None
        self._forget_sidecar_services(record)
        self._released.pop(record.id, None)  # gone: nobody left to tell
        self._held.pop(record.id, None)
        return self._changed(index)

    # --- pipelines -----------------------------------------------------------------------------------

    def _apply_pipelines(self, index: int, command: ApplyPipelines, *, commit: bool) -> ApplyResult:
        try:
            document, syntax_errors = parse_with_errors(command.definition, command.filename)
            compiled, semantic_errors = analyze(document, self)
        except Exception as crash:  # a compiler bug must not stop the replicas: same text, same result
            raise _Rejected(
                "invalid_argument",
                f"{command.filename}: the pipeline compiler failed ({type(crash).__name__}: {crash})",
            ) from None
        errors = sorted([*syntax_errors, *semantic_errors], key=DslError.sort_key)
        if errors:
            count = len(errors)
            first = errors[0]
            raise _Rejected(
                "invalid_argument",
                f"{count} error{'s' if count != 1 else ''} in {command.filename}; first:"
                f" {first.location}: {first.message}",
                tuple(diagnostic_of(error) for error in errors),
            )
        texts = _pipeline_texts(document)
        names = [pipeline.name for pipeline in compiled]
        for name in names:
            old = self._pipelines.get(name)
            if command.mode == "create" and old is not None:
                raise _Rejected("already_exists", f"pipeline `{name}` already exists (from {old.filename})")
            if command.mode == "update" and old is None:
                raise _Rejected("not_found", f"pipeline `{name}` does not exist")
            if command.expected_generation and (old is None or old.generation != command.expected_generation):
                actual = "does not exist" if old is None else f"is at generation {old.generation}"
                raise _Rejected(
                    "failed_precondition",
                    f"pipeline `{name}` {actual}, expected generation {command.expected_generation}",
                )

        changes: list[PipelineChange] = []
        records: list[PipelineRecord] = []
        for pipeline in compiled:
            old = self._pipelines.get(pipeline.name)
            if old is not None and old.spec == pipeline and old.filename == command.filename:
                changes.append(PipelineChange(pipeline.name, "unchanged", old.generation))
                continue
            generation = 1 if old is None else old.generation + 1
            changes.append(PipelineChange(pipeline.name, "created" if old is None else "updated", generation))
            records.append(
                PipelineRecord(
                    name=pipeline.name,
                    definition=texts.get(pipeline.name, ""),
                    filename=command.filename,
                    generation=generation,
                    revision=index,
                    spec=pipeline,
                )
            )
        pruned: list[str] = []
        if command.prune:
            keep = set(names)
            pruned = sorted(
                name
                for name, record in self._pipelines.items()
                if record.filename == command.filename and name not in keep
            )
            changes.extend(
                PipelineChange(name, "deleted", self._pipelines[name].generation) for name in pruned
            )
        if not commit or (not records and not pruned):
            return ApplyResult(index=index, revision=self._revision, changes=tuple(changes))
        roots: set[str] = set()
        for record in records:
            roots |= self._put_pipeline(record)
        for name in pruned:
            roots.add(self._drop_pipeline(name))
        self._rebuild_dags(index, roots)
        return self._changed(index, changes=tuple(changes))

    def _delete_pipeline(self, index: int, command: DeletePipeline) -> ApplyResult:
        record = self._pipelines.get(command.name)
        if record is None:
            raise _Rejected("not_found", f"DeletePipeline: pipeline `{command.name}` does not exist")
        if command.expected_generation and record.generation != command.expected_generation:
            raise _Rejected(
                "failed_precondition",
                f"DeletePipeline: pipeline `{command.name}` is at generation {record.generation},"
                f" expected {command.expected_generation}",
            )
        self._rebuild_dags(index, {self._drop_pipeline(command.name)})
        return self._changed(index, changes=(PipelineChange(command.name, "deleted", record.generation),))

    def _rebuild_dags(self, index: int, roots: set[str]) -> None:
        """Recompute the merged DAGs rooted at `roots` (the sources of the pipelines that changed;
        DAGs never span sources, so the others cannot change). Stages that vanish lose their
        holders; a changed DAG gets a new generation and token; an equal one keeps both, so its
        sidecars hear nothing."""
        groups: dict[str, list[Pipeline]] = {root: [] for root in roots}
        for name, root in self._root_of.items():
            if root in groups:
                groups[root].append(self._pipelines[name].spec)
        for dag_id in sorted(roots):
            merged = optimize(groups[dag_id])
            if not merged:
                if dag_id in self._dag_state:
                    self._clear_stages(dag_id, sorted(self._dag_state[dag_id].replicas), index)
                    del self._dag_state[dag_id]
                self._dags.pop(dag_id, None)
                continue
            (dag,) = merged
            if self._dags.get(dag_id) == dag:
                continue
            state = self._dag_state.setdefault(dag_id, _DagState(generation=index, token=index))
            live = {stage.id for stage in dag.stages}
            self._clear_stages(dag_id, sorted(state.replicas.keys() - live), index)
            for stage in dag.stages:
                # Same id means same options, so the replica count cannot have changed.
                state.replicas.setdefault(stage.id, [""] * parallelism_of(stage))
            state.generation = state.token = index
            self._dags[dag_id] = dag

    def _clear_stages(self, dag_id: str, stage_ids: list[str], index: int) -> None:
        replicas = self._dag_state[dag_id].replicas
        for stage_id in stage_ids:
            for replica, holder in enumerate(replicas[stage_id]):
                if holder:
                    self._set_holder(dag_id, stage_id, replica, "", index)
            del replicas[stage_id]

    def _put_pipeline(self, record: PipelineRecord) -> set[str]:
        """Store a pipeline; return the DAG roots it leaves and joins."""
        roots = {root_of(record.spec)}
        if record.name in self._root_of:
            roots.add(self._root_of[record.name])
        self._pipelines[record.name] = record
        self._root_of[record.name] = root_of(record.spec)
        return roots

    def _drop_pipeline(self, name: str) -> str:
        del self._pipelines[name]
        return self._root_of.pop(name)

    # --- assignments ---------------------------------------------------------------------------------

    def _assign(self, index: int, assignments: tuple[ReplicaAssignment, ...], what: str) -> ApplyResult:
        seen: set[ReplicaKey] = set()
        effective: list[ReplicaAssignment] = []
        services: dict[str, dict[str, str]] = {}  # dag -> stage -> service, built on first use
        for position, assignment in enumerate(assignments):
            where = f"{what}[{position}] ({assignment.dag_id}/{assignment.stage_id}#{assignment.replica})"
            key = assignment.key
            if key in seen:
                raise _Rejected("invalid_argument", f"{where}: the replica appears twice in one command")
            seen.add(key)
            dag = self._dags.get(assignment.dag_id)
            state = self._dag_state.get(assignment.dag_id)
            holders = state.replicas.get(assignment.stage_id) if state else None
            if dag is None or holders is None:
                if not assignment.sidecar_id:
                    continue  # unassigning what no longer exists: already done
                problem = "no such DAG" if dag is None else "no such stage in the DAG"
                raise _Rejected("not_found", f"{where}: {problem}")
            if not 0 <= assignment.replica < len(holders):
                raise _Rejected(
                    "invalid_argument",
                    f"{where}: replica {assignment.replica} is out of range (parallelism {len(holders)})",
                )
            if assignment.sidecar_id:
                if assignment.sidecar_id not in self._sidecars:
                    raise _Rejected("not_found", f"{where}: no sidecar {assignment.sidecar_id!r}")
                if dag.root not in services:
                    services[dag.root] = {stage.id: stage.service for stage in dag.stages}
                service = services[dag.root][assignment.stage_id]
                if assignment.sidecar_id not in self._fronting.get(service, ()):
                    raise _Rejected(
                        "failed_precondition",
                        f"{where}: sidecar {assignment.sidecar_id!r} does not front service `{service}`",
                    )
            effective.append(assignment)
        changed = False
        for assignment in effective:
            changed |= self._set_holder(*assignment.key, assignment.sidecar_id, index)
        return self._changed(index) if changed else self._unchanged(index)

    def _set_holder(self, dag_id: str, stage_id: str, replica: int, sidecar_id: str, index: int) -> bool:
        """The one place a replica changes hands; keeps `_held`, `_released` and the token in step."""
        state = self._dag_state[dag_id]
        holders = state.replicas[stage_id]
        previous = holders[replica]
        if previous == sidecar_id:
            return False
        holders[replica] = sidecar_id
        if previous:
            stages = self._held[previous][dag_id]
            stages[stage_id] -= 1
            if not stages[stage_id]:
                del stages[stage_id]
                self._released.setdefault(previous, {}).setdefault(dag_id, {})[stage_id] = index
                if not stages:
                    del self._held[previous][dag_id]
        if sidecar_id:
            stages = self._held.setdefault(sidecar_id, {}).setdefault(dag_id, {})
            stages[stage_id] = stages.get(stage_id, 0) + 1
            released = self._released.get(sidecar_id, {}).get(dag_id)
            if released is not None:
                released.pop(stage_id, None)
        state.token = index
        return True

    def _forget_released(self, index: int, command: ForgetReleased) -> ApplyResult:
        """Drop the release records sidecars confirmed applying. Bookkeeping only: no reader and no
        placement sees a difference (commands_for_sidecar skips confirmed releases), so the revision stays."""
        for sidecar_id, confirmed in sorted(command.confirmed.items()):
            dags = self._released.get(sidecar_id)
            if dags is None:
                continue
            for dag_id, token in confirmed.items():
                stages = dags.get(dag_id)
                if stages is None:
                    continue
                for stage_id in [stage for stage, at in stages.items() if at <= token]:
                    del stages[stage_id]
                if not stages:
                    del dags[dag_id]
            if not dags:
                del self._released[sidecar_id]
        return self._unchanged(index)

    def confirmed_releases(self, sidecar_id: str, applied: Mapping[str, int]) -> dict[str, int]:
        """The DAGs whose release records `sidecar_id` has confirmed with these applied tokens (what a
        ForgetReleased may drop); empty when there is nothing to forget."""
        dags = self._released.get(sidecar_id, {})
        return {
            dag_id: applied[dag_id]
            for dag_id, stages in dags.items()
            if dag_id in applied and any(at <= applied[dag_id] for at in stages.values())
        }

    def forgettable_dags(self, sidecar_id: str, applied: Mapping[str, int]) -> list[str]:
        """DAGs among `applied` of which nothing is kept for this sidecar: no replica held, no release
        left to confirm. The sidecar may drop their fencing tokens: any later Assign there is newer."""
        held = self._held.get(sidecar_id, {})
        released = self._released.get(sidecar_id, {})
        return sorted(dag_id for dag_id in applied if dag_id not in held and dag_id not in released)

    def _replicas_held_by(self, sidecar_id: str) -> list[ReplicaKey]:
        keys: list[ReplicaKey] = []
        for dag_id, stages in sorted(self._held.get(sidecar_id, {}).items()):
            replicas = self._dag_state[dag_id].replicas
            for stage_id in sorted(stages):
                keys.extend(
                    ReplicaKey(dag_id, stage_id, replica)
                    for replica, holder in enumerate(replicas[stage_id])
                    if holder == sidecar_id
                )
        return keys

    # --- restore -------------------------------------------------------------------------------------

    def _restore_command(self, index: int, command: Restore) -> ApplyResult:
        if self._pipelines:
            raise _Rejected(
                "failed_precondition",
                f"Restore: the cluster already has {len(self._pipelines)} pipeline(s);"
                " a snapshot is restored only into a cluster without pipelines",
            )
        try:
            snapshot = _snapshot_codec.decode(command.snapshot)
        except SnapshotError as problem:
            raise _Rejected("invalid_argument", f"Restore: {problem}") from None
        self._load(
            ControlSnapshot(
                applied_index=index,
                revision=index,
                services=tuple(
                    msgspec.structs.replace(record, revision=index) for record in snapshot.services
                ),
                sidecars=(),
                pipelines=(),
                dags=(),
                released=(),
                sessions=(),
            )
        )
        roots: set[str] = set()
        for record in snapshot.pipelines:
            roots |= self._put_pipeline(msgspec.structs.replace(record, revision=index))
        self._rebuild_dags(index, roots)
        return self._changed(index)

    # --- snapshots -----------------------------------------------------------------------------------

    def to_snapshot(self) -> ControlSnapshot:
        released = [
            ReleasedStage(sidecar_id, dag_id, stage_id, at)
            for sidecar_id, dags in self._released.items()
            for dag_id, stages in dags.items()
            for stage_id, at in stages.items()
        ]
        return ControlSnapshot(
            applied_index=self._applied_index,
            revision=self._revision,
            services=tuple(record for _, record in sorted(self._services.items())),
            sidecars=tuple(record for _, record in sorted(self._sidecars.items())),
            pipelines=tuple(record for _, record in sorted(self._pipelines.items())),
            dags=tuple(
                DagPlacementRecord(
                    dag_id=dag_id,
                    generation=state.generation,
                    token=state.token,
                    replicas={
                        stage_id: tuple(holders) for stage_id, holders in sorted(state.replicas.items())
                    },
                )
                for dag_id, state in sorted(self._dag_state.items())
            ),
            released=tuple(
                sorted(released, key=lambda entry: (entry.sidecar_id, entry.dag_id, entry.stage_id))
            ),
            # Recency order matters (eviction), so sessions keep theirs.
            sessions=tuple(self._sessions.values()),
        )

    def snapshot(self) -> bytes:
        return _snapshot_codec.encode(self.to_snapshot())

    def restore(self, data: bytes) -> None:
        """Replace the whole state with a snapshot (Raft InstallSnapshot). Raises `SnapshotError`."""
        self._load(_snapshot_codec.decode(data))

    @classmethod
    def from_snapshot(cls, data: bytes) -> ControlState:
        state = cls()
        state.restore(data)
        return state

    def _load(self, snapshot: ControlSnapshot) -> None:
        fresh = ControlState()
        fresh._applied_index = snapshot.applied_index
        fresh._revision = snapshot.revision
        for service in snapshot.services:
            fresh._services[service.instance_id] = service
            fresh._count_kinds([service.instance], +1)
        for sidecar in snapshot.sidecars:
            fresh._sidecars[sidecar.id] = sidecar
            fresh._count_kinds(sidecar.services, +1)
            for name in sidecar.service_names():
                fresh._fronting.setdefault(name, set()).add(sidecar.id)
        for pipeline in snapshot.pipelines:
            fresh._put_pipeline(pipeline)
        fresh._dags = {dag.root: dag for dag in optimize(record.spec for record in snapshot.pipelines)}
        for placement in snapshot.dags:
            fresh._dag_state[placement.dag_id] = _DagState(
                generation=placement.generation,
                token=placement.token,
                replicas={stage_id: list(holders) for stage_id, holders in placement.replicas.items()},
            )
            for stage_id, holders in placement.replicas.items():
                for holder in holders:
                    if holder:
                        stages = fresh._held.setdefault(holder, {}).setdefault(placement.dag_id, {})
                        stages[stage_id] = stages.get(stage_id, 0) + 1
        for entry in snapshot.released:
            fresh._released.setdefault(entry.sidecar_id, {}).setdefault(entry.dag_id, {})[entry.stage_id] = (
                entry.index
            )
        for session in snapshot.sessions:
            fresh._sessions[session.client_id] = session
        if fresh._dags.keys() != fresh._dag_state.keys():
            raise SnapshotError("snapshot placements do not match the DAGs its pipelines produce")
        self.__dict__.update(fresh.__dict__)

    def canonical_dump(self, *, portable: bool = False) -> str:
        """Stable, sorted JSON of the whole state, for comparing replicas or clusters.

        `portable` keeps only what survives a backup restored into another cluster (pipelines with
        their generations, direct services, the merged DAGs), dropping log indexes, sidecars,
        assignments and sessions.
        """
        if portable:
            content: object = {
                "format_version": STATE_FORMAT_VERSION,
                "services": [
                    {"instance_id": record.instance_id, "instance": record.instance, "ttl_ms": record.ttl_ms}
                    for record in self.to_snapshot().services
                ],
                "pipelines": [
                    {
                        "name": record.name,
                        "definition": record.definition,
                        "filename": record.filename,
                        "generation": record.generation,
                        "spec": record.spec,
                    }
                    for _, record in sorted(self._pipelines.items())
                ],
                "dags": self.dags(),
            }
        else:
            content = {
                "state": self.to_snapshot(),
                "dags": self.dags(),
                "status": self.pipelines(),
            }
        return msgspec.json.format(msgspec.json.encode(content, order="sorted"), indent=2).decode()

    # --- reads ---------------------------------------------------------------------------------------

    @property
    def applied_index(self) -> int:
        return self._applied_index

    @property
    def revision(self) -> int:
        """Log index of the last entry that changed the state."""
        return self._revision

    def kind_of(self, service: str) -> StageKind | None:
        registered = self._kinds.get(service)
        return registered[0] if registered else None

    def service_names(self) -> list[str]:
        return sorted(self._kinds)

    def kind_conflicts(self, sidecar_id: str, services: Sequence[ServiceInstance]) -> list[KindConflict]:
        """The services a RegisterSidecar of `sidecar_id` with `services` would clash on because another
        registration holds the name with another kind: one entry per (name, offered kind), in entry
        order. The sidecar's own current services do not count (they are being replaced), as in apply.
        Entries that disagree with an earlier entry of the same list are not included: apply rejects
        those as invalid_argument."""
        old = self._sidecars.get(sidecar_id)
        conflicts: list[KindConflict] = []
        for clash in self._kind_clashes(services, old.services if old else ()):
            conflict = KindConflict(clash.instance.name, clash.kind, clash.instance.kind)
            if not clash.within_command and conflict not in conflicts:
                conflicts.append(conflict)
        return conflicts

    def services(self) -> list[ServiceInstance]:
        """Every registered instance: direct ones and those behind sidecars."""
        instances = [record.instance for record in self._services.values()]
        instances.extend(service for record in self._sidecars.values() for service in record.services)
        return sorted(instances, key=lambda instance: (instance.name, instance.sidecar_id, instance.endpoint))

    def sizes(self) -> dict[str, int]:
        """How many sidecars, pipelines and directly registered services it holds; O(1), so it can be
        read after every applied entry (the listings sort: 10,000 registrations made that O(n² log n))."""
        return {
            "sidecars": len(self._sidecars),
            "pipelines": len(self._pipelines),
            "direct_services": len(self._services),
        }

    def direct_services(self) -> list[ServiceRecord]:
        return [record for _, record in sorted(self._services.items())]

    def sidecars(self) -> list[SidecarRecord]:
        return [record for _, record in sorted(self._sidecars.items())]

    def sidecar(self, sidecar_id: str) -> SidecarRecord | None:
        return self._sidecars.get(sidecar_id)

    def sidecar_services(self) -> Mapping[str, frozenset[str]]:
        """sidecar id -> service names it fronts (what placement needs besides load), by id."""
        if self._services_view is None:
            self._services_view = MappingProxyType(
                {sidecar_id: record.service_names() for sidecar_id, record in sorted(self._sidecars.items())}
            )
        return self._services_view

    def dags(self) -> list[MergedDag]:
        return [self._dags[dag_id] for dag_id in sorted(self._dags)]

    def dag_spec(self, dag_id: str) -> DagSpec | None:
        dag = self._dags.get(dag_id)
        if dag is None:
            return None
        generation = self._dag_state[dag_id].generation
        cached = self._spec_cache.get(dag_id)
        if cached is not None and cached.generation == generation:
            return cached
        shed_after = {edge.dst: edge.policy.shed_after_ms for edge in dag.edges if edge.policy.mode == "shed"}
        stages = tuple(
            DagStageSpec(
                id=stage.id,
                kind=stage.kind,
                service=stage.service,
                options={name: option_text(value) for name, value in stage.options.items()},
                downstream=stage.children,
                pipelines=stage.pipelines,
                parallelism=parallelism_of(stage),
                shed_after_ms=shed_after.get(stage.id, 0),
            )
            for stage in dag.stages
        )
        spec = DagSpec(id=dag_id, stages=stages, generation=generation)
        self._spec_cache[dag_id] = spec
        return spec

    def dag_specs(self) -> list[DagSpec]:
        return [spec for dag_id in sorted(self._dags) if (spec := self.dag_spec(dag_id)) is not None]

    def assignment(self) -> dict[ReplicaKey, str]:
        """Every assigned replica and its sidecar (unassigned replicas are absent)."""
        return {
            ReplicaKey(dag_id, stage_id, replica): holder
            for dag_id, state in sorted(self._dag_state.items())
            for stage_id, holders in sorted(state.replicas.items())
            for replica, holder in enumerate(holders)
            if holder
        }

    def replicas_of(self, sidecar_id: str) -> list[ReplicaKey]:
        """The replicas one sidecar runs."""
        return self._replicas_held_by(sidecar_id)

    def fencing_token(self, dag_id: str) -> int | None:
        state = self._dag_state.get(dag_id)
        return state.token if state else None

    def placements(self, dag_id: str) -> list[StagePlacement]:
        """Where every assigned replica of one DAG runs."""
        state = self._dag_state.get(dag_id)
        if state is None:
            return []
        return [
            StagePlacement(stage_id, holder, self._sidecars[holder].data_address, replica)
            for stage_id, holders in sorted(state.replicas.items())
            for replica, holder in enumerate(holders)
            if holder
        ]

    def commands_for_sidecar(self, sidecar_id: str, applied: Mapping[str, int]) -> list[AssignmentCommand]:
        """The Assign/Revoke commands `sidecar_id` still has to run, given the highest fencing token
        it has applied per DAG (missing = none). An unknown sidecar gets nothing: tell it to register.

        For each DAG whose token is above what the sidecar applied: a Revoke of the stages it lost
        since then (if any), then an Assign with the DAG, all placements and its own replicas; or, if
        it holds nothing in the DAG any more, one Revoke of the whole DAG. A registering sidecar
        passes no tokens, gets the complete set, and stops anything else it runs.
        """
        if sidecar_id not in self._sidecars:
            return []
        held = self._held.get(sidecar_id, {})
        released = self._released.get(sidecar_id, {})
        commands: list[AssignmentCommand] = []
        for dag_id in sorted(held.keys() | released.keys()):
            have = applied.get(dag_id, 0)
            lost = tuple(sorted(stage for stage, at in released.get(dag_id, {}).items() if at > have))
            state = self._dag_state.get(dag_id)
            if dag_id in held and state is not None:
                if have >= state.token:
                    continue
                if lost:
                    commands.append(AssignmentCommand(state.token, Revoke(dag_id, lost)))
                spec = self.dag_spec(dag_id)
                assert spec is not None  # held DAGs exist: _set_holder clears holders of removed ones
                placements = tuple(self.placements(dag_id))
                local = tuple(placement for placement in placements if placement.sidecar_id == sidecar_id)
                commands.append(AssignmentCommand(state.token, Assign(spec, placements, local)))
            elif lost:
                # The DAG's token is at least the release index; a deleted DAG has only the latter.
                token = state.token if state is not None else max(released[dag_id][stage] for stage in lost)
                commands.append(AssignmentCommand(token, Revoke(dag_id)))
        return commands

    def pipeline(self, name: str) -> PipelineStatus | None:
        record = self._pipelines.get(name)
        return self._status(record) if record else None

    def pipelines(self) -> list[PipelineStatus]:
        return [self._status(record) for _, record in sorted(self._pipelines.items())]

    def _status(self, record: PipelineRecord) -> PipelineStatus:
        dag_id = self._root_of[record.name]
        dag = self._dags[dag_id]
        replicas = self._dag_state[dag_id].replicas
        stage_ids: list[str] = []
        conditions: list[str] = []
        needed = placed = 0
        for stage in dag.stages:
            if record.name not in stage.pipelines:
                continue
            stage_ids.append(stage.id)
            holders = replicas[stage.id]
            assigned = sum(1 for holder in holders if holder)
            needed += len(holders)
            placed += assigned
            if stage.service not in self._fronting:
                condition = f"no sidecar offers service `{stage.service}`"
            elif assigned < len(holders):
                condition = (
                    f"stage {stage.id} (`{stage.service}`): {assigned} of {len(holders)} replicas placed"
                )
            else:
                continue
            if condition not in conditions:
                conditions.append(condition)
        phase: PipelinePhase = "running" if placed == needed else "pending" if placed == 0 else "degraded"
        return PipelineStatus(
            name=record.name,
            definition=record.definition,
            filename=record.filename,
            generation=record.generation,
            phase=phase,
            dag_id=dag_id,
            stage_ids=tuple(stage_ids),
            conditions=tuple(conditions),
            revision=record.revision,
        )


def root_of(pipeline: Pipeline) -> str:
    """The id of the DAG a pipeline runs in: its source stage's id, as the optimizer computes it."""
    return dsl_stage_id(None, pipeline.source)


def diagnostic_of(error: DslError) -> Diagnostic:
    """A compiler error as the replicated Diagnostic (source line and a caret as its excerpt)."""
    excerpt = ""
    if error.source_line:
        excerpt = error.source_line + "\n" + " " * (error.col - 1) + "^"
    return Diagnostic(
        file=error.filename,
        line=error.line,
        column=error.col,
        message=error.message,
        hint=error.hint or "",
        excerpt=excerpt,
    )


def _pipeline_texts(document: Document) -> dict[str, str]:
    """Each pipeline's own text: from its `pipeline` keyword to the next one, without the comments
    and blank lines that lead into the next pipeline."""
    lines = document.text.split("\n")
    starts = [node.pos.line for node in document.pipelines]
    texts: dict[str, str] = {}
    for position, node in enumerate(document.pipelines):
        end = starts[position + 1] - 1 if position + 1 < len(starts) else len(lines)
        chunk = lines[node.pos.line - 1 : end]
        if chunk:
            chunk[0] = chunk[0][node.pos.col - 1 :]
        while chunk and (not chunk[-1].strip() or chunk[-1].lstrip().startswith("#")):
            chunk.pop()
        texts[node.name] = "\n".join(line.rstrip("\r") for line in chunk) + "\n"
    return texts
