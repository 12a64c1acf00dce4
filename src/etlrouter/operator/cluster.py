"""The EtlRouterCluster controller: a StatefulSet of routers, its Services, ConfigMap and PDB, and Raft
membership that follows spec.replicas.

Pure parts (tested without a server): `desired_objects` builds every owned manifest from the custom
resource; `plan_membership` decides the next single membership change. The reconciler reads, applies,
asks the routers, acts once, writes status, and asks to run again until nothing is left to do.

Scaling (see docs/operator.md):
- up: the StatefulSet grows at once; each new member is added to Raft (learner, then voter once caught up:
  the router's AddMember) when its pod runs.
- down: members above the new size leave Raft first, highest ordinal first, one at a time — a leader is
  asked to transfer leadership before it is removed — and only then does the StatefulSet shrink.
Rolling restarts (image, config, or the `etlrouter.io/restartedAt` annotation): the StatefulSet's
RollingUpdate replaces one pod at a time, waiting for readiness; a router transfers leadership when it is
stopped (SIGTERM drain), and the PodDisruptionBudget allows one voluntary disruption at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import yaml

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.operator import kube
from etlrouter.operator.condition import set_condition
from etlrouter.operator.controller import ObjectKey, OperatorContext, Result
from etlrouter.operator.kube import Resource

log = logging.getLogger(__name__)

PLURAL = "etlrouterclusters"
# Test hook: "ADDR0,ADDR1,..." gives the gRPC address of member ordinal i, instead of the pod's DNS name.
# The operator's tests point an EtlRouterCluster at real routers on loopback (no pods run there).
MEMBER_ADDRESSES = "etlrouter.io/member-addresses"
# Changing this annotation on the EtlRouterCluster restarts its routers one by one (like `kubectl rollout
# restart`).
RESTARTED_AT = "etlrouter.io/restartedAt"
CONFIG_HASH = "etlrouter.io/config-hash"
BOOTSTRAP_KEY = "bootstrap-peers"
ROUTER_TIMEOUT_S = 3.0


class SpecError(ValueError):
    """The custom resource cannot be turned into objects; the message names the field."""


@dataclass(frozen=True)
class ClusterSpec:
    replicas: int
    image: str
    storage_size: str
    storage_class: str | None
    resources: dict[str, Any]
    tls_enabled: bool
    tls_secret: str | None
    grpc_port: int
    http_port: int


def parse_spec(cr: dict[str, Any]) -> ClusterSpec:
    """The spec with the CRD's defaults (the apiserver applies them too; this covers older objects)."""
    spec = cr.get("spec") or {}
    storage, tls, ports = spec.get("storage") or {}, spec.get("tls") or {}, spec.get("ports") or {}
    return ClusterSpec(
        replicas=int(spec.get("replicas", 3)),
        image=str(spec.get("image") or "etlrouter:latest"),
        storage_size=str(storage.get("size") or "1Gi"),
        storage_class=storage.get("storageClassName"),
        resources=dict(spec.get("resources") or {}),
        tls_enabled=bool(tls.get("enabled", False)),
        tls_secret=tls.get("secretName"),
        grpc_port=int(ports.get("grpc", 7400)),
        http_port=int(ports.get("http", 7480)),
    )


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "etlrouter",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "router",
        "app.kubernetes.io/managed-by": "etlrouter-operator",
    }


def selector(name: str) -> dict[str, str]:
    return {k: v for k, v in labels(name).items() if k != "app.kubernetes.io/managed-by"}


def member_id(name: str, ordinal: int) -> str:
    return f"{name}-{ordinal}"


def member_ordinal(name: str, node_id: str) -> int | None:
    prefix, _, ordinal = node_id.rpartition("-")
    return int(ordinal) if prefix == name and ordinal.isdigit() else None


def client_endpoint(name: str, namespace: str, grpc_port: int) -> str:
    return f"{name}-client.{namespace}.svc:{grpc_port}"


