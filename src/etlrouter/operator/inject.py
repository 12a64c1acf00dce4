"""Sidecar injection as a pure function: a pod (or pod template) in, a JSON patch (RFC 6902) out.

The admission webhook sends the patch to the apiserver; the workload controller applies the same patch to
the pod template of the Deployments it builds, so both paths produce the same sidecar container.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from etlrouter.core.config import parse_port_list, split_address

INJECT_ANNOTATION = "etlrouter.io/inject"
ROUTER_ANNOTATION = "etlrouter.io/router"
PORTS_ANNOTATION = "etlrouter.io/ports"
INJECTED_ANNOTATION = "etlrouter.io/injected"
# The EtlRouterCluster a pod's sidecar belongs to ("NAME" in the pod's namespace, or "NAMESPACE/NAME");
# without it, the cluster whose client Service `etlrouter.io/router` names.
CLUSTER_ANNOTATION = "etlrouter.io/cluster"
SIDECAR_NAME = "etlrouter-sidecar"
DATA_VOLUME = "etlrouter-sidecar-data"
SIDECAR_GRPC_PORT = 7500
SIDECAR_HTTP_PORT = 7580
DATA_HOME = "/var/lib/etlrouter"  # the image's HOME and data directory
DATA_DIR = f"{DATA_HOME}/sidecar"
# The projected ServiceAccount token the sidecar shows the certificate issuer (docs/security.md).
TOKEN_VOLUME = "etlrouter-token"
TOKEN_DIR = "/var/run/secrets/etlrouter.io"
TOKEN_FILE = f"{TOKEN_DIR}/token"
ISSUER_AUDIENCE = "etlrouter-issuer"
TOKEN_EXPIRATION_S = 3600  # the kubelet refreshes it at 80% of this

JsonPatch = list[dict[str, Any]]


class InjectionError(ValueError):
    """The pod asks for a sidecar but its annotations cannot configure one; names the annotation."""


@dataclass(frozen=True)
class SidecarTls:
    """Mutual TLS for a sidecar of a TLS cluster: its certificate comes from the operator's issuer."""

    issuer_url: str
    issuer_ca: str  # PEM: the issuer's (the webhook's) CA bundle
    trust_domain: str
    cluster: str = ""  # "NAMESPACE/NAME" of the EtlRouterCluster, written into CLUSTER_ANNOTATION


@dataclass(frozen=True)
class SidecarSpec:
    image: str
    routers: tuple[str, ...]
    scan_ports: str
    resources: Mapping[str, Any] = field(default_factory=dict)
    tls: SidecarTls | None = None


def cluster_of(pod_namespace: str, annotations: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, name) of the EtlRouterCluster a pod's sidecar belongs to, or None (a router outside
    any cluster the operator runs). `etlrouter.io/cluster` wins; else a router address that is a
    cluster's client Service (`NAME-client.NAMESPACE.svc[.cluster.local]:PORT`)."""
    named = str(annotations.get(CLUSTER_ANNOTATION) or "").strip()
    if named:
        namespace, _, name = named.rpartition("/")
        return (namespace or pod_namespace, name) if name else None
    for address in str(annotations.get(ROUTER_ANNOTATION) or "").split(","):
        host = address.strip().rpartition(":")[0] if ":" in address else address.strip()
        parts = host.split(".")
        if len(parts) >= 3 and parts[0].endswith("-client") and parts[2] == "svc" and parts[0] != "-client":
            return parts[1], parts[0][: -len("-client")]
    return None


def wants_injection(pod: Mapping[str, Any]) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(INJECT_ANNOTATION, "")).lower() == "true"


def has_sidecar(pod: Mapping[str, Any]) -> bool:
    containers = (pod.get("spec") or {}).get("containers") or []
    return any(isinstance(c, dict) and c.get("name") == SIDECAR_NAME for c in containers)


def sidecar_spec_from_annotations(annotations: Mapping[str, Any], *, image: str) -> SidecarSpec:
    """The sidecar a pod's annotations ask for; InjectionError names the bad annotation."""
    raw_routers = str(annotations.get(ROUTER_ANNOTATION) or "").strip()
    if not raw_routers:
        raise InjectionError(
            f"annotation {ROUTER_ANNOTATION} is required (HOST:PORT of a router, or several, comma-separated)"
        )
    routers = tuple(part.strip() for part in raw_routers.split(",") if part.strip())
    for address in routers:
        try:
            split_address(address)
        except ValueError as e:
            raise InjectionError(f"annotation {ROUTER_ANNOTATION}: {e}") from None
    ports = str(annotations.get(PORTS_ANNOTATION) or "").strip()
    if not ports:
        raise InjectionError(f'annotation {PORTS_ANNOTATION} is required (e.g. "50051" or "50051-50060")')
    try:
        parse_port_list(ports)
    except ValueError as e:
        raise InjectionError(f"annotation {PORTS_ANNOTATION}: {e}") from None
    return SidecarSpec(image=image, routers=routers, scan_ports=ports)


