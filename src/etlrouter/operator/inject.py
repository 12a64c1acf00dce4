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
SIDECAR_NAME = "etlrouter-sidecar"
DATA_VOLUME = "etlrouter-sidecar-data"
SIDECAR_GRPC_PORT = 7500
SIDECAR_HTTP_PORT = 7580
DATA_HOME = "/var/lib/etlrouter"  # the image's HOME and data directory
DATA_DIR = f"{DATA_HOME}/sidecar"

JsonPatch = list[dict[str, Any]]


class InjectionError(ValueError):
    """The pod asks for a sidecar but its annotations cannot configure one; names the annotation."""


@dataclass(frozen=True)
class SidecarSpec:
    image: str
    routers: tuple[str, ...]
    scan_ports: str
    resources: Mapping[str, Any] = field(default_factory=dict)


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
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": SIDECAR_HTTP_PORT}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": SIDECAR_HTTP_PORT}, "periodSeconds": 10},
        # The image's HOME and TMPDIR (/var/lib/etlrouter) are on the data volume: the root stays read-only.
        "volumeMounts": [{"name": DATA_VOLUME, "mountPath": DATA_HOME}],
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
    volume = {"name": DATA_VOLUME, "emptyDir": {}}
    volumes = pod_spec.get("volumes")
    if not volumes:
        patch.append({"op": "add", "path": "/spec/volumes", "value": [volume]})
    elif not any(v.get("name") == DATA_VOLUME for v in volumes if isinstance(v, dict)):
        patch.append({"op": "add", "path": "/spec/volumes/-", "value": volume})
    annotations = (pod.get("metadata") or {}).get("annotations")
    if annotations is None:
        patch.append({"op": "add", "path": "/metadata/annotations", "value": {INJECTED_ANNOTATION: "true"}})
    else:
        path = f"/metadata/annotations/{_escape(INJECTED_ANNOTATION)}"
        patch.append({"op": "add", "path": path, "value": "true"})
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
