"""The EtlRouterCluster controller: a StatefulSet of routers, its Services, ConfigMap and PDB, and Raft
membership that follows spec.replicas.

Pure parts (tested without a server): `desired_objects` builds every owned manifest from the custom
resource; `plan_membership` decides the next single membership change; `plan_rollout` the next step of a
rolling restart. The reconciler reads, applies, asks the routers, acts once, writes status, and asks to run
again until nothing is left to do.

Scaling (see docs/operator.md):
- up: the StatefulSet grows at once; each new member is added to Raft (learner, then voter once caught up:
  the router's AddMember) when its pod runs.
- down: members above the new size leave Raft first, highest ordinal first, one at a time — a leader is
  asked to transfer leadership before it is removed — and only then does the StatefulSet shrink.
Rolling restarts (image, config, or the `etlrouter.io/restartedAt` annotation): the operator drives the
StatefulSet's `rollingUpdate.partition`. A template change is applied with the partition at `replicas` (no
pod may be replaced yet); then, one member per step and only while every other member is Ready and caught
up in Raft, the partition drops onto the highest ordinal still on the old revision — after leadership was
moved off that member if it leads. Partition 0 again when every pod runs the new revision.
Certificates (mutual TLS unless spec.tls.enabled is false; docs/security.md): the CA and the
routers' pairs are settled before the StatefulSet is applied (cluster_tls.py decides, tls_secrets.py writes),
and the routers are called with the operator's own `user/etlrouter-operator` certificate.
Metrics (monitoring.py, docs/observability.md): with TLS, the scrape Secret and the routers' token file
are written with the certificates; after the cluster's objects, its PodMonitor where the Prometheus
Operator's CRD exists (spec.monitoring.podMonitor).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import yaml

from etlrouter import __version__
from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.operator import cluster_tls, kube, monitoring, tls_secrets
from etlrouter.operator.cluster_tls import ClusterCA
from etlrouter.operator.condition import set_condition
from etlrouter.operator.controller import ObjectKey, OperatorContext, Result
from etlrouter.operator.kube import Resource
from etlrouter.security.context import Security

log = logging.getLogger(__name__)

PLURAL = "etlrouterclusters"
# Test hook: "ADDR0,ADDR1,..." gives the gRPC address of member ordinal i, instead of the pod's DNS name.
# The operator's tests point an EtlRouterCluster at real routers on loopback (no pods run there).
MEMBER_ADDRESSES = "etlrouter.io/member-addresses"
# Changing this annotation on the EtlRouterCluster restarts its routers one by one (like `kubectl rollout
# restart`).
RESTARTED_AT = "etlrouter.io/restartedAt"
CONFIG_HASH = "etlrouter.io/config-hash"
# On the StatefulSet (not its template): a hash of the pod template the operator last applied, so a change
# is seen before it is applied and can go out with the partition closed.
TEMPLATE_HASH = "etlrouter.io/template-hash"
# The StatefulSet controller labels each pod with the revision of the template it was made from.
REVISION_LABEL = "controller-revision-hash"
# A member within this many log entries of the leader's commit index has caught up (a few heartbeats of
# writes; a member that restarted with an empty disk is thousands behind until a snapshot arrives).
ROLLOUT_MAX_LAG = 64
BOOTSTRAP_KEY = "bootstrap-peers"
ROUTER_TIMEOUT_S = 3.0
ROLLING_RESTART = "RollingRestart"  # the Progressing condition's reason while a rollout runs


# The image of this package version (what the Dockerfile builds and k8s/ references) and what its containers
# need: uid 10001 (the image's user), a read-only root file system with the data volume at /data and an
# emptyDir at /var/lib/etlrouter (the image's HOME and TMPDIR; the router's worker processes use it).
DEFAULT_IMAGE = f"etlrouter:{__version__}"
IMAGE_UID = 10001
DEFAULT_RESOURCES: dict[str, Any] = {
    "requests": {"cpu": "100m", "memory": "128Mi"},
    "limits": {"memory": "512Mi"},
}
CONTAINER_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": IMAGE_UID,
    "runAsGroup": IMAGE_UID,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


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
    tls_secret: str | None  # the CA Secret (ca.crt, ca.key): yours, or made by the operator
    grpc_port: int
    http_port: int
    pod_monitor: bool = True  # a PodMonitor where the Prometheus Operator's CRD exists (monitoring.py)


def parse_spec(cr: dict[str, Any]) -> ClusterSpec:
    """The spec with the CRD's defaults (the apiserver applies them too; this covers older objects)."""
    spec = cr.get("spec") or {}
    storage, tls, ports = spec.get("storage") or {}, spec.get("tls") or {}, spec.get("ports") or {}
    watch = spec.get("monitoring") or {}
    if not isinstance(watch, dict):
        raise SpecError(f"spec.monitoring: expected an object, got {watch!r}")
    pod_monitor = watch.get("podMonitor", True)
    if not isinstance(pod_monitor, bool):
        raise SpecError(f"spec.monitoring.podMonitor: expected true or false, got {pod_monitor!r}")
    return ClusterSpec(
        replicas=int(spec.get("replicas", 3)),
        image=str(spec.get("image") or DEFAULT_IMAGE),
        storage_size=str(storage.get("size") or "1Gi"),
        storage_class=storage.get("storageClassName"),
        resources=dict(spec.get("resources") or DEFAULT_RESOURCES),
        # Secure by default: no spec.tls (or no `enabled`) means mutual TLS with an operator-made CA.
        tls_enabled=bool(tls.get("enabled", True)),
        tls_secret=tls.get("secretName"),
        grpc_port=int(ports.get("grpc", 7400)),
        http_port=int(ports.get("http", 7480)),
        pod_monitor=pod_monitor,
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
    partition: int = 0,
) -> list[dict[str, Any]]:
    """Every object the cluster owns, as server-side-apply manifests (ConfigMap first: pods mount it).

    `partition`: the StatefulSet's rollingUpdate.partition (pods with a lower ordinal keep their revision);
    `plan_rollout` decides it. The StatefulSet carries TEMPLATE_HASH of its pod template."""
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
        {"name": "home", "mountPath": "/var/lib/etlrouter"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": f"{name}-config"}},
        {"name": "home", "emptyDir": {}},
    ]
    env: list[dict[str, Any]] = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {
            "name": "BOOTSTRAP_PEERS",
            "valueFrom": {"configMapKeyRef": {"name": f"{name}-config", "key": BOOTSTRAP_KEY}},
        },
        {"name": "CLIENT_ENDPOINT", "value": client_endpoint(name, namespace, spec.grpc_port)},
    ]
    scheme = "HTTP"
    if spec.tls_enabled:
        # One Secret holds every router's pair; each pod picks its own by name ($(POD_NAME) is expanded
        # by the kubelet, POD_NAME being defined above).
        mounts.append({"name": "tls", "mountPath": cluster_tls.TLS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "tls",
                "secret": {"secretName": cluster_tls.router_secret_name(name), "defaultMode": 0o440},
            }
        )
        env += [
            {"name": "ETLROUTER_TLS__CA", "value": f"{cluster_tls.TLS_DIR}/{cluster_tls.BUNDLE}"},
            {"name": "ETLROUTER_TLS__CERT", "value": f"{cluster_tls.TLS_DIR}/$(POD_NAME).crt"},
            {"name": "ETLROUTER_TLS__KEY", "value": f"{cluster_tls.TLS_DIR}/$(POD_NAME).key"},
            {"name": "ETLROUTER_TLS__TRUST_DOMAIN", "value": cluster_tls.trust_domain(name, namespace)},
            # Bearer tokens: the scrape token of the Secret <name>-metrics, as a viewer (monitoring.py).
            {"name": "ETLROUTER_AUTH__TOKENS_FILE", "value": monitoring.tokens_file()},
            # ... on HTTP only: the gRPC handshake still requires a certificate of the cluster's CA.
            {"name": "ETLROUTER_AUTH__GRPC_TOKENS", "value": "false"},
        ]
        mounts.append({"name": "tokens", "mountPath": monitoring.TOKENS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "tokens",
                "secret": {"secretName": monitoring.tokens_secret_name(name), "defaultMode": 0o440},
            }
        )
        scheme = "HTTPS"  # the routers' HTTP port serves HTTPS too; probes need no client certificate
    container: dict[str, Any] = {
        "name": "router",
        "image": spec.image,
        "command": ["sh", "/etc/etlrouter/start.sh"],
        "env": env,
        "ports": [
            {"name": "grpc", "containerPort": spec.grpc_port, "protocol": "TCP"},
            {"name": "http", "containerPort": spec.http_port, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "http", "scheme": scheme},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "http", "scheme": scheme},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "volumeMounts": mounts,
        "securityContext": CONTAINER_SECURITY,
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
    template = {
        "metadata": {"labels": labels(name), "annotations": template_annotations},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            # fsGroup: the data PersistentVolume is writable by the image's user.
            "securityContext": {
                "runAsNonRoot": True,
                "fsGroup": IMAGE_UID,
                "fsGroupChangePolicy": "OnRootMismatch",
            },
            "containers": [container],
            "volumes": volumes,
        },
    }
    template_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {**metadata(name), "annotations": {TEMPLATE_HASH: template_hash}},
        "spec": {
            "serviceName": f"{name}-headless",
            "replicas": statefulset_replicas,
            # All pods at once: Raft needs a quorum to become ready, so OrderedReady would never finish.
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": partition}},
            "selector": {"matchLabels": selector(name)},
            "template": template,
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
    # The leader's view (zero/False when asked elsewhere): highest index replicated on the member, and
    # whether it answered the leader within the last election timeout.
    match_index: int = 0
    reachable: bool = True


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
        Member(
            id=m.id,
            address=m.address,
            voter=m.voter,
            leader=m.leader or m.id == status.leader_id,
            match_index=int(m.match_index),
            reachable=bool(m.reachable),
        )
        for m in status.members
    ]