def member_addresses(cr: dict[str, Any], count: int) -> list[str]:
    """gRPC addresses of ordinals 0..count-1: the pods' stable DNS names, or the test hook's list."""
    meta = cr["metadata"]
    name, namespace = meta["name"], meta.get("namespace", "default")
    port = parse_spec(cr).grpc_port
    hook = (meta.get("annotations") or {}).get(MEMBER_ADDRESSES)
    if hook is None:
        return [f"{member_id(name, i)}.{name}-headless.{namespace}.svc:{port}" for i in range(count)]
    addresses = [a.strip() for a in hook.split(",") if a.strip()]
    if len(addresses) < count:
        raise SpecError(
            f"metadata.annotations[{MEMBER_ADDRESSES}]: {len(addresses)} addresses for {count} members"
        )
    return addresses[:count]


def router_config(cr: dict[str, Any]) -> str:
    """The routers' config file (the per-pod parts come from the start script's flags)."""
    meta, spec = cr["metadata"], parse_spec(cr)
    doc = {
        "logging": {"format": "json"},
        "router": {
            "cluster_id": f"{meta.get('namespace', 'default')}/{meta['name']}",
            "grpc": {"host": "0.0.0.0", "port": spec.grpc_port},
            "http": {"host": "0.0.0.0", "port": spec.http_port},
            "data_dir": "/data/router",
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


# Ordinals below the bootstrap count start with the static peer list; later ones join through the client
# Service and wait to be added (the operator adds them, and the router asks too: whichever comes first).
START_SCRIPT = """\
set -eu
ordinal="${POD_NAME##*-}"
count=$(echo $BOOTSTRAP_PEERS | wc -w)
if [ "$ordinal" -lt "$count" ]; then
  set --
  for peer in $BOOTSTRAP_PEERS; do set -- "$@" --peer "$peer"; done
else
  set -- --join "$CLIENT_ENDPOINT"
fi
exec etlrouter --config /etc/etlrouter/router.yaml router --node-id "$POD_NAME" "$@"
"""


def desired_objects(
    cr: dict[str, Any],
    *,
    bootstrap_peers: str,
    statefulset_replicas: int,
    pdb_api_version: str,
    volume_claim: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every object the cluster owns, as server-side-apply manifests (ConfigMap first: pods mount it)."""
    meta, spec = cr["metadata"], parse_spec(cr)
    name, namespace = meta["name"], meta.get("namespace", "default")
    owner = [kube.owner_reference(cr)]

    def metadata(obj_name: str) -> dict[str, Any]:
        return {"name": obj_name, "namespace": namespace, "labels": labels(name), "ownerReferences": owner}

    config_data = {"router.yaml": router_config(cr), "start.sh": START_SCRIPT, BOOTSTRAP_KEY: bootstrap_peers}
    config_hash = hashlib.sha256(json.dumps(config_data, sort_keys=True).encode()).hexdigest()[:16]
    ports = [
        {"name": "grpc", "port": spec.grpc_port, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "http", "port": spec.http_port, "targetPort": "http", "protocol": "TCP"},
    ]
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(f"{name}-config"),
        "data": config_data,
    }
    headless = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(f"{name}-headless"),
        "spec": {
            "clusterIP": "None",
            # Raft peers must reach each other before any of them is ready.
            "publishNotReadyAddresses": True,
            "selector": selector(name),
            "ports": ports,
        },
    }
    client_svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(f"{name}-client"),
        "spec": {"type": "ClusterIP", "selector": selector(name), "ports": ports},
    }
    template_annotations = {CONFIG_HASH: config_hash}
    restarted = (meta.get("annotations") or {}).get(RESTARTED_AT)
    if restarted:
        template_annotations[RESTARTED_AT] = restarted
    mounts: list[dict[str, Any]] = [
        {"name": "data", "mountPath": "/data"},
        {"name": "config", "mountPath": "/etc/etlrouter"},
    ]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": f"{name}-config"}}]
    if spec.tls_enabled:
        secret = spec.tls_secret or f"{name}-tls"
        mounts.append({"name": "tls", "mountPath": "/etc/etlrouter/tls", "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": secret}})
    container: dict[str, Any] = {
        "name": "router",
        "image": spec.image,
        "command": ["sh", "/etc/etlrouter/start.sh"],
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {
                "name": "BOOTSTRAP_PEERS",
                "valueFrom": {"configMapKeyRef": {"name": f"{name}-config", "key": BOOTSTRAP_KEY}},
            },
            {"name": "CLIENT_ENDPOINT", "value": client_endpoint(name, namespace, spec.grpc_port)},
        ],
        "ports": [
            {"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"},
            {"name": "http", "containerPort": spec.http_port, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": mounts,
    }
    if spec.resources:
        container["resources"] = spec.resources
    claim = volume_claim or {
        "metadata": {"name": "data"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": spec.storage_size}},
            **({"storageClassName": spec.storage_class} if spec.storage_class else {}),
        },
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(name),
        "spec": {
            "serviceName": f"{name}-headless",
            "replicas": statefulset_replicas,
            # All pods at once: Raft needs a quorum to become ready, so OrderedReady would never finish.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
            "selector": {"matchLabels": selector(name)},
            "template": {
                "metadata": {"labels": labels(name), "annotations": template_annotations},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }
    pdb = {
        "apiVersion": pdb_api_version,
        "kind": "PodDisruptionBudget",
        "metadata": metadata(name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }
    return [config_map, headless, client_svc, statefulset, pdb]


# -- membership --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    id: str
    address: str
    voter: bool
    leader: bool


@dataclass(frozen=True)
class Step:
    action: str  # "add", "transfer", "remove", "wait"
    node_id: str
    address: str = ""
    reason: str = ""


def plan_membership(desired: dict[str, str], running: set[str], members: list[Member]) -> Step | None:
    """The next single membership change, or None when Raft's members are exactly `desired`.

    `desired`: node id -> address for the ordinals below spec.replicas; `running`: ids whose pods run.
    Adds come before removals (a replacement never shrinks the quorum first); removals take the highest
    ordinal first, and a leader hands leadership to a member that stays before it is removed.
    """
    current = {m.id: m for m in members}
    for node_id, address in desired.items():
        m = current.get(node_id)
        if m is None:
            if node_id in running:
                return Step("add", node_id, address, "scale up")
            return Step("wait", node_id, reason=f"waiting for pod {node_id} to run")
        if not m.voter:
            return Step("wait", node_id, reason=f"learner {node_id} is catching up")
    extra = sorted(
        (m for m in members if m.id not in desired), key=lambda m: _ordinal_key(m.id), reverse=True
    )
    for m in extra:
        if m.leader:
            target = next((d for d in desired if d in current and current[d].voter), "")
            return Step("transfer", target, reason=f"leader {m.id} is being removed")
        return Step("remove", m.id, reason="scale down")
    return None


def _ordinal_key(node_id: str) -> tuple[int, str]:
    _, _, ordinal = node_id.rpartition("-")
    return (int(ordinal) if ordinal.isdigit() else -1, node_id)


def members_of(status: Any) -> list[Member]:
    return [
        Member(id=m.id, address=m.address, voter=m.voter, leader=m.leader or m.id == status.leader_id)
        for m in status.members
    ]


# -- the reconciler ----------------------------------------------------------------------------------------


class ClusterReconciler:
    plural = PLURAL
    owns = (
        Resource("v1", "configmaps"),
        Resource("v1", "services"),
        Resource("apps/v1", "statefulsets"),
    )

    def __init__(self, ctx: OperatorContext) -> None:
        self.ctx = ctx
        self._pdb_api_version: str | None = None

    async def pdb_api_version(self) -> str:
        """policy/v1 from Kubernetes 1.21 on; 1.20 only serves policy/v1beta1."""
        if self._pdb_api_version is None:
            minor = await kube.server_minor_version(self.ctx.api)
            self._pdb_api_version = "policy/v1" if minor >= 21 else "policy/v1beta1"
        return self._pdb_api_version

    async def reconcile(self, key: ObjectKey) -> Result:
        namespace, name = key
        api = self.ctx.api
        cr = await kube.get_object(api, PLURAL, namespace, name)
        if cr is None or cr["metadata"].get("deletionTimestamp"):
            return Result()  # owned objects carry ownerReferences: the garbage collector deletes them
        spec = parse_spec(cr)
        generation = int(cr["metadata"].get("generation", 0))
        status = dict(cr.get("status") or {})
        conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
        now = datetime.now(UTC)
        try:
            desired_addresses = member_addresses(cr, spec.replicas)
        except SpecError as e:
            await kube.record_event(api, cr, "Warning", "InvalidSpec", str(e))
            conditions = set_condition(conditions, "Ready", "False", "InvalidSpec", str(e), generation, now)
            await self._write_status(
                cr, {**status, "conditions": conditions, "observedGeneration": generation}
            )
            return Result()
        desired = {member_id(name, i): a for i, a in enumerate(desired_addresses)}

        if spec.tls_enabled:
            await kube.record_event(
                api,
                cr,
                "Warning",
                "TLSNotSupported",
                "spec.tls: the secret is mounted at /etc/etlrouter/tls; this router build serves plaintext",
            )
        sts = await kube.get(api, Resource("apps/v1", "statefulsets"), namespace, name)
        # What the routers say (None while no router answers). Pods that are not ready cannot answer: do
        # not wait for them (the test hook's routers run outside pods, so always ask them).
        members: list[Member] | None = None
        leader = ""
        hooked = MEMBER_ADDRESSES in (cr["metadata"].get("annotations") or {})
        if hooked or int(((sts or {}).get("status") or {}).get("readyReplicas") or 0) > 0:
            members, leader = await self._members(cr, spec)
        config_map = await kube.get(api, Resource("v1", "configmaps"), namespace, f"{name}-config")
        bootstrap = str(((config_map or {}).get("data") or {}).get(BOOTSTRAP_KEY, ""))
        if not bootstrap:  # fixed at creation: later members join instead of bootstrapping
            bootstrap = " ".join(f"{member_id(name, i)}={a}" for i, a in enumerate(desired_addresses))
        # Shrink the StatefulSet only after the members above the new size left Raft.
        highest = max((o for m in members or [] if (o := member_ordinal(name, m.id)) is not None), default=-1)
        sts_replicas = max(spec.replicas, highest + 1)
        if members is None and sts is not None:
            # Membership unknown: never shrink (a removed pod would stay a Raft voter and cost quorum).
            sts_replicas = max(sts_replicas, int((sts.get("spec") or {}).get("replicas") or 0))
        claim = None
        if sts is not None:  # volumeClaimTemplates are immutable: keep what the StatefulSet was made with
            claim = _claim_of(sts)
            wanted = spec.storage_size
            if _claim_size(claim) != wanted:
                await kube.record_event(
                    api,
                    cr,
                    "Warning",
                    "StorageImmutable",
                    f"spec.storage cannot change after creation (kept {_claim_size(claim)}, asked {wanted})",
                )
        for manifest in desired_objects(
            cr,
            bootstrap_peers=bootstrap,
            statefulset_replicas=sts_replicas,
            pdb_api_version=await self.pdb_api_version(),
            volume_claim=claim,
        ):
            applied = await kube.apply(api, manifest)
            if manifest["kind"] == "StatefulSet":
                sts = applied
        ready_replicas = int(((sts or {}).get("status") or {}).get("readyReplicas") or 0)

        step: Step | None = None
        requeue: float | None = 30.0  # membership and leader are polled: routers change without events
        if members is None:
            conditions = set_condition(
                conditions, "Ready", "False", "RoutersUnreachable", "no router answered yet", generation, now
            )
            conditions = set_condition(
                conditions, "Progressing", "True", "WaitingForRouters", "waiting for routers", generation, now
            )
            requeue = 5.0
        else:
            running = await self._running_pods(namespace, name, sts_replicas)
            step = plan_membership(desired, running, members)
            if step is not None and step.action != "wait":
                members, leader = await self._act(cr, spec, step)
                requeue = 0.2
                step = plan_membership(desired, running, members or [])
            if step is None:
                conditions = set_condition(
                    conditions,
                    "Progressing",
                    "False",
                    "MembershipSettled",
                    f"{len(desired)} members",
                    generation,
                    now,
                )
                ready = ready_replicas >= spec.replicas and bool(leader)
                conditions = set_condition(
                    conditions,
                    "Ready",
                    "True" if ready else "False",
                    "ClusterReady" if ready else "PodsNotReady",
                    f"{ready_replicas}/{spec.replicas} routers ready, leader {leader or 'unknown'}",
                    generation,
                    now,
                )
            else:
                requeue = 0.2 if step.action != "wait" else 2.0
                conditions = set_condition(
                    conditions, "Progressing", "True", "MembershipChanging", step.reason, generation, now
                )
        new_status = {
            **status,
            "conditions": conditions,
            "observedGeneration": generation,
            "readyReplicas": ready_replicas,
            "endpoint": client_endpoint(name, namespace, spec.grpc_port),
        }
        if members is not None:
            new_status["members"] = [
                {
                    "id": m.id,
                    "address": m.address,
                    "role": "leader" if m.leader else ("voter" if m.voter else "learner"),
                }
                for m in members
            ]
            new_status["leader"] = leader or ""
        await self._write_status(cr, new_status)
        return Result(requeue_after=requeue)

    async def _write_status(self, cr: dict[str, Any], status: dict[str, Any]) -> None:
        if status != (cr.get("status") or {}):  # unchanged status: no write, no watch event, no loop
            meta = cr["metadata"]
            await kube.patch_status(self.ctx.api, PLURAL, meta["namespace"], meta["name"], status)

    def _router_address(self, cr: dict[str, Any], spec: ClusterSpec) -> str:
        meta = cr["metadata"]
        if MEMBER_ADDRESSES in (meta.get("annotations") or {}):
            return str(meta["annotations"][MEMBER_ADDRESSES])
        return client_endpoint(meta["name"], meta["namespace"], spec.grpc_port)

    async def _members(self, cr: dict[str, Any], spec: ClusterSpec) -> tuple[list[Member] | None, str]:
        client = self.ctx.router_client(self._router_address(cr, spec))
        try:
            status = await client.call(
                admin_grpc.PipelineAdminStub,
                "GetClusterStatus",
                admin_pb2.GetClusterStatusRequest(),
                timeout=ROUTER_TIMEOUT_S,
            )
        except Exception as e:
            log.info(
                "router cluster not reachable: %s", e, extra={"fields": {"cluster": cr["metadata"]["name"]}}
            )
            return None, ""
        finally:
            client.close()
        return members_of(status), str(status.leader_id)

    async def _running_pods(self, namespace: str, name: str, count: int) -> set[str]:
        pods, _ = await kube.list_objects(
            self.ctx.api,
            Resource("v1", "pods"),
            namespace,
            label_selector=",".join(f"{k}={v}" for k, v in selector(name).items()),
        )
        return {
            p["metadata"]["name"]
            for p in pods
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        }

    async def _act(
        self, cr: dict[str, Any], spec: ClusterSpec, step: Step
    ) -> tuple[list[Member] | None, str]:
        """Carry out one membership change through the router admin API; records an Event."""
        client = self.ctx.router_client(self._router_address(cr, spec))
        try:
            if step.action == "add":
                request: Any = admin_pb2.AddMemberRequest(node_id=step.node_id, address=step.address)
                method, reason, message = "AddMember", "MemberAdded", f"added {step.node_id} ({step.address})"
            elif step.action == "transfer":
                request = admin_pb2.TransferLeadershipRequest(node_id=step.node_id)
                method, reason = "TransferLeadership", "LeadershipTransferred"
                message = f"leadership moved to {step.node_id or 'another member'}: {step.reason}"
            else:
                request = admin_pb2.RemoveMemberRequest(node_id=step.node_id)
                method, reason, message = "RemoveMember", "MemberRemoved", f"removed {step.node_id}"
            status = await client.call(
                admin_grpc.PipelineAdminStub, method, request, write=True, timeout=60.0
            )
        finally:
            client.close()
        log.info(message, extra={"fields": {"cluster": cr["metadata"]["name"], "step": step.action}})
        await kube.record_event(self.ctx.api, cr, "Normal", reason, message)
        return members_of(status), str(status.leader_id)


def _claim_of(sts: dict[str, Any]) -> dict[str, Any]:
    templates = (sts.get("spec") or {}).get("volumeClaimTemplates") or [{}]
    claim = templates[0]
    spec = claim.get("spec") or {}
    out_spec: dict[str, Any] = {
        "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
        "resources": {"requests": {"storage": _claim_size(claim)}},
    }
    if spec.get("storageClassName"):
        out_spec["storageClassName"] = spec["storageClassName"]
    return {"metadata": {"name": "data"}, "spec": out_spec}


def _claim_size(claim: dict[str, Any]) -> str:
    return str((((claim.get("spec") or {}).get("resources") or {}).get("requests") or {}).get("storage", ""))