def sidecar_container(spec: SidecarSpec) -> dict[str, Any]:
    router_args = [arg for address in spec.routers for arg in ("--router", address)]
    env = [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # The data-plane server binds the pod IP, which is also the address it registers for peers.
        {"name": "ETLROUTER_SIDECAR__GRPC__HOST", "value": "$(POD_IP)"},
        {"name": "ETLROUTER_SIDECAR__HTTP__HOST", "value": "0.0.0.0"},
        {"name": "ETLROUTER_SIDECAR__DATA_DIR", "value": DATA_DIR},
    ]
    mounts: list[dict[str, Any]] = [{"name": DATA_VOLUME, "mountPath": DATA_HOME}]
    scheme = "HTTP"
    if spec.tls is not None:
        # The issuer client (security/issuer_client.py) writes the pair and the CA under the data dir.
        env += [
            {"name": "ETLROUTER_TLS__ISSUER_URL", "value": spec.tls.issuer_url},
            {"name": "ETLROUTER_TLS__ISSUER_CA", "value": spec.tls.issuer_ca},
            {"name": "ETLROUTER_TLS__ISSUER_TOKEN_FILE", "value": TOKEN_FILE},
            {"name": "ETLROUTER_TLS__TRUST_DOMAIN", "value": spec.tls.trust_domain},
        ]
        mounts.append({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True})
        scheme = "HTTPS"
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": spec.image,
        "args": [
            "sidecar",
            "--id",
            "$(POD_NAME)",
            *router_args,
            "--scan-ports",
            spec.scan_ports,
            "--grpc-port",
            str(SIDECAR_GRPC_PORT),
            "--http-port",
            str(SIDECAR_HTTP_PORT),
        ],
        "env": env,
        "ports": [
            {"name": "etl-data", "containerPort": SIDECAR_GRPC_PORT, "protocol": "TCP"},
            {"name": "etl-http", "containerPort": SIDECAR_HTTP_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": SIDECAR_HTTP_PORT, "scheme": scheme},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": SIDECAR_HTTP_PORT, "scheme": scheme},
            "periodSeconds": 10,
        },
        # The image's HOME and TMPDIR (/var/lib/etlrouter) are on the data volume: the root stays read-only.
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.resources:
        container["resources"] = copy.deepcopy(dict(spec.resources))
    return container


def token_volume() -> dict[str, Any]:
    """A ServiceAccount token bound to the pod, for the issuer only (its audience): the issuer reads the
    pod's name and uid from it (TokenReview), so a sidecar can only get its own pod's certificate."""
    source = {"audience": ISSUER_AUDIENCE, "expirationSeconds": TOKEN_EXPIRATION_S, "path": "token"}
    return {"name": TOKEN_VOLUME, "projected": {"sources": [{"serviceAccountToken": source}]}}


def _escape(key: str) -> str:
    """A JSON-pointer token (RFC 6901): annotation keys contain '/'."""
    return key.replace("~", "~0").replace("/", "~1")


def inject_sidecar(pod: Mapping[str, Any], spec: SidecarSpec) -> JsonPatch:
    """The JSON patch that adds the sidecar container, its data volume and the `injected` annotation.

    Idempotent: a pod that already has the sidecar container gets an empty patch.
    """
    if has_sidecar(pod):
        return []
    pod_spec = pod.get("spec") or {}
    patch: JsonPatch = []
    if "containers" not in pod_spec:
        patch.append({"op": "add", "path": "/spec/containers", "value": [sidecar_container(spec)]})
    else:
        patch.append({"op": "add", "path": "/spec/containers/-", "value": sidecar_container(spec)})
    wanted = [{"name": DATA_VOLUME, "emptyDir": {}}]
    if spec.tls is not None:
        wanted.append(token_volume())
    volumes = pod_spec.get("volumes")
    have = {v.get("name") for v in volumes or [] if isinstance(v, dict)}
    missing = [v for v in wanted if v["name"] not in have]
    if not volumes:
        patch.append({"op": "add", "path": "/spec/volumes", "value": missing})
    else:
        patch += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in missing]
    annotations = (pod.get("metadata") or {}).get("annotations")
    added = {INJECTED_ANNOTATION: "true"}
    if spec.tls is not None and spec.tls.cluster and CLUSTER_ANNOTATION not in (annotations or {}):
        added[CLUSTER_ANNOTATION] = spec.tls.cluster  # the issuer finds the pod's cluster by it
    if annotations is None:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": added})
    else:
        for key, value in added.items():
            patch.append({"op": "add", "path": f"/metadata/annotations/{_escape(key)}", "value": value})
    return patch


def apply_patch(obj: Mapping[str, Any], patch: JsonPatch) -> dict[str, Any]:
    """Apply the `add` operations `inject_sidecar` produces to a copy of `obj` (a pod template)."""
    out: dict[str, Any] = copy.deepcopy(dict(obj))
    for op in patch:
        if op.get("op") != "add":
            raise ValueError(f"apply_patch supports only `add`, got {op.get('op')!r}")
        tokens = [t.replace("~1", "/").replace("~0", "~") for t in str(op["path"]).split("/")[1:]]
        target: Any = out
        for token in tokens[:-1]:
            target = target[int(token)] if isinstance(target, list) else target.setdefault(token, {})
        last, value = tokens[-1], copy.deepcopy(op["value"])
        if isinstance(target, list):
            if last == "-":
                target.append(value)
            else:
                target.insert(int(last), value)
        else:
            target[last] = value
    return out