# -- rolling restarts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodView:
    revision: str  # the pod's controller-revision-hash label
    ready: bool  # Running, Ready condition True, not being deleted


@dataclass(frozen=True)
class MemberReport:
    """What a member says about itself when asked at its own address."""

    leader_id: str
    applied_index: int


@dataclass(frozen=True)
class RolloutView:
    """Everything `plan_rollout` looks at, read by the reconciler."""

    name: str
    replicas: int  # the StatefulSet's
    partition: int  # its rollingUpdate.partition now
    template_changed: bool  # the template about to be applied differs from the applied one
    observed: bool  # the StatefulSet controller has seen the latest spec (its revisions are current)
    update_revision: str
    current_revision: str
    pods: Mapping[int, PodView]  # by ordinal; absent = no pod
    settled: bool  # Raft membership and the StatefulSet's size match spec.replicas
    leader: str = ""
    commit_index: int = 0
    members: Sequence[Member] | None = None  # the leader's view; None when no router answered
    reports: Mapping[str, MemberReport | None] = field(default_factory=dict)  # by member id; None: silent


@dataclass(frozen=True)
class RolloutStep:
    """`idle` (no rollout: partition 0), `hold` (a new template goes out with the partition closed),
    `wait` (keep the partition; `reason` says why), `lower` (the partition drops onto `node_id`),
    `transfer` (move leadership from `from_id` to `node_id` first; the partition stays)."""

    action: Literal["idle", "hold", "wait", "lower", "transfer"]
    partition: int
    reason: str = ""
    node_id: str = ""
    from_id: str = ""


