"""EtlPipeline controller: the DSL of the resource, kept applied at its router cluster.

Level-triggered. Each reconcile reads the EtlPipeline, checks its DSL locally (no router needed to find
syntax errors), applies the whole document at the router with `prune` under a filename unique to the
resource, and writes conditions from the router's answer. A resource owns exactly the pipeline names in
its `status.pipelines`: it claims new names there *before* applying (so a lost status write cannot make it
forget what it created) and refuses a name some other resource or `etlrouter ctl` already uses. Running
pipelines are checked again every `recheck_s`: one deleted or changed at the router is put back.

Unknown services: the router rejects a document naming a service nobody registered (the checker runs
against the live registry). Services usually register after their pipelines are declared, so that answer
is not a user error: the resource is Progressing ("waiting for service `x`"), not Degraded, and is retried.

The condition rules are the pure `verdict_*` functions; `PipelineReconciler` does the I/O around them.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter import dsl
from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import ClusterUnreachableError, RouterClient
from etlrouter.core.config import split_address
from etlrouter.operator import kube, tls_secrets
from etlrouter.operator.condition import set_condition
from etlrouter.operator.controller import ObjectKey, OperatorContext, Result
from etlrouter.security.context import Security

log = logging.getLogger(__name__)

PLURAL = "etlpipelines"
FINALIZER = "etlrouter.io/pipeline"
RECHECK_S = 30.0  # running pipelines: drift check at the router
WAIT_S = 5.0  # waiting for services, placement, a cluster endpoint, an unreachable router
MAX_DSL_BYTES = 256 * 1024  # the CRD's maxLength; checked again here (a CRD may be installed without it)

EventType = Literal["Normal", "Warning"]
CondStatus = Literal["True", "False", "Unknown"]
_UNKNOWN_SERVICE = re.compile(r"^unknown (source|transform|sink|lookup) `([^`]+)`$")
_PHASES = {
    admin_pb2.PIPELINE_PHASE_PENDING: "Pending",
    admin_pb2.PIPELINE_PHASE_RUNNING: "Running",
    admin_pb2.PIPELINE_PHASE_DEGRADED: "Degraded",
}


# --- where the router is ---------------------------------------------------------------------------------


class TargetError(Exception):
    """The resource's router cannot be used now; `reason` is a condition reason, `retry` says whether
    waiting can help (a cluster that has no endpoint yet) or the spec must change."""

    def __init__(self, reason: str, message: str, *, retry: bool) -> None:
        super().__init__(message)
        self.reason, self.message, self.retry = reason, message, retry


def target_of(spec: dict[str, Any]) -> tuple[str, str]:
    """("router", "host:port") or ("cluster", name) from a spec; TargetError names the field."""
    router, cluster = spec.get("router"), spec.get("cluster")
    if router and cluster:
        raise TargetError("InvalidSpec", "spec.router and spec.cluster are exclusive: give one", retry=False)
    if router:
        if not isinstance(router, str):
            raise TargetError("InvalidSpec", "spec.router: must be a string HOST:PORT", retry=False)
        for address in router.split(","):
            try:
                split_address(address.strip())
            except ValueError as e:
                raise TargetError("InvalidSpec", f"spec.router: {e}", retry=False) from None
        return "router", router
    if cluster:
        if not isinstance(cluster, str):
            raise TargetError("InvalidSpec", "spec.cluster: must be an EtlRouterCluster name", retry=False)
        return "cluster", cluster
    raise TargetError("InvalidSpec", "spec.cluster or spec.router is required", retry=False)


def endpoint_of(cluster_obj: dict[str, Any] | None, namespace: str, name: str) -> str:
    """The client address an EtlRouterCluster reports, or TargetError saying what to wait for."""
    if cluster_obj is None:
        raise TargetError(
            "ClusterNotFound",
            f"spec.cluster: EtlRouterCluster {name} not found in namespace {namespace}",
            retry=True,
        )
    endpoint = str((cluster_obj.get("status") or {}).get("endpoint") or "")
    if not endpoint:
        raise TargetError(
            "ClusterNotReady", f"waiting for EtlRouterCluster {name} to report status.endpoint", retry=True
        )
    return endpoint


async def resolve_router(
    ctx: OperatorContext, namespace: str, spec: dict[str, Any]
) -> tuple[str, Security | None]:
    """The router address of a pipeline or workload spec (shared by both controllers), and the operator's
    credentials when it is an EtlRouterCluster running mutual TLS (a `spec.router` is called as before)."""
    how, value = target_of(spec)
    if how == "router":
        return value, None
    cluster = await kube.get_object(ctx.api, "etlrouterclusters", namespace, value)
    address = endpoint_of(cluster, namespace, value)
    assert cluster is not None
    if not cluster_tls_enabled(cluster):
        return address, None
    cluster.setdefault("apiVersion", kube.API_VERSION)
    cluster.setdefault("kind", "EtlRouterCluster")
    ca = await tls_secrets.load_ca(
        ctx.api, cluster, ((cluster.get("spec") or {}).get("tls") or {}).get("secretName")
    )
    if ca is None:
        raise TargetError("ClusterNotReady", f"waiting for EtlRouterCluster {value}'s CA", retry=True)
    return address, ctx.credentials.security(cluster, ca, dt.datetime.now(dt.UTC))


def cluster_tls_enabled(cluster: dict[str, Any]) -> bool:
    """As cluster.parse_spec reads it: on unless `spec.tls.enabled` is false."""
    return bool(((cluster.get("spec") or {}).get("tls") or {}).get("enabled", True))


# --- the pure rules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Conditions and the rest of the status a reconcile ends with, and what to tell the user."""

    ready: tuple[CondStatus, str, str]
    progressing: tuple[CondStatus, str, str]
    degraded: tuple[CondStatus, str, str]
    requeue: Literal["recheck", "wait"] | None  # when to look again
    event: tuple[EventType, str, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # other status fields (assignments, ...)

    @property
    def message(self) -> str:
        for status, _, message in (self.degraded, self.progressing, self.ready):
            if status == "True" and message:
                return message
        return self.ready[2]


def verdict_failed(reason: str, message: str, *, retry: bool) -> Verdict:
    """The spec (or the world) is wrong: Degraded, not Ready; retried only when waiting can help."""
    return Verdict(
        ready=("False", reason, message),
        progressing=("False", reason, message),
        degraded=("True", reason, message),
        requeue="wait" if retry else None,
        event=("Warning", reason, message),
    )


def verdict_waiting(reason: str, message: str) -> Verdict:
    return Verdict(
        ready=("False", reason, message),
        progressing=("True", reason, message),
        degraded=("False", reason, message),
        requeue="wait",
        event=("Normal", reason, message),
    )


def verdict_invalid_dsl(errors: Sequence[dsl.DslError]) -> Verdict:
    first = errors[0]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    message = f"{first.location}: {first.message}{more}"
    return verdict_failed("InvalidDSL", message, retry=False)


def verdict_router_diagnostics(diagnostics: Sequence[admin_pb2.Diagnostic]) -> Verdict:
    """The router refused the document (nothing applied). Unknown services are waited for."""
    located = [f"{d.file}:{d.line}:{d.column}: {d.message}" for d in diagnostics]
    unknown = [m.group(2) for d in diagnostics if (m := _UNKNOWN_SERVICE.match(d.message))]
    if unknown and len(unknown) == len(diagnostics):
        names = ", ".join(f"`{n}`" for n in dict.fromkeys(unknown))
        return verdict_waiting(
            "WaitingForServices", f"waiting for service {names} to register ({located[0]})"
        )
    more = f" (and {len(located) - 1} more)" if len(located) > 1 else ""
    return verdict_failed("RejectedByRouter", located[0] + more, retry=True)


@dataclass(frozen=True)
class RouterPipeline:
    name: str
    phase: str  # Pending | Running | Degraded
    conditions: tuple[str, ...]
    stage_ids: tuple[str, ...]


def assignments_summary(
    pipelines: Iterable[RouterPipeline], placements: Iterable[tuple[str, str]]
) -> dict[str, int]:
    """{stages, placed, sidecars} over the resource's pipelines; placements are (stage id, sidecar id)."""
    stages = {s for p in pipelines for s in p.stage_ids}
    holders: dict[str, set[str]] = {}
    for stage_id, sidecar_id in placements:
        if stage_id in stages:
            holders.setdefault(stage_id, set()).add(sidecar_id)
    return {
        "stages": len(stages),
        "placed": len(holders),
        "sidecars": len({s for h in holders.values() for s in h}),
    }


def verdict_applied(
    names: Sequence[str], at_router: dict[str, RouterPipeline], assignments: dict[str, int]
) -> Verdict:
    """Conditions from what the router says about the resource's pipelines after an apply."""
    missing = [n for n in names if n not in at_router]
    if missing:  # deleted between our apply and our read: the next run re-applies
        return verdict_waiting("Applying", f"pipeline {', '.join(missing)} not visible at the router yet")
    extra = {"assignments": assignments}
    problems = [
        f"{n}: {'; '.join(at_router[n].conditions) or at_router[n].phase.lower()}"
        for n in names
        if at_router[n].phase != "Running"
    ]
    if not problems:
        message = f"{len(names)} pipeline{'s' if len(names) != 1 else ''} running"
        return Verdict(
            ready=("True", "Running", message),
            progressing=("False", "Running", message),
            degraded=("False", "Running", message),
            requeue="recheck",
            extra=extra,
        )
    message = "; ".join(problems)
    if any(at_router[n].phase == "Degraded" for n in names):
        return Verdict(
            ready=("False", "PartiallyPlaced", message),
            progressing=("True", "PartiallyPlaced", message),
            degraded=("True", "PartiallyPlaced", message),
            requeue="wait",
            extra=extra,
        )
    return Verdict(
        ready=("False", "Pending", message),
        progressing=("True", "Pending", message),
        degraded=("False", "Pending", message),
        requeue="wait",
        extra=extra,
    )


def apply_event(
    created: Sequence[str],
    updated: Sequence[str],
    dropped: Sequence[str],
    owned: Sequence[str],
    status: dict[str, Any],
    generation: int,
    router: str,
) -> tuple[EventType, str, str] | None:
    """The event an apply that changed something at the router deserves, or None if it changed nothing.

    Drift is a change to text the router already accepted for this generation (`appliedGeneration`).
    observedGeneration alone is not proof: a pass that waited for services records it too, and the
    first apply after such a wait is a creation, not a repair.
    """
    applied_before = status.get("appliedGeneration") == generation
    repaired = [n for n in (*created, *updated) if n in owned and applied_before]
    if repaired:
        message = f"pipeline {', '.join(repaired)} changed at the router: re-applied"
        return ("Warning", "DriftRepaired", message)
    parts = [
        f"{label} {', '.join(ns)}"
        for label, ns in (("created", created), ("updated", updated), ("deleted", dropped))
        if ns
    ]
    return ("Normal", "Applied", "; ".join(parts) + f" at {router}") if parts else None


def status_update(
    current: dict[str, Any], verdict: Verdict, generation: int, now: dt.datetime, **fields: Any
) -> dict[str, Any]:
    """The whole new status (conditions merged with the current ones)."""
    conditions = list(current.get("conditions") or [])
    for type_, (status, reason, message) in (
        ("Ready", verdict.ready),
        ("Progressing", verdict.progressing),
        ("Degraded", verdict.degraded),
    ):
        conditions = set_condition(conditions, type_, status, reason, message, generation, now)
    status_ = {**current, **verdict.extra, **fields}
    status_.update(conditions=conditions, observedGeneration=generation, message=verdict.message)
    return status_


def dsl_filename(namespace: str, name: str) -> str:
    """The filename the router keeps the resource's pipelines under (`prune` scope, diagnostics)."""
    return f"{namespace}/{name}.etl"


def pipeline_names(text: str, filename: str) -> list[str]:
    return [p.name for p in dsl.compile(text, filename)]


# --- the controller --------------------------------------------------------------------------------------


class PipelineReconciler:
    plural = PLURAL

    def __init__(self, ctx: OperatorContext, *, recheck_s: float = RECHECK_S, wait_s: float = WAIT_S) -> None:
        self.ctx = ctx
        self.recheck_s = recheck_s
        self.wait_s = wait_s

    async def reconcile(self, key: ObjectKey) -> Result:
        namespace, name = key
        obj = await kube.get_object(self.ctx.api, PLURAL, namespace, name)
        if obj is None:
            return Result()  # gone: the finalizer already cleaned up at the router
        obj.setdefault("kind", "EtlPipeline")
        obj.setdefault("apiVersion", kube.API_VERSION)
        meta = obj["metadata"]
        if meta.get("deletionTimestamp"):
            return await self._finalize(obj)
        if FINALIZER not in (meta.get("finalizers") or []):
            obj = await kube.patch_object(
                self.ctx.api,
                PLURAL,
                namespace,
                name,
                {
                    "metadata": {
                        "finalizers": [*(meta.get("finalizers") or []), FINALIZER],
                        "resourceVersion": meta["resourceVersion"],  # 409 if someone else changed them
                    }
                },
            )
            obj.setdefault("kind", "EtlPipeline")
            obj.setdefault("apiVersion", kube.API_VERSION)
        verdict, fields = await self._converge(obj)
        await self._report(obj, verdict, fields)
        if verdict.requeue is None:
            return Result()
        return Result(requeue_after=self.recheck_s if verdict.requeue == "recheck" else self.wait_s)

    async def _converge(self, obj: dict[str, Any]) -> tuple[Verdict, dict[str, Any]]:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        namespace, name = meta["namespace"], meta["name"]
        owned = list((obj.get("status") or {}).get("pipelines") or [])
        filename = dsl_filename(namespace, name)
        text = spec.get("dsl")
        if not isinstance(text, str) or not text.strip():
            return verdict_failed(
                "InvalidSpec", "spec.dsl: required, the pipelines in the DSL", retry=False
            ), {}
        if len(text.encode()) > MAX_DSL_BYTES:
            message = f"spec.dsl: {len(text.encode())} bytes; the limit is {MAX_DSL_BYTES}"
            return verdict_failed("InvalidSpec", message, retry=False), {}
        # Syntax and semantics first, without the router: an invalid edit changes nothing there (the last
        # good pipelines keep running).
        errors = dsl.validate(text, filename)
        if errors:
            return verdict_invalid_dsl(errors), {}
        names = pipeline_names(text, filename)
        try:
            address, security = await resolve_router(self.ctx, namespace, spec)
        except TargetError as e:
            return verdict_failed(e.reason, e.message, retry=e.retry), {}
        client = self.ctx.router_client(address, security)
        try:
            if spec.get("suspend"):
                await self._delete_at_router(client, owned)
                return verdict_waiting("Suspended", "spec.suspend is true: pipelines removed"), {
                    "pipelines": []
                }
            return await self._apply(client, obj, text, filename, names, owned)
        except ClusterUnreachableError as e:
            return verdict_failed("RouterUnreachable", str(e), retry=True), {}
        finally:
            client.close()

    async def _apply(
        self,
        client: RouterClient,
        obj: dict[str, Any],
        text: str,
        filename: str,
        names: list[str],
        owned: list[str],
    ) -> tuple[Verdict, dict[str, Any]]:
        meta = obj["metadata"]
        listed = await client.call(
            admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
        )
        existing = {p.name for p in listed.pipelines}
        taken = [n for n in names if n in existing and n not in owned]
        if taken:
            message = (
                f"spec.dsl: pipeline {', '.join(taken)} already exists at the router and belongs to"
                " another EtlPipeline or was applied with etlrouter ctl; rename it or delete the other"
            )
            return verdict_failed("PipelineConflict", message, retry=True), {}
        claimed = sorted(set(owned) | set(names))
        if claimed != sorted(owned):
            await kube.patch_status(
                self.ctx.api, PLURAL, meta["namespace"], meta["name"], {"pipelines": claimed}
            )
        request = admin_pb2.ApplyPipelinesRequest(definition=text, filename=filename, prune=True)
        try:
            # A dry run first: the periodic drift check then costs a read, not a Raft entry, when the
            # router already runs exactly this text.
            reply = await client.call(
                admin_grpc.PipelineAdminStub,
                "ApplyPipelines",
                admin_pb2.ApplyPipelinesRequest(definition=text, filename=filename, prune=True, dry_run=True),
            )
            if reply.diagnostics or any(
                c.action != admin_pb2.PipelineChange.ACTION_UNCHANGED for c in reply.changes
            ):
                reply = await client.call(admin_grpc.PipelineAdminStub, "ApplyPipelines", request, write=True)
        except GRPCError as e:
            if e.status == Status.INVALID_ARGUMENT:
                return verdict_failed("RejectedByRouter", e.message or "invalid argument", retry=False), {}
            raise
        if reply.diagnostics:
            return verdict_router_diagnostics(reply.diagnostics), {}
        # Names this resource no longer defines; `prune` removed those still under our filename, this
        # catches one someone re-applied under another filename.
        dropped = [n for n in owned if n not in names and n in existing]
        await self._delete_at_router(client, dropped)
        created = [c.name for c in reply.changes if c.action == admin_pb2.PipelineChange.ACTION_CREATED]
        updated = [c.name for c in reply.changes if c.action == admin_pb2.PipelineChange.ACTION_UPDATED]
        listed = await client.call(
            admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
        )
        at_router = {
            p.name: RouterPipeline(
                p.name, _PHASES.get(p.phase, "Pending"), tuple(p.conditions), tuple(p.stage_ids)
            )
            for p in listed.pipelines
            if p.name in names
        }
        # From the leader, like the listing above: a follower's stale view could report stages unplaced
        # that the Running phase already counts as placed.
        sidecars = await client.call(
            admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest()
        )
        placements = [(st.stage_id, sc.sidecar_id) for sc in sidecars.sidecars for st in sc.stages]
        verdict = verdict_applied(names, at_router, assignments_summary(at_router.values(), placements))
        event = apply_event(
            created,
            updated,
            dropped,
            owned,
            obj.get("status") or {},
            int(meta.get("generation") or 0),
            client.addresses[0],
        )
        if event is not None:
            verdict = Verdict(
                verdict.ready, verdict.progressing, verdict.degraded, verdict.requeue, event, verdict.extra
            )
        fields = {
            "pipelines": sorted(names),
            "routerRevision": int(reply.revision),
            "appliedGeneration": int(meta.get("generation") or 0),
        }
        return verdict, fields

    async def _delete_at_router(self, client: RouterClient, names: Iterable[str]) -> None:
        for pipeline in names:
            try:
                await client.call(
                    admin_grpc.PipelineAdminStub,
                    "DeletePipeline",
                    admin_pb2.DeletePipelineRequest(name=pipeline),
                    write=True,
                )
            except GRPCError as e:
                if e.status != Status.NOT_FOUND:
                    raise

    async def _report(self, obj: dict[str, Any], verdict: Verdict, fields: dict[str, Any]) -> None:
        meta = obj["metadata"]
        current = dict(obj.get("status") or {})
        status = status_update(
            current, verdict, int(meta.get("generation") or 0), dt.datetime.now(dt.UTC), **fields
        )
        if status != current:
            await kube.patch_status(self.ctx.api, PLURAL, meta["namespace"], meta["name"], status)
        previous: dict[str, Any] = next(
            (c for c in current.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        changed = (previous.get("reason"), previous.get("message")) != (verdict.ready[1], verdict.ready[2])
        if verdict.event is not None and (changed or verdict.event[1] in ("Applied", "DriftRepaired")):
            await kube.record_event(self.ctx.api, obj, *verdict.event)

    async def _finalize(self, obj: dict[str, Any]) -> Result:
        meta = obj["metadata"]
        finalizers = list(meta.get("finalizers") or [])
        if FINALIZER not in finalizers:
            return Result()
        owned = list((obj.get("status") or {}).get("pipelines") or [])
        spec = obj.get("spec") or {}
        address: str | None = None
        security: Security | None = None
        try:
            address, security = await resolve_router(self.ctx, meta["namespace"], spec)
        except TargetError as e:
            # No cluster to clean up at (deleted, never ready, or no valid address): nothing runs there.
            log.info(
                "finalizing without router cleanup: %s",
                e.message,
                extra={"fields": {"namespace": meta["namespace"], "name": meta["name"]}},
            )
        if address is not None and owned:
            client = self.ctx.router_client(address, security)
            try:
                await self._delete_at_router(client, owned)
            except ClusterUnreachableError as e:
                await kube.record_event(self.ctx.api, obj, "Warning", "CleanupFailed", str(e))
                raise
            finally:
                client.close()
            await kube.record_event(
                self.ctx.api, obj, "Normal", "Deleted", f"pipeline {', '.join(owned)} deleted at the router"
            )
        await kube.patch_object(
            self.ctx.api,
            PLURAL,
            meta["namespace"],
            meta["name"],
            {
                "metadata": {
                    "finalizers": [f for f in finalizers if f != FINALIZER],
                    "resourceVersion": meta["resourceVersion"],
                }
            },
        )
        return Result()
