"""The operator's only door to the Kubernetes API: raw JSON requests through kubernetes-asyncio's ApiClient.

Objects are plain dicts (what the apiserver sends), never the generated model classes: the operator reads
and writes a few fields of many kinds, and dicts keep one code path for custom and built-in objects.
Every response body is read with a size bound. Every write of an owned object goes through `apply`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote, urlencode

from kubernetes_asyncio import client, config

log = logging.getLogger(__name__)

GROUP = "etlrouter.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KINDS: dict[str, str] = {
    "EtlRouterCluster": "etlrouterclusters",
    "EtlPipeline": "etlpipelines",
    "EtlSource": "etlsources",
    "EtlTransform": "etltransforms",
    "EtlSink": "etlsinks",
}
PLURAL_KINDS = {plural: kind for kind, plural in KINDS.items()}
FIELD_MANAGER = "etlrouter-operator"
COMPONENT = "etlrouter-operator"

# etcd refuses objects above 1.5 MiB; a list page of 500 of them is the largest honest answer.
MAX_RESPONSE_BYTES = 64 << 20
# One watch event is one object.
MAX_WATCH_LINE_BYTES = 4 << 20

ApiClient = client.ApiClient


class KubeError(Exception):
    """A non-2xx answer from the apiserver: `status` (HTTP), `reason` (e.g. NotFound), `message`."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


@dataclass(frozen=True)
class Resource:
    """Where a kind lives in the REST API."""

    api_version: str  # "v1", "apps/v1", "etlrouter.io/v1alpha1"
    plural: str
    namespaced: bool = True

    def path(self, namespace: str = "", name: str = "", subresource: str = "") -> str:
        base = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{quote(namespace, safe='')}")
        parts.append(self.plural)
        if name:
            parts.append(quote(name, safe=""))
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


def custom(plural: str) -> Resource:
    if plural not in PLURAL_KINDS:
        raise ValueError(f"{plural!r} is not one of the operator's resources {sorted(PLURAL_KINDS)}")
    return Resource(API_VERSION, plural)


def resource_of(api_version: str, kind: str) -> Resource:
    """The REST resource of a kind: every kind the operator touches pluralises by adding "s"."""
    cluster_scoped = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"}
    cluster_scoped |= {"MutatingWebhookConfiguration", "ValidatingWebhookConfiguration"}
    return Resource(api_version, kind.lower() + "s", namespaced=kind not in cluster_scoped)


class KubeConfigError(Exception):
    """No usable client configuration; the message says which source was tried and why it failed."""


async def api_client(kubeconfig: str | None) -> ApiClient:
    """A client from a kubeconfig file, else (None) from the pod's service account."""
    if kubeconfig:
        try:
            return await config.new_client_from_config(config_file=kubeconfig)
        except Exception as e:  # the loader raises anything from KeyError to TypeError on a bad file
            raise KubeConfigError(f"kubeconfig {kubeconfig}: not a usable kubeconfig ({e!r})") from None
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException as e:
        raise KubeConfigError(f"no --kubeconfig given and not running in a pod: {e}") from None
    return client.ApiClient(configuration)