def rollout_in_progress(view: RolloutView) -> bool:
    """A template change to apply, a partition still closed, or pods not on the update revision."""
    if view.template_changed or view.partition > 0:
        return True
    if not view.observed or not view.update_revision:
        return False
    return view.update_revision != view.current_revision or any(
        pod.revision != view.update_revision for pod in view.pods.values()
    )


def plan_rollout(view: RolloutView) -> RolloutStep:
    """The next single step of a rolling restart (see the module docstring).

    Never two members down at once: the partition drops onto member t only when every other member's pod
    is Ready and the member is a voter the leader reaches, within ROLLOUT_MAX_LAG of the leader's commit
    index by the leader's match index and by its own applied index, following the same leader. Member t
    itself may be down (replacing a broken pod costs nothing). Highest ordinal first, as the StatefulSet
    requires; a leader hands over before its restart, preferring a member already on the new revision.
    """
    n, name = view.replicas, view.name
    if not rollout_in_progress(view):
        return RolloutStep("idle", 0)
    if view.template_changed:
        return RolloutStep(
            "hold", n, "pod template changed: restarting the routers one at a time, highest ordinal first"
        )
    p = min(view.partition, n)
    if not view.observed:
        return RolloutStep("wait", p, "waiting for the StatefulSet controller to see the new template")
    if view.members is None:
        return RolloutStep("wait", p, "no router answered")
    if not view.settled:
        return RolloutStep("wait", p, "waiting for the membership change to finish")
    # Released members (ordinal >= partition) must be on the new revision and Ready before the next one.
    for o in range(n - 1, p - 1, -1):
        pod = view.pods.get(o)
        if pod is None or pod.revision != view.update_revision:
            return RolloutStep("wait", p, f"waiting for pod {member_id(name, o)} to be replaced")
        if not pod.ready:
            return RolloutStep("wait", p, f"waiting for pod {member_id(name, o)} to be Ready")
    stale = [o for o in range(p) if (pod := view.pods.get(o)) is None or pod.revision != view.update_revision]
    if not stale:
        problem = _unhealthy(view, skip=None)
        if problem:  # the last restarted member has not caught up yet
            return RolloutStep("wait", p, problem)
        return RolloutStep("idle", 0)
    t = max(stale)
    target = member_id(name, t)
    problem = _unhealthy(view, skip=t)
    if problem:
        return RolloutStep("wait", p, f"before restarting {target}: {problem}")
    if view.leader == target:
        updated = [o for o in range(n - 1, -1, -1) if o != t and o not in stale]
        others = updated or [o for o in range(n) if o != t]  # the first to restart leads: lowest ordinal
        if not others:  # a one-member cluster: nobody to hand over to, the restart is an outage
            return RolloutStep(
                "lower", t, f"restarting {target}, the only member (1 of 1): down until back", target
            )
        to = member_id(name, others[0])
        return RolloutStep(
            "transfer", p, f"moved leadership from {target} to {to} before its restart", to, target
        )
    return RolloutStep("lower", t, f"restarting {target} ({n - t} of {n})", target)


