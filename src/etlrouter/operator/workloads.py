"""EtlSource / EtlTransform / EtlSink controller: the user's service as a Deployment with the sidecar, a
Service in front of it, and the instances the router registered reported in status.

The pod template gets its sidecar from the same `inject_sidecar` patch the admission webhook sends, so a
pod the operator builds and a pod the webhook mutates carry the same container. The Deployment and the
Service are owned (ownerReferences) and written with server-side apply: drift is undone on every
reconcile, and the garbage collector deletes them with the resource.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from etlrouter._proto.v1 import admin_grpc, admin_pb2, control_pb2
from etlrouter.client.router import ClusterUnreachableError
from etlrouter.operator import kube
from etlrouter.operator.controller import ObjectKey, OperatorContext, Result
from etlrouter.operator.inject import (
    SIDECAR_GRPC_PORT,
    SIDECAR_HTTP_PORT,
    SidecarSpec,
    SidecarTls,
    apply_patch,
    inject_sidecar,
)
from etlrouter.operator.pipeline import (
    RECHECK_S,
    WAIT_S,
    TargetError,
    Verdict,
    resolve_router,
    status_update,
    verdict_failed,
)

KINDS = {"etlsources": "EtlSource", "etltransforms": "EtlTransform", "etlsinks": "EtlSink"}
COMPONENTS = {"etlsources": "source", "etltransforms": "transform", "etlsinks": "sink"}
SERVICE_CONTAINER = "service"
CONFIG_ENV = "ETLROUTER_SERVICE_CONFIG"  # spec.config as one JSON object
WORKLOAD_LABEL = "etlrouter.io/workload"
MAX_REPLICAS = 1000
_HEALTH = {
    control_pb2.HEALTH_SERVING: "serving",
    control_pb2.HEALTH_DEGRADED: "degraded",
    control_pb2.HEALTH_NOT_SERVING: "not_serving",
}
DEPLOYMENTS = kube.Resource("apps/v1", "deployments")
SERVICES = kube.Resource("v1", "services")


class SpecError(ValueError):
    """A bad workload spec; the message starts with the field path."""


@dataclass(frozen=True)
class WorkloadSpec:
    image: str
    port: int
    replicas: int
    args: tuple[str, ...]
    env: tuple[dict[str, Any], ...]
    config: dict[str, str]
    resources: dict[str, Any]


def parse_spec(spec: Any) -> WorkloadSpec:
    """Check what the CRD schema checks again (it may be installed without it); errors name the field."""
    if not isinstance(spec, dict):
        raise SpecError("spec: required")
    image = spec.get("image")
    if not isinstance(image, str) or not image:
        raise SpecError("spec.image: required, a container image")
    port = spec.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise SpecError(f"spec.port: must be an integer from 1 to 65535, got {port!r}")
    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= MAX_REPLICAS:
        raise SpecError(f"spec.replicas: must be an integer from 0 to {MAX_REPLICAS}, got {replicas!r}")
    args = spec.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError("spec.args: must be a list of strings")
    env = spec.get("env") or []
    if not isinstance(env, list):
        raise SpecError("spec.env: must be a list of EnvVar")
    for i, var in enumerate(env):
        if not isinstance(var, dict) or not isinstance(var.get("name"), str) or not var["name"]:
            raise SpecError(f"spec.env[{i}].name: required")
        if var["name"] == CONFIG_ENV:
            raise SpecError(f"spec.env[{i}].name: {CONFIG_ENV} is set from spec.config")
    config = spec.get("config") or {}
    if not isinstance(config, dict):
        raise SpecError("spec.config: must be a map of string to string")
    for k, v in config.items():
        if not isinstance(v, str):
            raise SpecError(f"spec.config.{k}: must be a string, got {type(v).__name__}")
    resources = spec.get("resources") or {}
    if not isinstance(resources, dict):
        raise SpecError("spec.resources: must be a ResourceRequirements object")
    return WorkloadSpec(image, port, replicas, tuple(args), tuple(env), dict(config), dict(resources))


def labels_of(plural: str, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": COMPONENTS[plural],
        "app.kubernetes.io/part-of": "etlrouter",
        "app.kubernetes.io/managed-by": "etlrouter-operator",
        WORKLOAD_LABEL: name,
    }


def selector_of(plural: str, name: str) -> dict[str, str]:
    return {WORKLOAD_LABEL: name, "app.kubernetes.io/component": COMPONENTS[plural]}


def desired_deployment(
    obj: dict[str, Any],
    plural: str,
    spec: WorkloadSpec,
    router: str,
    sidecar_image: str,
    tls: SidecarTls | None = None,
) -> dict[str, Any]:
    meta = obj["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    env = [dict(var) for var in spec.env]
    if spec.config:
        env.append({"name": CONFIG_ENV, "value": json.dumps(spec.config, sort_keys=True)})
    container: dict[str, Any] = {
        "name": SERVICE_CONTAINER,
        "image": spec.image,
        "ports": [{"name": "grpc", "containerPort": spec.port, "protocol": "TCP"}],
    }
    if spec.args:
        container["args"] = list(spec.args)
    if env:
        container["env"] = env
    if spec.resources:
        container["resources"] = spec.resources
    template: dict[str, Any] = {
        "metadata": {"labels": labels_of(plural, name)},
        "spec": {"containers": [container]},
    }
    routers = tuple(a.strip() for a in router.split(",") if a.strip())
    sidecar = SidecarSpec(image=sidecar_image, routers=routers, scan_ports=str(spec.port), tls=tls)
    template = apply_patch(template, inject_sidecar(template, sidecar))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": labels_of(plural, name),
            "ownerReferences": [kube.owner_reference(obj)],
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector_of(plural, name)},
            "template": template,
        },
    }


def desired_service(obj: dict[str, Any], plural: str, spec: WorkloadSpec) -> dict[str, Any]:
    meta = obj["metadata"]
    name = meta["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels_of(plural, name),
            "ownerReferences": [kube.owner_reference(obj)],
        },
        "spec": {
            "selector": selector_of(plural, name),
            "ports": [
                {"name": "grpc", "port": spec.port, "targetPort": spec.port, "protocol": "TCP"},
                # protocol on every port: server-side apply on 1.20 needs the list's key fields.
                {
                    "name": "etl-data",
                    "port": SIDECAR_GRPC_PORT,
                    "targetPort": SIDECAR_GRPC_PORT,
                    "protocol": "TCP",
                },
                {
                    "name": "etl-http",
                    "port": SIDECAR_HTTP_PORT,
                    "targetPort": SIDECAR_HTTP_PORT,
                    "protocol": "TCP",
                },
            ],
        },
    }


def instances_of(
    name: str, sidecars: admin_pb2.ListSidecarsResponse, services: admin_pb2.ListServicesResponse
) -> list[dict[str, str]]:
    """The registered instances of service `name`: behind sidecars (with the sidecar's health) and
    registered directly (health unknown to the registry listing)."""
    out = [
        {"sidecar": sc.sidecar_id, "address": svc.endpoint, "health": _HEALTH.get(sc.health, "unknown")}
        for sc in sidecars.sidecars
        for svc in sc.services
        if svc.name == name
    ]
    out += [
        {"sidecar": "", "address": svc.endpoint, "health": "unknown"}
        for svc in services.services
        if svc.name == name and not svc.sidecar_id
    ]
    return sorted(out, key=lambda i: (i["sidecar"], i["address"]))


def workload_verdict(
    spec: WorkloadSpec,
    ready_replicas: int,
    instances: Sequence[dict[str, str]] | None,
    router_error: str = "",
) -> Verdict:
    """Ready when every replica runs and has registered; Degraded when the router cannot be asked."""
    registered = len(instances) if instances is not None else 0
    if router_error:
        message = f"{ready_replicas}/{spec.replicas} replicas ready; router: {router_error}"
        return Verdict(
            ready=("False", "RouterUnreachable", message),
            progressing=("False", "RouterUnreachable", message),
            degraded=("True", "RouterUnreachable", message),
            requeue="wait",
            event=("Warning", "RouterUnreachable", router_error),
        )
    message = f"{ready_replicas}/{spec.replicas} replicas ready, {registered} registered at the router"
    if ready_replicas >= spec.replicas and registered >= spec.replicas:
        return Verdict(
            ready=("True", "Ready", message),
            progressing=("False", "Ready", message),
            degraded=("False", "Ready", message),
            requeue="recheck",
        )
    reason = "WaitingForPods" if ready_replicas < spec.replicas else "WaitingForRegistration"
    return Verdict(
        ready=("False", reason, message),
        progressing=("True", reason, message),
        degraded=("False", reason, message),
        requeue="wait",
    )


class WorkloadReconciler:
    owns = (DEPLOYMENTS, SERVICES)

    def __init__(
        self, ctx: OperatorContext, plural: str, *, recheck_s: float = RECHECK_S, wait_s: float = WAIT_S
    ) -> None:
        if plural not in KINDS:
            raise ValueError(f"WorkloadReconciler handles {sorted(KINDS)}, not {plural!r}")
        self.ctx = ctx
        self.plural = plural
        self.recheck_s = recheck_s
        self.wait_s = wait_s

    async def reconcile(self, key: ObjectKey) -> Result:
        namespace, name = key
        obj = await kube.get_object(self.ctx.api, self.plural, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return Result()  # the garbage collector removes the Deployment and Service
        obj.setdefault("kind", KINDS[self.plural])
        obj.setdefault("apiVersion", kube.API_VERSION)
        verdict, fields = await self._converge(obj)
        await self._report(obj, verdict, fields)
        if verdict.requeue is None:
            return Result()
        return Result(requeue_after=self.recheck_s if verdict.requeue == "recheck" else self.wait_s)

    async def _converge(self, obj: dict[str, Any]) -> tuple[Verdict, dict[str, Any]]:
        meta = obj["metadata"]
        try:
            spec = parse_spec(obj.get("spec"))
        except SpecError as e:
            return verdict_failed("InvalidSpec", str(e), retry=False), {}
        try:
            router, security = await resolve_router(self.ctx, meta["namespace"], obj.get("spec") or {})
        except TargetError as e:
            return verdict_failed(e.reason, e.message, retry=e.retry), {}
        sidecar_tls: SidecarTls | None = None
        if security is not None:  # a TLS cluster: the sidecars get their certificates from the issuer
            if self.ctx.sidecar_tls is None:
                return verdict_failed(
                    "IssuerNotReady", "waiting for the certificate issuer to start", retry=True
                ), {}
            sidecar_tls = self.ctx.sidecar_tls(meta["namespace"], str((obj.get("spec") or {})["cluster"]))
        for res in (DEPLOYMENTS, SERVICES):
            # Never take over a same-named object something else controls (e.g. an EtlSink of this name).
            existing = await kube.get(self.ctx.api, res, meta["namespace"], meta["name"])
            owners = [
                r
                for r in (existing or {}).get("metadata", {}).get("ownerReferences") or []
                if r.get("controller")
            ]
            if existing is not None and owners and owners[0].get("uid") != meta["uid"]:
                owner = f"{owners[0].get('kind')} {owners[0].get('name')}"
                message = (
                    f"metadata.name: a {res.plural[:-1]} {meta['name']} already exists, controlled by {owner}"
                )
                return verdict_failed("NameConflict", message, retry=True), {}
        deployment = await kube.apply(
            self.ctx.api,
            desired_deployment(
                obj, self.plural, spec, router, self.ctx.config.operator.sidecar_image, tls=sidecar_tls
            ),
        )
        await kube.apply(self.ctx.api, desired_service(obj, self.plural, spec))
        ready = int((deployment.get("status") or {}).get("readyReplicas") or 0)
        client = self.ctx.router_client(router, security)
        try:
            # From the leader: sidecar health is what the leader heard in heartbeats, not replicated.
            sidecars = await client.call(
                admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest()
            )
            services = await client.call(
                admin_grpc.PipelineAdminStub,
                "ListServices",
                admin_pb2.ListServicesRequest(consistency=admin_pb2.READ_CONSISTENCY_STALE),
                any_node=True,
            )
        except ClusterUnreachableError as e:
            return workload_verdict(spec, ready, None, str(e)), {"readyReplicas": ready}
        finally:
            client.close()
        instances = instances_of(meta["name"], sidecars, services)
        verdict = workload_verdict(spec, ready, instances)
        return verdict, {"readyReplicas": ready, "instances": instances}

    async def _report(self, obj: dict[str, Any], verdict: Verdict, fields: dict[str, Any]) -> None:
        meta = obj["metadata"]
        current = dict(obj.get("status") or {})
        generation = int(meta.get("generation") or 0)
        status = status_update(current, verdict, generation, dt.datetime.now(dt.UTC), **fields)
        if status != current:
            await kube.patch_status(self.ctx.api, self.plural, meta["namespace"], meta["name"], status)
        previous: dict[str, Any] = next(
            (c for c in current.get("conditions") or [] if c.get("type") == "Ready"), {}
        )
        changed = (previous.get("reason"), previous.get("message")) != verdict.ready[1:]
        if verdict.event is not None and changed:
            await kube.record_event(self.ctx.api, obj, *verdict.event)
