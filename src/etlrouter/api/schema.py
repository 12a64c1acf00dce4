"""The executable GraphQL schema: the SDL in static/schema.graphql bound to resolvers over a RouterNode.

Resolvers read the router's replica (`node.state`, `node.raft.status()`) and turn it into plain dicts shaped
like the SDL types. Writes go through `node.propose` on the leader and through the leader's gRPC admin API on
a follower (see `forward.py`); linearizable reads likewise. Live statistics and sidecar liveness are kept by
the leader only: a follower fetches them from it (`GetLiveStats`, one fetch shared per interval) and says
where they came from (`Stats.source`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import msgspec
from ariadne import (
    EnumType,
    MutationType,
    QueryType,
    ScalarType,
    SubscriptionType,
    make_executable_schema,
)
from ariadne.utils import unwrap_graphql_error
from graphql import GraphQLError, GraphQLResolveInfo, GraphQLSchema
from grpclib.exceptions import GRPCError

from etlrouter.api.dlq import DlqInputError, SidecarAdmins
from etlrouter.api.forward import ForwardError, LeaderForwarder
from etlrouter.control import Diagnostic, PipelineChange, PipelineStatus
from etlrouter.control.model import StagePlacement, option_text, parallelism_of
from etlrouter.core.offload import OverloadedError, WorkTimeoutError
from etlrouter.dsl import DagStage, MergedDag
from etlrouter.raft.node import NodeUnavailableError, NotLeader, UnknownOutcomeError
from etlrouter.router import admin
from etlrouter.router.node import RouterNode, now_ms
from etlrouter.router.stats import EdgeStats, LiveStats, SidecarLive, StageStats
from etlrouter.router.watch import ChangeEvent, SubscriberLaggedError

READ_TIMEOUT_S = 5.0
MAX_NAME_CHARS = 253
REGISTRY_KINDS = frozenset({"service", "sidecar", "pipeline"})
_UINT64_MAX = (1 << 64) - 1


class _ErrorLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Where ariadne reports errors: the client's mistakes (syntax, validation, NOT_FOUND...) at INFO
    without a traceback, exceptions nobody anticipated at ERROR with one."""

    def error(self, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        original = unwrap_graphql_error(exc_info) if isinstance(exc_info, Exception) else exc_info
        if original is None or isinstance(original, GraphQLError):
            self.logger.info("GraphQL request failed: %s", msg)
        else:
            self.logger.error("GraphQL resolver failed: %s", msg, exc_info=original)


ERROR_LOG = _ErrorLog(logging.getLogger("etlrouter.api"), {})


def load_sdl() -> str:
    return resources.files("etlrouter.api").joinpath("static/schema.graphql").read_text(encoding="utf-8")


def api_error(code: str, message: str, **extensions: object) -> GraphQLError:
    """An error the client sees with `extensions.code` (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE, ...)."""
    return GraphQLError(message, extensions={"code": code, **extensions})


@contextlib.contextmanager
def use_case_errors() -> Iterator[None]:
    """The admin use cases' exceptions (router/admin.py) as GraphQL errors; NotLeader passes through (the
    caller forwards to the leader)."""
    try:
        yield
    except admin.InvalidRequestError as e:
        raise api_error("INVALID_ARGUMENT", str(e)) from None
    except admin.NotFoundError as e:
        raise api_error("NOT_FOUND", str(e)) from None
    except admin.CommandRejectedError as e:
        raise api_error(e.code.upper(), e.message) from None
    except OverloadedError as e:
        raise api_error("RESOURCE_EXHAUSTED", str(e), retryAfterSeconds=e.retry_after_s) from None
    except NodeUnavailableError as e:
        raise api_error("UNAVAILABLE", str(e)) from None
    except WorkTimeoutError as e:  # before TimeoutError: the router answered, it gave up on the work
        raise api_error("DEADLINE_EXCEEDED", f"the router stopped this request: {e}") from None
    except UnknownOutcomeError as e:
        # No client session here (unlike gRPC): a retry is not deduplicated, so look first.
        raise api_error("UNAVAILABLE", f"outcome unknown: {e}; check the pipelines and retry") from None
    except TimeoutError:
        raise api_error("UNAVAILABLE", admin.NO_QUORUM) from None


@dataclass
class ApiContext:
    """Per request (or per WebSocket operation): the node, the forwarder and the read barrier, which is
    taken at most once per request however many top-level fields ask for it."""

    node: RouterNode
    forwarder: LeaderForwarder
    admins: SidecarAdmins | None = None
    _barrier: asyncio.Future[None] | None = field(default=None, repr=False)

    async def read(self, consistency: str) -> None:
        if consistency != "LINEARIZABLE":
            return
        if self._barrier is None:
            self._barrier = asyncio.ensure_future(self._linearizable())
        await asyncio.shield(self._barrier)

    async def _linearizable(self) -> None:
        node = self.node
        try:
            if node.raft.is_leader():
                try:
                    await admin.linearizable_read(node)
                    return
                except NotLeader:
                    pass  # lost leadership meanwhile: go through the new leader
            revision = await self.forwarder.linearizable_revision()
            await node.raft.wait_applied(revision, timeout=READ_TIMEOUT_S)
        except ForwardError as e:
            raise api_error(e.code, f"linearizable read failed: {e}") from None
        except TimeoutError:
            raise api_error(
                "UNAVAILABLE",
                "linearizable read timed out (no quorum, or this replica is far behind);"
                " retry, or ask with consistency: STALE",
            ) from None


def _context(info: GraphQLResolveInfo[Any]) -> ApiContext:
    context = info.context
    assert isinstance(context, ApiContext)
    return context


# --- scalars and enums ----------------------------------------------------------------------------

uint64 = ScalarType("UInt64")


@uint64.serializer
def _serialize_uint64(value: Any) -> int:
    return int(value)


@uint64.value_parser
def _parse_uint64(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
        raise ValueError(f"UInt64 must be an integer in 0..2^64-1, got {value!r}")
    return value


def _enum(name: str, values: Iterable[str]) -> EnumType:
    return EnumType(name, {value.upper(): value for value in values})


ENUMS = [
    _enum("StageKind", ("source", "transform", "lookup", "sink")),
    _enum("PipelinePhase", ("pending", "running", "degraded")),
    _enum("Health", ("unknown", "serving", "degraded", "not_serving")),
    _enum("ChangeAction", ("created", "updated", "unchanged", "deleted")),
    _enum("EventType", ("put", "delete", "bookmark")),
    _enum("BranchMode", ("block", "shed")),
    _enum("ErrorClass", ("unspecified", "transient", "permanent", "rejected")),
    _enum("StatsSource", ("leader", "forwarded", "unavailable")),
]


# --- views: replicated records as dicts shaped like the SDL types -----------------------------------


def _labels(labels: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": k, "value": v} for k, v in sorted(labels.items())]


def _placement(p: StagePlacement) -> dict[str, Any]:
    return {"stageId": p.stage_id, "sidecarId": p.sidecar_id, "replica": p.replica, "address": p.data_address}


def _stage(stage: DagStage, placements: list[StagePlacement]) -> dict[str, Any]:
    return {
        "id": stage.id,
        "kind": stage.kind,
        "service": stage.service,
        "options": [{"name": k, "value": option_text(v)} for k, v in stage.options.items()],
        "parallelism": parallelism_of(stage),
        "pipelines": list(stage.pipelines),
        "parent": stage.parent,
        "children": list(stage.children),
        "placements": [_placement(p) for p in placements if p.stage_id == stage.id],
    }


def _dag(node: RouterNode, dag: MergedDag) -> dict[str, Any]:
    placements = node.state.placements(dag.root)
    spec = node.state.dag_spec(dag.root)
    return {
        "id": dag.root,
        "generation": spec.generation if spec is not None else 0,
        "pipelines": list(dag.pipelines),
        "stages": [_stage(s, placements) for s in dag.stages],
        "edges": [
            {
                "from": e.src,
                "to": e.dst,
                "pipelines": list(e.pipelines),
                "policy": {"mode": e.policy.mode, "shedAfterMs": e.policy.shed_after_ms},
            }
            for e in dag.edges
        ],
        "placements": [_placement(p) for p in placements],
    }


def _pipeline(node: RouterNode, status: PipelineStatus) -> dict[str, Any]:
    def stages(*_: Any) -> list[dict[str, Any]]:  # resolved only when selected
        for dag in node.state.dags():
            if dag.root == status.dag_id:
                placements = node.state.placements(dag.root)
                wanted = set(status.stage_ids)
                return [_stage(s, placements) for s in dag.stages if s.id in wanted]
        return []

    return {
        "name": status.name,
        "definition": status.definition,
        "filename": status.filename,
        "generation": status.generation,
        "phase": status.phase,
        "conditions": list(status.conditions),
        "dagId": status.dag_id,
        "stageIds": list(status.stage_ids),
        "stages": stages,
        "revision": status.revision,
    }


def _service(instance: Any) -> dict[str, Any]:
    return {
        "name": instance.name,
        "kind": instance.kind,
        "endpoint": instance.endpoint,
        "sidecarId": instance.sidecar_id,
        "labels": _labels(instance.labels),
    }


def _sidecar_live(live: SidecarLive | None) -> dict[str, Any]:
    """The liveness fields of a Sidecar: from the leader's snapshot; unknown without one."""
    load = live.load if live is not None else None
    return {
        "health": live.health if live is not None else "unknown",
        "load": None
        if load is None
        else {
            "recordsPerSecond": load.records_per_second,
            "bufferUtilization": load.buffer_utilization,
            "rssBytes": load.rss_bytes,
            "runningStages": load.running_stages,
        },
        "lastHeartbeatAgeMs": live.age_ms if live is not None else None,
        "silent": live.silent if live is not None else False,
    }


def _sidecars(node: RouterNode, live: LiveStats | None, *, with_gone: bool = False) -> list[dict[str, Any]]:
    """This replica's registered sidecars with the leader's liveness (`live`), then, `with_gone`, those the
    leader heard from recently that are no longer registered."""
    state = node.state
    heard = {s.sidecar_id: s for s in live.sidecars} if live is not None else {}
    out = []
    for record in state.sidecars():
        out.append(
            {
                "id": record.id,
                "address": record.data_address,
                "version": record.version,
                "labels": _labels(record.labels),
                "services": [_service(s) for s in record.services],
                **_sidecar_live(heard.get(record.id)),
                "stages": [_placement(p) for p in admin.sidecar_stages(node, record)],
                "registered": True,
            }
        )
    if with_gone:  # the dashboard shows them as gone
        registered = {r.id for r in state.sidecars()}
        for sidecar in heard.values():
            if not sidecar.registered and sidecar.sidecar_id not in registered:
                out.append(
                    {
                        "id": sidecar.sidecar_id,
                        "address": "",
                        "version": "",
                        "labels": [],
                        "services": [],
                        **_sidecar_live(sidecar),
                        "stages": [],
                        "registered": False,
                    }
                )
    return out


@dataclass(frozen=True)
class LiveView:
    """The leader's live statistics as this router can have them, and where they came from."""

    source: str  # leader | forwarded | unavailable
    message: str
    stats: LiveStats | None


def wall_ms() -> int:
    return int(time.time() * 1000)


async def live_view(ctx: ApiContext, max_age_s: float) -> LiveView:
    """Computed here on the leader; on a follower fetched from the leader (a fetch at most `max_age_s` old,
    shared by every reader on this router), or `unavailable` with the reason after a short deadline."""
    node = ctx.node
    if node.raft.is_leader():
        return LiveView("leader", "", admin.live_stats_of(node, now_ms=now_ms(), wall_ms=wall_ms()))
    fetched = await ctx.forwarder.shared_live_stats.get(max_age_s)
    if fetched.stats is None:
        leader = node.raft.status().leader_id
        return LiveView(
            "unavailable",
            f"live statistics are kept by the leader ({leader or 'none known: an election may be running'})"
            f" and this router ({node.raft.status().node_id}) could not get them: {fetched.error}",
            None,
        )
    stats = fetched.stats
    where = f"{stats.leader_id} at {fetched.served_by}" if fetched.served_by else stats.leader_id
    return LiveView("forwarded", f"forwarded from the leader {where}", stats)


def _cluster(node: RouterNode) -> dict[str, Any]:
    view = admin.cluster_status(node)
    status = view.status
    return {
        "nodeId": status.node_id,
        "leaderId": status.leader_id,
        "leaderAddress": status.leader_address,
        "isLeader": view.is_leader,
        "role": status.role,
        "term": status.term,
        "commitIndex": status.commit_index,
        "appliedIndex": status.applied_index,
        "snapshotIndex": status.snapshot_index,
        "members": [
            {
                "id": m.member.id,
                "address": m.member.address,
                "voter": m.member.voter,
                "leader": m.leader,
                "matchIndex": m.member.match_index,
                "lag": m.lag,
                "reachable": m.member.reachable,
            }
            for m in view.members
        ],
    }


# --- queries ---------------------------------------------------------------------------------------

query = QueryType()


@query.field("cluster")
def _resolve_cluster(_: Any, info: GraphQLResolveInfo[Any]) -> dict[str, Any]:
    return _cluster(_context(info).node)


@query.field("pipelines")
async def _resolve_pipelines(_: Any, info: GraphQLResolveInfo[Any], consistency: str) -> list[dict[str, Any]]:
    ctx = _context(info)
    await ctx.read(consistency)
    return [_pipeline(ctx.node, p) for p in ctx.node.state.pipelines()]


@query.field("pipeline")
async def _resolve_pipeline(
    _: Any, info: GraphQLResolveInfo[Any], name: str, consistency: str
) -> dict[str, Any] | None:
    ctx = _context(info)
    await ctx.read(consistency)
    status = ctx.node.state.pipeline(name)
    return None if status is None else _pipeline(ctx.node, status)


@query.field("dags")
async def _resolve_dags(_: Any, info: GraphQLResolveInfo[Any], consistency: str) -> list[dict[str, Any]]:
    ctx = _context(info)
    await ctx.read(consistency)
    return [_dag(ctx.node, d) for d in ctx.node.state.dags()]


@query.field("services")
async def _resolve_services(_: Any, info: GraphQLResolveInfo[Any], consistency: str) -> list[dict[str, Any]]:
    ctx = _context(info)
    await ctx.read(consistency)
    return [_service(s) for s in ctx.node.state.services()]


@query.field("sidecars")
async def _resolve_sidecars(_: Any, info: GraphQLResolveInfo[Any], consistency: str) -> list[dict[str, Any]]:
    ctx = _context(info)
    await ctx.read(consistency)
    live = await live_view(ctx, QUERY_MAX_AGE_S)
    return _sidecars(ctx.node, live.stats)


def _stage_stats(s: StageStats) -> dict[str, Any]:
    return {
        "dagId": s.dag_id,
        "stageId": s.stage_id,
        "replicas": s.replicas,
        "sidecars": s.sidecars,
        "recordsIn": s.records_in,
        "recordsOut": s.records_out,
        "bytesIn": s.bytes_in,
        "bytesOut": s.bytes_out,
        "recordsInPerSecond": s.records_in_per_s,
        "recordsOutPerSecond": s.records_out_per_s,
        "bytesInPerSecond": s.bytes_in_per_s,
        "bytesOutPerSecond": s.bytes_out_per_s,
        "errors": s.errors,
        "deadLettered": s.dead_lettered,
        "watermarkMs": float(s.watermark_ms) if s.watermark_ms else None,
        "watermarkLagMs": float(s.watermark_lag_ms) if s.watermark_lag_ms is not None else None,
        "ackedRecords": s.acked_records,
        "ackedOffsets": [{"partition": p, "offset": o} for p, o in sorted(s.acked_offsets.items())],
        "lastError": s.last_error,
    }


def _edge_stats(e: EdgeStats) -> dict[str, Any]:
    return {
        "dagId": e.dag_id,
        "from": e.from_stage,
        "to": e.to_stage,
        "recordsSent": e.records_sent,
        "recordsPerSecond": e.records_per_s,
        "creditsAvailable": e.credits_available,
        "starvedSecondsTotal": e.starved_s,
        "starvedRatio": e.starved_ratio,
        "inFlightBatches": e.in_flight,
        "oldestInFlightSeconds": e.oldest_in_flight_s,
        "backpressure": e.backpressure,
        "backpressureOrigin": e.origin,
    }


def _stats(node: RouterNode, live: LiveView) -> dict[str, Any]:
    stats = live.stats
    return {
        "atMs": float(stats.at_ms if stats is not None else wall_ms()),
        "fromLeader": stats is not None,
        "source": live.source,
        "message": live.message,
        "cluster": _cluster(node),
        "stages": [_stage_stats(s) for s in stats.stages] if stats is not None else [],
        "edges": [_edge_stats(e) for e in stats.edges] if stats is not None else [],
        "sidecars": _sidecars(node, stats, with_gone=True),
    }


# How old a follower's fetched snapshot may be for a query (a subscription allows its own interval).
QUERY_MAX_AGE_S = 0.5


@query.field("stats")
async def _resolve_stats(_: Any, info: GraphQLResolveInfo[Any]) -> dict[str, Any]:
    ctx = _context(info)
    return _stats(ctx.node, await live_view(ctx, QUERY_MAX_AGE_S))


def _admins(ctx: ApiContext) -> SidecarAdmins:
    if ctx.admins is None:
        ctx.admins = SidecarAdmins(ctx.node.config.transport, ctx.node.security)
    return ctx.admins


def _sidecar_addresses(node: RouterNode, only: str = "") -> list[tuple[str, str]]:
    found = [(r.id, r.data_address) for r in node.state.sidecars() if not only or r.id == only]
    if only and not found:
        raise api_error("NOT_FOUND", f"sidecar {only!r} is not registered")
    return found


def _unknown_filters(node: RouterNode, pipeline: str, stage: str) -> list[str]:
    """What in a DLQ filter names nothing the registry knows, in words; empty when everything is known."""
    problems = []
    names = sorted(p.name for p in node.state.pipelines())
    if pipeline and pipeline not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        problems.append(f"pipeline {pipeline!r} does not exist (pipelines: {shown or 'none'})")
    if stage and stage not in {s.id for dag in node.state.dags() for s in dag.stages}:
        problems.append(f"stage {stage!r} is not a stage of any merged DAG (see `dags` for the stage ids)")
    return problems


@query.field("deadLetters")
async def _resolve_dead_letters(
    _: Any,
    info: GraphQLResolveInfo[Any],
    pipeline: str,
    stage: str,
    limit: int,
    errorClass: str | None = None,
) -> dict[str, Any]:
    ctx = _context(info)
    _check_optional_name(pipeline, "pipeline")
    _check_optional_name(stage, "stage")
    try:
        page = await _admins(ctx).list(_sidecar_addresses(ctx.node), pipeline, stage, errorClass, limit)
    except DlqInputError as e:
        raise api_error("INVALID_ARGUMENT", str(e)) from None
    # Letters outlive their pipeline (a deleted one's stay listable): an unknown name is an error only when
    # nothing matches it, which is what a typo looks like.
    problems = _unknown_filters(ctx.node, pipeline, stage)
    if problems and not page["total"]:
        mute = f"; {len(page['unreachable'])} sidecars did not answer" if page["unreachable"] else ""
        raise api_error("NOT_FOUND", f"{'; '.join(problems)}, and no sidecar holds dead letters for it{mute}")
    return page


@query.field("deadLetter")
async def _resolve_dead_letter(
    _: Any, info: GraphQLResolveInfo[Any], sidecar: str, id: str
) -> dict[str, Any] | None:
    ctx = _context(info)
    _check_name(sidecar, "sidecar")
    _check_name(id, "id")
    [(sidecar_id, address)] = _sidecar_addresses(ctx.node, sidecar)
    try:
        return await _admins(ctx).get(sidecar_id, address, id)
    except (OSError, TimeoutError) as e:
        raise api_error("UNAVAILABLE", f"sidecar {sidecar_id} at {address} did not answer: {e!r}") from None
    except GRPCError as e:
        raise api_error(e.status.name, f"sidecar {sidecar_id}: {e.message}") from None


# --- mutations -------------------------------------------------------------------------------------

mutation = MutationType()


def _check_name(name: str, what: str) -> str:
    if not name or len(name) > MAX_NAME_CHARS:
        raise api_error("INVALID_ARGUMENT", f"{what} must be 1..{MAX_NAME_CHARS} characters, got {len(name)}")
    return name


def _check_optional_name(name: str, what: str) -> str:
    return _check_name(name, what) if name else name


@mutation.field("redriveDeadLetters")
async def _resolve_redrive(
    _: Any,
    info: GraphQLResolveInfo[Any],
    sidecar: str,
    ids: list[str],
    pipeline: str,
    stage: str,
    targetStage: str,
) -> dict[str, Any]:
    ctx = _context(info)
    for i, letter_id in enumerate(ids):
        _check_name(letter_id, f"ids[{i}]")
    for value, what in ((sidecar, "sidecar"), (pipeline, "pipeline"), (stage, "stage")):
        _check_optional_name(value, what)
    _check_optional_name(targetStage, "targetStage")
    if ids and not sidecar:
        raise api_error("INVALID_ARGUMENT", "ids are per sidecar: give `sidecar` with `ids`")
    if not ids and not (pipeline or stage):
        raise api_error("INVALID_ARGUMENT", "give `sidecar` and `ids`, or `pipeline` and/or `stage`")
    # Letters go back into a running stage: what the filter or the target names must exist now.
    problems = _unknown_filters(ctx.node, pipeline, "" if targetStage else stage)
    problems += [f"targetStage: {p}" for p in _unknown_filters(ctx.node, "", targetStage)]
    if problems:
        raise api_error("NOT_FOUND", f"nothing to redrive into: {'; '.join(problems)}")
    try:
        return await _admins(ctx).redrive(
            _sidecar_addresses(ctx.node, sidecar), ids, pipeline, stage, targetStage
        )
    except DlqInputError as e:
        raise api_error("INVALID_ARGUMENT", str(e)) from None


def _change(change: PipelineChange) -> dict[str, Any]:
    return {"name": change.name, "action": change.action, "generation": change.generation}


def _diagnostic(d: Diagnostic) -> dict[str, Any]:
    return msgspec.structs.asdict(d)  # the SDL's Diagnostic has the model's field names


@mutation.field("applyPipelines")
async def _resolve_apply(
    _: Any, info: GraphQLResolveInfo[Any], definition: str, filename: str, dryRun: bool, prune: bool
) -> dict[str, Any]:
    ctx = _context(info)
    with use_case_errors():
        admin.check_definition(definition)  # the size is refused first, the filename second
    filename = _check_name(filename or admin.DEFAULT_FILENAME, "filename")
    try:
        with use_case_errors():
            outcome = await admin.apply_pipelines(ctx.node, definition, filename, prune=prune, dry_run=dryRun)
        own = ctx.node.raft.status()
        served = own.leader_address if own.leader_id == own.node_id else ""
    except NotLeader:
        try:
            outcome, served = await ctx.forwarder.apply_pipelines(
                definition, filename, dry_run=dryRun, prune=prune
            )
        except ForwardError as e:
            raise api_error(e.code, f"forwarded to the leader: {e}") from None
    return {
        "applied": not outcome.diagnostics and not dryRun,
        "changes": [_change(c) for c in outcome.changes],
        "diagnostics": [_diagnostic(d) for d in outcome.diagnostics],
        "revision": outcome.revision,
        "servedBy": served,
    }


@mutation.field("deletePipeline")
async def _resolve_delete(
    _: Any, info: GraphQLResolveInfo[Any], name: str, expectedGeneration: int
) -> dict[str, Any]:
    ctx = _context(info)
    name = _check_name(name, "name")
    try:
        with use_case_errors():
            revision = await admin.delete_pipeline(ctx.node, name, expectedGeneration)
        served = ctx.node.raft.status().leader_address
    except NotLeader:
        try:
            revision, served = await ctx.forwarder.delete_pipeline(name, expectedGeneration)
        except ForwardError as e:
            raise api_error(e.code, f"forwarded to the leader: {e}") from None
    return {"name": name, "revision": revision, "servedBy": served}


# --- subscriptions ---------------------------------------------------------------------------------

subscription = SubscriptionType()


def _kinds(kinds: list[str] | None) -> frozenset[str]:
    wanted = frozenset(k.rstrip("s") if k.endswith("s") else k for k in kinds or ())
    unknown = wanted - REGISTRY_KINDS
    if unknown:
        raise api_error(
            "INVALID_ARGUMENT",
            f"unknown registry kinds {sorted(unknown)}; use {sorted(REGISTRY_KINDS)} (or their plurals)",
        )
    return wanted


@subscription.source("registryChanged")
def _registry_source(
    _: Any, info: GraphQLResolveInfo[Any], kinds: list[str] | None = None
) -> AsyncGenerator[ChangeEvent, None]:
    wanted = _kinds(kinds)  # validated before the stream starts: a bad kind fails the subscribe

    async def events() -> AsyncGenerator[ChangeEvent, None]:
        try:
            async for event in _context(info).node.watch.subscribe(wanted):
                yield event
        except SubscriberLaggedError as e:
            raise api_error("RESOURCE_EXHAUSTED", str(e)) from None

    return events()


@subscription.field("registryChanged")
def _registry_event(event: ChangeEvent, _: GraphQLResolveInfo[Any], **__: Any) -> dict[str, Any]:
    return {
        "type": event.type,
        "revision": event.revision,
        "kind": event.kind,
        "name": event.name,
        "json": event.json,
    }


@subscription.source("pipelinesChanged")
async def _pipelines_source(
    _: Any, info: GraphQLResolveInfo[Any]
) -> AsyncGenerator[list[PipelineStatus], None]:
    node = _context(info).node
    dirty = True  # the initial listing is sent at the first bookmark
    try:
        async for event in node.watch.subscribe(frozenset({"pipeline"})):
            if event.type != "bookmark":
                dirty = True
            elif dirty:
                dirty = False
                yield node.state.pipelines()
    except SubscriberLaggedError as e:
        raise api_error("RESOURCE_EXHAUSTED", str(e)) from None


@subscription.field("pipelinesChanged")
def _pipelines_event(pipelines: list[PipelineStatus], info: GraphQLResolveInfo[Any]) -> list[dict[str, Any]]:
    node = _context(info).node
    return [_pipeline(node, p) for p in pipelines]


MIN_STATS_INTERVAL_MS, MAX_STATS_INTERVAL_MS = 250, 60_000


@subscription.source("stats")
def _stats_source(
    _: Any, info: GraphQLResolveInfo[Any], intervalMs: int = 1000
) -> AsyncGenerator[dict[str, Any], None]:
    if not MIN_STATS_INTERVAL_MS <= intervalMs <= MAX_STATS_INTERVAL_MS:
        raise api_error(
            "INVALID_ARGUMENT",
            f"intervalMs must be {MIN_STATS_INTERVAL_MS}..{MAX_STATS_INTERVAL_MS}, got {intervalMs}",
        )
    ctx = _context(info)

    async def snapshots() -> AsyncGenerator[dict[str, Any], None]:
        while True:
            # Taken when the previous one has been sent, so never older than the interval; on a follower
            # every subscriber with this interval shares one fetch from the leader per interval.
            yield _stats(ctx.node, await live_view(ctx, intervalMs / 1000))
            await asyncio.sleep(intervalMs / 1000)

    return snapshots()


@subscription.field("stats")
def _stats_event(snapshot: dict[str, Any], _: GraphQLResolveInfo[Any], **__: Any) -> dict[str, Any]:
    return snapshot


def build_schema() -> GraphQLSchema:
    return make_executable_schema(load_sdl(), query, mutation, subscription, uint64, *ENUMS)