def _unhealthy(view: RolloutView, skip: int | None) -> str:
    """Why the members other than ordinal `skip` cannot lose one more member now ("" when they can)."""
    if view.members is None:
        return "no router answered"
    if not view.leader:
        return "no Raft leader"
    by_id = {m.id: m for m in view.members}
    for o in range(view.replicas):
        if o == skip:
            continue
        node = member_id(view.name, o)
        pod = view.pods.get(o)
        if pod is None or not pod.ready:
            return f"pod {node} is not Ready"
        m = by_id.get(node)
        if m is None or not m.voter:
            return f"{node} is not a Raft voter"
        if not m.reachable:
            return f"{node} does not answer leader {view.leader}"
        if view.commit_index - m.match_index > ROLLOUT_MAX_LAG:
            return (
                f"{node} is not caught up in Raft (match index {m.match_index}, "
                f"leader commit index {view.commit_index})"
            )
        report = view.reports.get(node)
        if report is None:
            return f"{node} does not answer"
        if report.leader_id != view.leader:
            return f"{node} follows {report.leader_id or 'no leader'}, not {view.leader}"
        if view.commit_index - report.applied_index > ROLLOUT_MAX_LAG:
            return (
                f"{node} is not caught up in Raft (applied index {report.applied_index}, "
                f"leader commit index {view.commit_index})"
            )
    return ""


def pod_views(name: str, pods: Sequence[dict[str, Any]]) -> dict[int, PodView]:
    """The cluster's pods by ordinal; a pod being deleted is as good as gone."""
    out: dict[int, PodView] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        ordinal = member_ordinal(name, str(meta.get("name", "")))
        if ordinal is None or meta.get("deletionTimestamp"):
            continue
        status = pod.get("status") or {}
        ready = status.get("phase") == "Running" and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
        out[ordinal] = PodView(str((meta.get("labels") or {}).get(REVISION_LABEL, "")), ready)
    return out


# -- the reconciler ----------------------------------------------------------------------------------------


