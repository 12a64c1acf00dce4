"""The router's admin use cases, one place each, for both APIs: gRPC (router/services.py) and GraphQL
(api/schema.py).

A use case takes plain values and returns model values (control.model, router.stats); each API only
translates its wire format into the arguments and the results (or exceptions) back into its own.

What a use case raises:
- `InvalidRequestError`: a bad argument; the message names it.
- `CommandRejectedError`: the state machine refused the command (`code` as the state names it).
- `NotFoundError`: what was asked for does not exist.
- raft's `NotLeader` (this router cannot serve it: gRPC answers with the leader trailer, GraphQL forwards),
  `UnknownOutcomeError` (leadership lost mid-write) and `TimeoutError` (no quorum; `NO_QUORUM` says so).

Every CPU-heavy piece of DSL work the admin APIs start (apply's and preview's compile check, validate,
explain) goes through `_dsl_work`, which runs it in the node's worker processes (core/offload.py) against a
snapshot of the registry: the event loop that sends Raft heartbeats only waits. A document that is invalid
whatever services are registered (`dsl.precheck`) is answered from there, before anything is proposed; the
rest goes to the state machine, which checks the services in log order (a registration proposed just before
an apply counts, as it always did) and compiles on every node. Beyond the pool's capacity a
request gets core.offload's `OverloadedError` at once (RESOURCE_EXHAUSTED with a retry hint); a job past its
deadline is stopped and reported as `WorkTimeoutError` (the leader gave up, not "unreachable").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from etlrouter.control import (
    ApplyPipelines,
    ApplyResult,
    ClientSession,
    DagSpec,
    DeletePipeline,
    Diagnostic,
    PipelineChange,
    PipelineStatus,
    StagePlacement,
)
from etlrouter.control.commands import ApplyMode
from etlrouter.control.state import SidecarRecord, diagnostic_of
from etlrouter.dsl import (
    DslError,
    DslErrors,
    ExplainFormat,
    MergedDag,
    StaticRegistry,
    explain_dot,
    explain_mermaid,
    explain_tree,
    precheck,
)
from etlrouter.dsl import explain as explain_text
from etlrouter.dsl import validate as validate_text
from etlrouter.raft.node import MemberStatus, NodeStatus
from etlrouter.router.node import RouterNode
from etlrouter.router.stats import LiveStats, live_stats

MAX_DEFINITION_BYTES = 1 << 20
MAX_NAME = 253  # a Kubernetes DNS subdomain: service and sidecar names come from there
DEFAULT_FILENAME = "<input>"
NO_QUORUM = "the cluster did not answer in time (no quorum?)"

_P = ParamSpec("_P")
_T = TypeVar("_T")


class InvalidRequestError(ValueError):
    """A request field is missing or malformed; the message names the field path."""


class NotFoundError(LookupError):
    """What the request names does not exist; the message says what."""


class CommandRejectedError(Exception):
    """The state machine refused a command; `code` is its error code (invalid_argument, not_found, ...)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ApplyOutcome:
    """What applying (or previewing) a pipeline document did. With `diagnostics` nothing changed."""

    changes: tuple[PipelineChange, ...]
    diagnostics: tuple[Diagnostic, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Explained:
    """A document's explanation, or the diagnostics that stopped it; without a document, the merged DAGs."""

    rendered: str
    diagnostics: tuple[DslError, ...] = ()
    dags: tuple[DagSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class MemberView:
    member: MemberStatus
    leader: bool
    lag: int


@dataclass(frozen=True, slots=True)
class ClusterView:
    status: NodeStatus
    is_leader: bool
    members: tuple[MemberView, ...]


def check_definition(definition: str, field: str = "definition") -> None:
    size = len(definition.encode())
    if size > MAX_DEFINITION_BYTES:
        raise InvalidRequestError(f"{field} is {size} bytes; the limit is {MAX_DEFINITION_BYTES}")


def require_name(value: str, field: str) -> str:
    if not value:
        raise InvalidRequestError(f"{field} must not be empty")
    if len(value) > MAX_NAME:
        raise InvalidRequestError(f"{field} is {len(value)} characters long; the limit is {MAX_NAME}")
    return value


def checked(result: ApplyResult) -> ApplyResult:
    """The result, or CommandRejectedError when the state machine refused the command."""
    if result.error is not None:
        raise CommandRejectedError(result.error.code, result.error.message)
    return result


async def _dsl_work(node: RouterNode, work: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """The one choke point for CPU-heavy DSL work (parse, check, optimize, render) of an admin request: in
    the node's worker processes. `work` must be a top-level function, its arguments picklable."""
    return await node.work_pool.run(work, *args, **kwargs)


def registry_snapshot(node: RouterNode) -> StaticRegistry:
    """The services the checker resolves names against, as a value that can cross to a worker process."""
    kinds = {name: node.state.kind_of(name) for name in node.state.service_names()}
    return StaticRegistry({name: kind for name, kind in kinds.items() if kind is not None})


def _render_dags(dags: Sequence[MergedDag], fmt: ExplainFormat) -> str:
    render = {"tree": explain_tree, "dot": explain_dot, "mermaid": explain_mermaid}[fmt]
    return render(dags)


async def linearizable_read(node: RouterNode) -> None:
    """A read barrier on the leader; NotLeader on a follower (each API decides where to go then)."""
    node.require_leader()
    await node.linearizable()


async def apply_pipelines(
    node: RouterNode,
    definition: str,
    filename: str,
    *,
    prune: bool = False,
    mode: ApplyMode = "apply",
    expected_generation: int = 0,
    dry_run: bool = False,
    session: ClientSession | None = None,
) -> ApplyOutcome:
    """Apply a DSL document (or, `dry_run`, say what applying it would do, on a linearizable view).

    A document that does not compile comes back with its diagnostics (nothing changed); any other refusal
    raises CommandRejectedError."""
    check_definition(definition)
    filename = filename or DEFAULT_FILENAME
    command = ApplyPipelines(
        definition=definition,
        filename=filename,
        prune=prune,
        mode=mode,
        expected_generation=expected_generation,
    )
    if dry_run:
        await linearizable_read(node)
    else:
        node.require_leader()  # a follower redirects before doing any work
    errors = await _dsl_work(node, precheck, definition, filename, registry_snapshot(node))
    if errors:  # invalid whatever is registered: answered without a log entry or the loop's time
        return ApplyOutcome((), tuple(diagnostic_of(e) for e in errors), node.state.revision)
    if dry_run:
        result = node.state.preview(command)  # compiles again: a document that just compiled, bounded
    else:
        result = await node.propose(command, session)
    diagnostics = result.error.diagnostics if result.error is not None else ()
    if not diagnostics:
        checked(result)
    return ApplyOutcome(changes=result.changes, diagnostics=diagnostics, revision=result.revision)


async def delete_pipeline(
    node: RouterNode, name: str, expected_generation: int = 0, session: ClientSession | None = None
) -> int:
    """Delete a pipeline; returns the state's revision after it."""
    command = DeletePipeline(name=name, expected_generation=expected_generation)
    return checked(await node.propose(command, session)).revision


def pipeline(node: RouterNode, name: str) -> PipelineStatus:
    status = node.state.pipeline(name)
    if status is None:
        raise NotFoundError(f"pipeline `{name}` does not exist")
    return status


async def validate_pipelines(node: RouterNode, definition: str, filename: str) -> list[DslError]:
    """The problems of a document against the current registry; empty when it is valid."""
    check_definition(definition)
    return await _dsl_work(
        node, validate_text, definition, filename or DEFAULT_FILENAME, registry_snapshot(node)
    )


async def explain_pipelines(
    node: RouterNode, definition: str, filename: str, fmt: ExplainFormat
) -> Explained:
    """A document merged with the running pipelines, rendered; without a document, the running DAGs."""
    if not definition:
        rendered = await _dsl_work(node, _render_dags, list(node.state.dags()), fmt)
        return Explained(rendered, dags=tuple(node.state.dag_specs()))
    check_definition(definition)
    try:
        return Explained(
            await _dsl_work(
                node, explain_text, definition, filename or DEFAULT_FILENAME, fmt, registry_snapshot(node)
            )
        )
    except DslErrors as e:
        return Explained("", diagnostics=tuple(e.errors))


def cluster_status(node: RouterNode) -> ClusterView:
    """This router's Raft view; a member's lag is how far its log is behind the commit index."""
    status = node.raft.status()
    return ClusterView(
        status,
        node.raft.is_leader(),
        tuple(
            MemberView(m, m.id == status.leader_id, max(0, status.commit_index - m.match_index))
            for m in status.members
        ),
    )


def sidecar_stages(node: RouterNode, record: SidecarRecord) -> list[StagePlacement]:
    """The stage replicas a registered sidecar runs, as placements."""
    return [
        StagePlacement(stage_id, record.id, record.data_address, replica)
        for _, stage_id, replica in node.state.replicas_of(record.id)
    ]


def live_stats_of(node: RouterNode, *, now_ms: int, wall_ms: int) -> LiveStats:
    """`live_stats` of a router node that is the leader (a follower's store and liveness are empty)."""
    status = node.raft.status()
    return live_stats(
        node.live_stats,
        node.sidecar_liveness,
        [record.id for record in node.state.sidecars()],
        now_ms=now_ms,
        wall_ms=wall_ms,
        leader_id=status.node_id,
        stale_after_ms=node.config.router.sidecar_heartbeat_timeout_ms,
        default_interval_ms=node.config.sidecar.heartbeat_interval_ms,
    )