async def _read_bounded(resp: Any, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            resp.close()
            raise KubeError(0, "TooLarge", f"response exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _open(
    api: ApiClient,
    method: str,
    path: str,
    body: Any,
    query: Mapping[str, Any] | None,
    content_type: str,
    timeout: float | None,
) -> Any:
    headers = {"Content-Type": content_type, "Accept": "application/json"}
    if query:
        path = f"{path}?{urlencode({k: v for k, v in query.items() if v is not None})}"
    return await api.call_api(
        path,
        method,
        header_params=headers,
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=timeout,
    )


def _error(status: int, raw: bytes) -> KubeError:
    try:
        doc = json.loads(raw)
        return KubeError(status, str(doc.get("reason", "")), str(doc.get("message", raw[:500])))
    except (ValueError, AttributeError):
        return KubeError(status, "", raw[:500].decode(errors="replace"))


async def request(
    api: ApiClient,
    method: str,
    path: str,
    *,
    body: Any = None,
    query: Mapping[str, Any] | None = None,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> Any:
    """One request; the decoded JSON answer, or KubeError for any non-2xx answer."""
    resp = await _open(api, method, path, body, query, content_type, timeout)
    try:
        raw = await _read_bounded(resp, MAX_RESPONSE_BYTES)
    finally:
        resp.release()
    if not 200 <= resp.status < 300:
        raise _error(resp.status, raw)
    return json.loads(raw) if raw else None


async def watch_lines(
    api: ApiClient, path: str, query: Mapping[str, Any], timeout: float
) -> AsyncIterator[dict[str, Any]]:
    """The events of one watch request (`?watch=1`), each a decoded line, each line bounded in size."""
    resp = await _open(api, "GET", path, None, {**query, "watch": "1"}, "application/json", timeout)
    try:
        if resp.status != 200:
            raise _error(resp.status, await _read_bounded(resp, 1 << 16))
        buf = b""
        async for chunk in resp.content.iter_any():
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                line, buf = buf[:nl], buf[nl + 1 :]
                if line.strip():
                    yield json.loads(line)
            if len(buf) > MAX_WATCH_LINE_BYTES:
                raise KubeError(0, "TooLarge", f"watch event exceeds {MAX_WATCH_LINE_BYTES} bytes")
    finally:
        resp.release()


async def get(api: ApiClient, res: Resource, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = await request(api, "GET", res.path(namespace, name))
    except KubeError as e:
        if e.status == 404:
            return None
        raise
    return obj


async def list_objects(
    api: ApiClient, res: Resource, namespace: str = "", *, label_selector: str | None = None
) -> tuple[list[dict[str, Any]], str]:
    """Every object (paged by 500) and the list's resourceVersion, to start a watch from."""
    items: list[dict[str, Any]] = []
    cont: str | None = None
    while True:
        page = await request(
            api,
            "GET",
            res.path(namespace),
            query={"limit": 500, "continue": cont, "labelSelector": label_selector},
        )
        items.extend(page.get("items") or [])
        cont = (page.get("metadata") or {}).get("continue")
        if not cont:
            return items, str((page.get("metadata") or {}).get("resourceVersion", ""))


async def delete(api: ApiClient, res: Resource, namespace: str, name: str) -> bool:
    """Delete with background propagation; False when it was already gone."""
    try:
        await request(api, "DELETE", res.path(namespace, name), body={"propagationPolicy": "Background"})
    except KubeError as e:
        if e.status == 404:
            return False
        raise
    return True


async def get_object(api: ApiClient, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
    """One of the operator's custom objects, or None when it does not exist."""
    return await get(api, custom(plural), namespace, name)


async def patch_object(
    api: ApiClient, plural: str, namespace: str, name: str, patch: dict[str, Any]
) -> dict[str, Any]:
    """JSON merge-patch of a custom object (spec, metadata)."""
    obj: dict[str, Any] = await request(
        api,
        "PATCH",
        custom(plural).path(namespace, name),
        body=patch,
        content_type="application/merge-patch+json",
    )
    return obj


async def patch_status(
    api: ApiClient, plural: str, namespace: str, name: str, status: dict[str, Any]
) -> None:
    """JSON merge-patch of the /status subresource (status on the main endpoint is ignored by the server)."""
    await request(
        api,
        "PATCH",
        custom(plural).path(namespace, name, "status"),
        body={"status": status},
        content_type="application/merge-patch+json",
    )


def owner_reference(obj: dict[str, Any]) -> dict[str, Any]:
    """This object as the controlling owner of another (GC deletes the owned one with it)."""
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


async def apply(
    api: ApiClient, manifest: dict[str, Any], field_manager: str = FIELD_MANAGER
) -> dict[str, Any]:
    """Create or update a built-in object to match `manifest`: server-side apply, forced.

    Idempotent: applying the same manifest again changes nothing (no new resourceVersion). Fields the
    manifest omits that this manager set before are removed; fields other managers own are left alone.
    """
    meta = manifest["metadata"]
    res = resource_of(manifest["apiVersion"], manifest["kind"])
    obj: dict[str, Any] = await request(
        api,
        "PATCH",
        res.path(meta.get("namespace", ""), meta["name"]),
        body=manifest,
        query={"fieldManager": field_manager, "force": "true"},
        content_type="application/apply-patch+yaml",
    )
    return obj


_EVENT_NAME = re.compile(r"[^a-z0-9.-]")


async def record_event(
    api: ApiClient,
    obj: dict[str, Any],
    type_: Literal["Normal", "Warning"],
    reason: str,
    message: str,
) -> None:
    """A core/v1 Event about `obj`. An identical event (same object, reason, message) is bumped, not
    repeated, so a reconcile that fails the same way every few seconds does not flood the namespace."""
    meta = obj["metadata"]
    namespace = meta.get("namespace") or "default"
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # A stable name per (object, reason, message): the dedup key, and bounded (names ≤ 253 chars).
    digest = hashlib.sha256(f"{meta.get('uid')}\0{reason}\0{message}".encode()).hexdigest()[:10]
    name = _EVENT_NAME.sub("-", f"{meta['name'][:200]}.{reason.lower()[:30]}.{digest}")
    events = Resource("v1", "events")
    message = message[:1024]
    existing = await get(api, events, namespace, name)
    if existing is not None:
        patch = {"count": int(existing.get("count") or 1) + 1, "lastTimestamp": now}
        try:
            await request(
                api,
                "PATCH",
                events.path(namespace, name),
                body=patch,
                content_type="application/merge-patch+json",
            )
            return
        except KubeError as e:
            if e.status != 404:
                raise
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": namespace},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta["name"],
            "namespace": namespace,
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": type_,
        "reason": reason,
        "message": message,
        "count": 1,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": os.environ.get("HOSTNAME", COMPONENT),
    }
    try:
        await request(api, "POST", events.path(namespace), body=event)
    except KubeError as e:
        if e.status != 409:  # a concurrent reconcile created it first: fine
            raise


async def server_minor_version(api: ApiClient) -> int:
    """The apiserver's minor version (20 for v1.20.2); decides policy/v1beta1 vs policy/v1 PDBs."""
    info = await request(api, "GET", "/version")
    return int(re.sub(r"\D.*$", "", str(info.get("minor", "0"))) or 0)