class ClusterReconciler:
    plural = PLURAL
    owns = (
        Resource("v1", "configmaps"),
        Resource("v1", "services"),
        Resource("apps/v1", "statefulsets"),
    )

    def __init__(
        self,
        ctx: OperatorContext,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        router_validity: timedelta = cluster_tls.ROUTER_VALIDITY,
    ) -> None:
        self.ctx = ctx
        self._pdb_api_version: str | None = None
        self._pod_monitor_state = ""  # what was last logged about the PodMonitor CRD
        # The clock decides certificate renewal (tests move it forward instead of waiting for expiry).
        self.clock = clock
        self.router_validity = router_validity
        self.credentials = ctx.credentials
        # The operator's client credentials per TLS cluster, for this reconcile's calls to its routers.
        self._security: dict[ObjectKey, Security] = {}

    def _client(self, cr: dict[str, Any], address: str) -> RouterClient:
        meta = cr["metadata"]
        return self.ctx.router_client(address, self._security.get((meta["namespace"], meta["name"])))

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
            self.credentials.forget(namespace, name)
            return Result()  # owned objects carry ownerReferences: the garbage collector deletes them
        generation = int(cr["metadata"].get("generation", 0))
        status = dict(cr.get("status") or {})
        conditions: list[dict[str, Any]] = list(status.get("conditions") or [])
        now = self.clock()
        try:
            spec = parse_spec(cr)
            desired_addresses = member_addresses(cr, spec.replicas)
        except SpecError as e:
            await kube.record_event(api, cr, "Warning", "InvalidSpec", str(e))
            conditions = set_condition(conditions, "Ready", "False", "InvalidSpec", str(e), generation, now)
            await self._write_status(
                cr, {**status, "conditions": conditions, "observedGeneration": generation}
            )
            return Result()
        desired = {member_id(name, i): a for i, a in enumerate(desired_addresses)}

        ca: ClusterCA | None = None
        self._security.pop(key, None)
        if spec.tls_enabled:
            try:
                ca, done = await tls_secrets.ensure_ca(api, cr, spec.tls_secret, now)
            except tls_secrets.CertificateError as e:
                await kube.record_event(api, cr, "Warning", "CertificatesFailed", str(e))
                conditions = set_condition(
                    conditions, "CertificatesReady", "False", "InvalidCA", str(e), generation, now
                )
                conditions = set_condition(conditions, "Ready", "False", "InvalidCA", str(e), generation, now)
                await self._write_status(
                    cr, {**status, "conditions": conditions, "observedGeneration": generation}
                )
                return Result(requeue_after=30.0)
            if done:
                await kube.record_event(api, cr, "Normal", "CertificateAuthority", done)
            self._security[key] = self.credentials.security(cr, ca, now)
        else:
            self.credentials.forget(namespace, name)
        sts = await kube.get(api, Resource("apps/v1", "statefulsets"), namespace, name)
        # What the routers say (None while no router answers). Pods that are not ready cannot answer: do
        # not wait for them (the test hook's routers run outside pods, so always ask them).
        members: list[Member] | None = None
        leader, commit_index = "", 0
        hooked = MEMBER_ADDRESSES in (cr["metadata"].get("annotations") or {})
        if hooked or int(((sts or {}).get("status") or {}).get("readyReplicas") or 0) > 0:
            members, leader, commit_index = await self._members(cr, spec)
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
        renew_in: float | None = None
        if ca is not None:
            # Every router the StatefulSet may run has its pair before the StatefulSet is applied.
            node_ids = [member_id(name, i) for i in range(sts_replicas)]
            data, done = await tls_secrets.ensure_router_certs(
                api, cr, ca, node_ids, now, self.router_validity
            )
            if done:
                await kube.record_event(api, cr, "Normal", "CertificatesIssued", done)
            # The routers mount their token file: it exists before the StatefulSet does.
            done = await monitoring.ensure_metrics_credentials(api, cr, ca)
            if done:
                await kube.record_event(api, cr, "Normal", "MetricsCredentials", done)
            ca_expires = cluster_tls.expires_at(ca.cert)
            times = cluster_tls.earliest(data, node_ids)
            assert times is not None
            expires, renew = times
            renew_in = max((renew - now).total_seconds(), 1.0)
            conditions = set_condition(
                conditions,
                "CertificatesReady",
                "True",
                "Issued",
                f"{len(node_ids)} router certificates, the first expires at {expires.isoformat()} and is "
                f"renewed from {renew.isoformat()}; CA expires at {ca_expires.isoformat()}",
                generation,
                now,
            )
        else:
            conditions = set_condition(
                conditions,
                "CertificatesReady",
                "False",
                "TLSDisabled",
                "spec.tls.enabled is false: the routers serve plaintext without authentication",
                generation,
                now,
            )
        objects = desired_objects(
            cr,
            bootstrap_peers=bootstrap,
            statefulset_replicas=sts_replicas,
            pdb_api_version=await self.pdb_api_version(),
            volume_claim=claim,
        )
        pod_list = await self._pods(namespace, name) if sts is not None else []
        running = {
            p["metadata"]["name"]
            for p in pod_list
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        }
        rollout = RolloutStep("idle", 0)
        if sts is not None:  # a new StatefulSet creates its pods from the template: nothing to roll
            rollout = await self._plan_rollout(
                cr,
                spec,
                sts,
                objects,
                pod_list,
                desired,
                running,
                members,
                leader,
                commit_index,
                sts_replicas,
            )
        for manifest in objects:
            if manifest["kind"] == "StatefulSet":
                manifest["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = rollout.partition
            applied = await kube.apply(api, manifest)
            if manifest["kind"] == "StatefulSet":
                sts = applied
        await self._ensure_pod_monitor(cr, spec)
        ready_replicas = int(((sts or {}).get("status") or {}).get("readyReplicas") or 0)
        was_rolling = any(
            c.get("type") == "Progressing" and c.get("reason") == ROLLING_RESTART for c in conditions
        )
        if rollout.action == "transfer":
            members, leader = await self._act(
                cr,
                spec,
                Step("transfer", rollout.node_id),
                event=("LeadershipTransferred", rollout.reason),
            )
        elif rollout.action == "lower":
            await kube.record_event(api, cr, "Normal", "RestartingMember", rollout.reason)
        elif rollout.action == "hold" and not was_rolling:
            await kube.record_event(api, cr, "Normal", "RollingRestartStarted", rollout.reason)
        elif rollout.action == "idle" and was_rolling:
            await kube.record_event(
                api, cr, "Normal", "RollingRestartFinished", f"all {spec.replicas} routers restarted"
            )

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
        if rollout.action != "idle" and (step is None or members is None):
            conditions = set_condition(
                conditions, "Progressing", "True", ROLLING_RESTART, rollout.reason, generation, now
            )
            requeue = min(requeue or 30.0, 1.0 if rollout.action == "wait" else 0.2)
        if renew_in is not None:
            requeue = min(requeue or renew_in, renew_in)
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
            # During an election there is no leader: the key goes (a merge patch's null removes it; the
            # apiserver refuses "" for this string field).
            if leader:
                new_status["leader"] = leader
            elif "leader" in status:
                new_status["leader"] = None
        await self._write_status(cr, new_status)
        return Result(requeue_after=requeue)

    async def _ensure_pod_monitor(self, cr: dict[str, Any], spec: ClusterSpec) -> None:
        """The cluster's PodMonitor where the Prometheus Operator runs; without its CRD (or the right to read
        CRDs) nothing, said once at info, not per reconcile."""
        try:
            present = await monitoring.crd_exists(self.ctx.api)
        except kube.KubeError as e:
            if e.status != 403:
                raise
            present, why = False, f"cannot read CRDs ({e.reason}): no PodMonitors"
        else:
            what = "exists: PodMonitors" if present else "absent: no PodMonitors"
            why = f"{monitoring.POD_MONITOR_CRD} {what}"
        if why != self._pod_monitor_state:
            self._pod_monitor_state = why
            log.info(why)
        try:
            await monitoring.ensure_pod_monitor(
                self.ctx.api, cr, enabled=spec.pod_monitor, tls=spec.tls_enabled, crd_present=present
            )
        except kube.KubeError as e:
            if e.status not in (403, 422):
                raise
            # Not allowed (an older ClusterRole) or refused (another CRD of that name): the cluster itself
            # is fine, so its reconcile goes on; said as a (de-duplicated) Warning event.
            message = f"PodMonitor {monitoring.pod_monitor_name(cr['metadata']['name'])}: {e}"
            await kube.record_event(self.ctx.api, cr, "Warning", "PodMonitorFailed", message)

    async def _write_status(self, cr: dict[str, Any], status: dict[str, Any]) -> None:
        if status != (cr.get("status") or {}):  # unchanged status: no write, no watch event, no loop
            meta = cr["metadata"]
            await kube.patch_status(self.ctx.api, PLURAL, meta["namespace"], meta["name"], status)

    def _router_address(self, cr: dict[str, Any], spec: ClusterSpec) -> str:
        meta = cr["metadata"]
        if MEMBER_ADDRESSES in (meta.get("annotations") or {}):
            return str(meta["annotations"][MEMBER_ADDRESSES])
        return client_endpoint(meta["name"], meta["namespace"], spec.grpc_port)

    async def _members(self, cr: dict[str, Any], spec: ClusterSpec) -> tuple[list[Member] | None, str, int]:
        """Membership, leader and commit index — from the leader when it answers: any router answers
        GetClusterStatus, but only the leader knows match indexes and who is reachable."""
        status = await self._cluster_status(cr, self._router_address(cr, spec), any_node=False)
        if status is None:
            return None, "", 0
        if status.leader_id and status.node_id != status.leader_id and status.leader_address:
            at_leader = await self._cluster_status(cr, status.leader_address, any_node=True)
            if at_leader is not None and at_leader.node_id == at_leader.leader_id:
                status = at_leader
        return members_of(status), str(status.leader_id), int(status.commit_index)

    async def _cluster_status(self, cr: dict[str, Any], address: str, *, any_node: bool) -> Any:
        """GetClusterStatus at `address` (several, comma-separated, unless any_node); None: no answer."""
        client = self._client(cr, address)
        try:
            return await client.call(
                admin_grpc.PipelineAdminStub,
                "GetClusterStatus",
                admin_pb2.GetClusterStatusRequest(),
                any_node=any_node,
                timeout=ROUTER_TIMEOUT_S,
            )
        except Exception as e:
            log.info("router %s did not answer: %s", address, e)
            return None
        finally:
            client.close()

    async def _pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        pods, _ = await kube.list_objects(
            self.ctx.api,
            Resource("v1", "pods"),
            namespace,
            label_selector=",".join(f"{k}={v}" for k, v in selector(name).items()),
        )
        return pods

    async def _plan_rollout(
        self,
        cr: dict[str, Any],
        spec: ClusterSpec,
        sts: dict[str, Any],
        objects: list[dict[str, Any]],
        pod_list: list[dict[str, Any]],
        desired: dict[str, str],
        running: set[str],
        members: list[Member] | None,
        leader: str,
        commit_index: int,
        sts_replicas: int,
    ) -> RolloutStep:
        """Read what `plan_rollout` needs (asking every member about itself only during a rollout)."""
        manifest = next(o for o in objects if o["kind"] == "StatefulSet")
        sts_meta, sts_spec, sts_status = sts["metadata"], sts.get("spec") or {}, sts.get("status") or {}
        applied_hash = (sts_meta.get("annotations") or {}).get(TEMPLATE_HASH)
        strategy = (sts_spec.get("updateStrategy") or {}).get("rollingUpdate") or {}
        view = RolloutView(
            name=cr["metadata"]["name"],
            replicas=sts_replicas,
            partition=int(strategy.get("partition") or 0),
            template_changed=applied_hash != manifest["metadata"]["annotations"][TEMPLATE_HASH],
            observed=int(sts_status.get("observedGeneration") or 0) >= int(sts_meta.get("generation") or 0),
            update_revision=str(sts_status.get("updateRevision") or ""),
            current_revision=str(sts_status.get("currentRevision") or ""),
            pods=pod_views(cr["metadata"]["name"], pod_list),
            settled=members is not None
            and plan_membership(desired, running, members) is None
            and sts_replicas == spec.replicas
            and int(sts_spec.get("replicas") or 0) == spec.replicas,
            leader=leader,
            commit_index=commit_index,
            members=members,
        )
        if members is not None and rollout_in_progress(view) and not view.template_changed:
            view = replace(view, reports=await self._reports(cr, desired))
        return plan_rollout(view)

    async def _reports(self, cr: dict[str, Any], addresses: dict[str, str]) -> dict[str, MemberReport | None]:
        """Each member's own view (leader, applied index), asked at its own address; None: no answer."""

        async def ask(address: str) -> MemberReport | None:
            status = await self._cluster_status(cr, address, any_node=True)
            return None if status is None else MemberReport(str(status.leader_id), int(status.applied_index))

        answers = await asyncio.gather(*(ask(a) for a in addresses.values()))
        return dict(zip(addresses, answers, strict=True))

    async def _act(
        self,
        cr: dict[str, Any],
        spec: ClusterSpec,
        step: Step,
        *,
        event: tuple[str, str] | None = None,
    ) -> tuple[list[Member] | None, str]:
        """Carry out one membership change through the router admin API; records an Event (`event`:
        its reason and message instead of the step's)."""
        client = self._client(cr, self._router_address(cr, spec))
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
        if event is not None:
            reason, message = event
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
