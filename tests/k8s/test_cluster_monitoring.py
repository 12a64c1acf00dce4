"""Scraping a router cluster, on a real kube-apiserver: without the Prometheus Operator's PodMonitor CRD a
reconcile makes only the scrape credentials; with it (a minimal CRD installed here) a PodMonitor owned by
the cluster, which spec.monitoring.podMonitor false removes. The credentials the operator wrote start a
router that answers the scrape (no pods run here: the router runs as a process, as its pod would)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from etlrouter.core.config import Config
from etlrouter.operator import kube as kube_mod
from etlrouter.operator import monitoring
from etlrouter.operator.cluster import ClusterReconciler
from etlrouter.operator.controller import OperatorContext
from etlrouter.operator.kube import api_client
from etlrouter.security.authz import Permission, holds
from etlrouter.security.tokens import parse_tokens
from tests.k8s.conftest import Kube
from tests.k8s.operator_helpers import condition
from tests.k8s.test_operator_process import K8S, apply_file
from tests.security.test_metrics_scrape import (
    assert_grpc_wants_a_certificate,
    assert_scrapes,
    router_as_in_its_pod,
)

BASE = "/apis/etlrouter.io/v1alpha1"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{monitoring.POD_MONITOR_CRD}"
# Enough of the Prometheus Operator's CRD for the apiserver to store PodMonitors.
POD_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": monitoring.POD_MONITOR_CRD},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "PodMonitor",
            "listKind": "PodMonitorList",
            "plural": "podmonitors",
            "singular": "podmonitor",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                },
            }
        ],
    },
}


def pod_monitors_path(namespace: str, name: str = "") -> str:
    return f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/podmonitors" + (f"/{name}" if name else "")


def remove_crd(kube: Kube) -> None:
    kube.http.request("DELETE", CRD_PATH)
    kube.wait_for("the PodMonitor CRD gone", lambda: kube.http.get(CRD_PATH) is None, timeout=30)


@pytest.fixture
def without_pod_monitor_crd(kube: Kube) -> None:
    remove_crd(kube)


@pytest.fixture
def with_pod_monitor_crd(kube: Kube, namespace: str) -> Iterator[None]:
    status, body = kube.http.request(
        "PATCH",
        CRD_PATH + "?fieldManager=tests&force=true",
        POD_MONITOR_CRD,
        content_type="application/apply-patch+yaml",
    )
    assert status in (200, 201), body

    def served() -> bool:
        crd = kube.http.get(CRD_PATH) or {}
        established = any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (crd.get("status") or {}).get("conditions") or []
        )
        return established and kube.http.request("GET", pod_monitors_path(namespace))[0] == 200

    kube.wait_for("the PodMonitor CRD served", served)
    try:
        yield
    finally:
        remove_crd(kube)  # cluster-wide: the other tests run without it


@pytest.fixture
async def reconciler(kube: Kube, crds: list[str], namespace: str) -> AsyncIterator[ClusterReconciler]:
    api = await kube.api_client()
    ctx = OperatorContext(api=api, config=Config(), namespace=namespace)
    try:
        yield ClusterReconciler(ctx)
    finally:
        ctx.credentials.close()
        await api.close()


def create(kube: Kube, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    cr = {"apiVersion": "etlrouter.io/v1alpha1", "kind": "EtlRouterCluster", "metadata": {"name": name}}
    status, body = kube.http.request(
        "POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", {**cr, "spec": spec}
    )
    assert status == 201, body
    return dict(body)


def secret(kube: Kube, namespace: str, name: str) -> tuple[dict[str, bytes], dict[str, Any]]:
    obj = kube.http.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    assert obj is not None, f"Secret {name} missing"
    return {k: base64.b64decode(v) for k, v in obj["data"].items()}, obj["metadata"]


def owners(meta: dict[str, Any]) -> list[str]:
    return [r["uid"] for r in meta.get("ownerReferences") or []]


async def test_without_the_crd_a_reconcile_makes_no_pod_monitor_and_says_so_once(
    kube: Kube,
    namespace: str,
    without_pod_monitor_crd: None,
    reconciler: ClusterReconciler,
    caplog: pytest.LogCaptureFixture,
) -> None:
    created = create(kube, namespace, "quiet", {"replicas": 1})
    with caplog.at_level(logging.INFO, logger="etlrouter.operator.cluster"):
        await reconciler.reconcile((namespace, "quiet"))
        await reconciler.reconcile((namespace, "quiet"))
    said = [r for r in caplog.records if monitoring.POD_MONITOR_CRD in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.INFO, f"{monitoring.POD_MONITOR_CRD} absent: no PodMonitors")
    ]
    cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/quiet")
    assert cr["status"]["observedGeneration"] == 1
    assert condition(cr, "CertificatesReady")["status"] == "True"
    assert kube.http.request("GET", pod_monitors_path(namespace))[0] == 404  # no such kind at all
    # The scrape credentials exist anyway: for any Prometheus, and installing the Operator restarts nothing.
    data, meta = secret(kube, namespace, "quiet-metrics")
    assert sorted(data) == ["ca.crt", "token"] and owners(meta) == [created["metadata"]["uid"]]
    events = kube.http.get(f"/api/v1/namespaces/{namespace}/events")["items"]
    assert not [e for e in events if e["type"] == "Warning"], events


async def test_with_the_crd_the_cluster_gets_a_pod_monitor_credentials_and_routers_that_accept_them(
    kube: Kube, namespace: str, with_pod_monitor_crd: None, reconciler: ClusterReconciler, tmp_path: Path
) -> None:
    created = create(kube, namespace, "watched", {"replicas": 3})
    uid = created["metadata"]["uid"]
    await reconciler.reconcile((namespace, "watched"))

    # The PodMonitor: this cluster's router pods, over HTTPS with the cluster's metrics Secret.
    pm = kube.http.get(pod_monitors_path(namespace, "watched-routers"))
    assert pm is not None
    assert owners(pm["metadata"]) == [uid]
    assert pm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "watched"
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "watched-metrics", "key": "ca.crt"}},
        "serverName": "etlrouter-metrics",
    }
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "watched-metrics", "key": "token"},
    }
    sts = kube.http.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/watched")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert endpoint["port"] in [p["name"] for p in container["ports"]]  # Prometheus finds the port by name
    pods = sts["spec"]["template"]["metadata"]["labels"]
    assert all(pods.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())

    # The Secret Prometheus reads: the cluster's CA and a token.
    metrics, metrics_meta = secret(kube, namespace, "watched-metrics")
    assert owners(metrics_meta) == [uid]
    ca, _ = secret(kube, namespace, "watched-ca")
    assert metrics["ca.crt"] == ca["ca.crt"]
    token = metrics["token"].decode()
    assert len(token) >= 32

    # The routers' token file (mounted by every pod) makes that token a viewer.
    tokens, tokens_meta = secret(kube, namespace, "watched-router-tokens")
    assert owners(tokens_meta) == [uid]
    table = parse_tokens(tokens["tokens.csv"].decode(), "tokens.csv")
    (identity,) = table.values()
    assert holds(identity, Permission.VIEWER) and not holds(identity, Permission.EDITOR)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ETLROUTER_AUTH__TOKENS_FILE"] == "/etc/etlrouter-auth/tokens.csv"
    volumes = sts["spec"]["template"]["spec"]["volumes"]
    assert {
        "name": "tokens",
        "secret": {"secretName": "watched-router-tokens", "defaultMode": 0o440},
    } in volumes

    # Every router certificate carries the name Prometheus verifies.
    routers, _ = secret(kube, namespace, "watched-router-tls")
    for i in range(3):
        cert = x509.load_pem_x509_certificate(routers[f"watched-{i}.crt"])
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "etlrouter-metrics" in sans.get_values_for_type(x509.DNSName)

    # What the operator wrote runs a router that answers the scrape (as its pod would).
    config = kube.http.get(f"/api/v1/namespaces/{namespace}/configmaps/watched-config")
    mounts = {"/etc/etlrouter-tls": routers, "/etc/etlrouter-auth": tokens}
    with router_as_in_its_pod(
        tmp_path, "watched-0", container["env"], config["data"]["router.yaml"], mounts
    ) as router:
        assert_scrapes(router.http_port, metrics["ca.crt"], token)
        assert_grpc_wants_a_certificate(router, metrics["ca.crt"], "watched-0")

    # Another reconcile keeps the token (no rewrite of either Secret).
    await reconciler.reconcile((namespace, "watched"))
    assert secret(kube, namespace, "watched-metrics")[1]["resourceVersion"] == metrics_meta["resourceVersion"]
    assert (
        secret(kube, namespace, "watched-router-tokens")[1]["resourceVersion"]
        == tokens_meta["resourceVersion"]
    )

    # A second cluster in the namespace has its own CA, so its own Secret and token.
    create(kube, namespace, "other", {"replicas": 1})
    await reconciler.reconcile((namespace, "other"))
    other, _ = secret(kube, namespace, "other-metrics")
    assert other["token"] != metrics["token"] and other["ca.crt"] != metrics["ca.crt"]
    assert kube.http.get(pod_monitors_path(namespace, "other-routers")) is not None

    # Turned off: the PodMonitor goes; the credentials stay (other scrapers may use them).
    status, body = kube.http.request(
        "PATCH",
        f"{BASE}/namespaces/{namespace}/etlrouterclusters/watched",
        {"spec": {"monitoring": {"podMonitor": False}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    await reconciler.reconcile((namespace, "watched"))
    assert kube.http.get(pod_monitors_path(namespace, "watched-routers")) is None
    assert secret(kube, namespace, "watched-metrics")[0]["token"] == metrics["token"]
    assert kube.http.get(pod_monitors_path(namespace, "other-routers")) is not None


async def test_a_plaintext_cluster_gets_a_plain_http_pod_monitor_and_no_credentials(
    kube: Kube, namespace: str, with_pod_monitor_crd: None, reconciler: ClusterReconciler
) -> None:
    create(kube, namespace, "plain", {"replicas": 1, "tls": {"enabled": False}})
    await reconciler.reconcile((namespace, "plain"))
    pm = kube.http.get(pod_monitors_path(namespace, "plain-routers"))
    assert pm is not None
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["scheme"] == "http" and "authorization" not in endpoint and "tlsConfig" not in endpoint
    assert kube.http.get(f"/api/v1/namespaces/{namespace}/secrets/plain-metrics") is None


def service_account_kubeconfig(kube: Kube, tmp_path: Path) -> Path:
    """A kubeconfig with the token of the operator's ServiceAccount (k8s/operator/rbac.yaml applied)."""
    for name in ("namespace.yaml", "rbac.yaml"):
        apply_file(kube, K8S / "operator" / name)

    def sa_token() -> str | None:
        sa = kube.http.get("/api/v1/namespaces/etlrouter-system/serviceaccounts/etlrouter-operator")
        for ref in (sa or {}).get("secrets") or []:
            found = kube.http.get(f"/api/v1/namespaces/etlrouter-system/secrets/{ref['name']}")
            if found and "token" in found.get("data", {}):
                return base64.b64decode(found["data"]["token"]).decode()
        return None

    token = kube.wait_for("the ServiceAccount token", sa_token)
    config = json.loads(Path(kube.kubeconfig).read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    path = tmp_path / "sa-kubeconfig"
    path.write_text(json.dumps(config))
    return path


async def test_the_operators_cluster_role_is_enough_for_the_pod_monitor_and_the_secrets(
    kube: Kube, crds: list[str], namespace: str, with_pod_monitor_crd: None, tmp_path: Path
) -> None:
    api = await api_client(str(service_account_kubeconfig(kube, tmp_path)))
    ctx = OperatorContext(api=api, config=Config(), namespace=namespace)
    try:
        reconciler = ClusterReconciler(ctx)
        create(kube, namespace, "rbac", {"replicas": 1})
        await reconciler.reconcile((namespace, "rbac"))  # create (a 403 would raise)
        await reconciler.reconcile((namespace, "rbac"))  # patch
        assert kube.http.get(pod_monitors_path(namespace, "rbac-routers")) is not None
        assert secret(kube, namespace, "rbac-metrics")[0]["token"]
        status, body = kube.http.request(
            "PATCH",
            f"{BASE}/namespaces/{namespace}/etlrouterclusters/rbac",
            {"spec": {"monitoring": {"podMonitor": False}}},
            content_type="application/merge-patch+json",
        )
        assert status == 200, body
        await reconciler.reconcile((namespace, "rbac"))  # delete
        assert kube.http.get(pod_monitors_path(namespace, "rbac-routers")) is None
    finally:
        ctx.credentials.close()
        await api.close()


async def test_a_pod_monitor_the_operator_may_not_write_is_a_warning_not_a_failed_reconcile(
    kube: Kube,
    namespace: str,
    with_pod_monitor_crd: None,
    reconciler: ClusterReconciler,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def forbidden(*args: Any, **kwargs: Any) -> bool:
        raise kube_mod.KubeError(403, "Forbidden", "podmonitors is forbidden")

    monkeypatch.setattr(monitoring, "ensure_pod_monitor", forbidden)
    create(kube, namespace, "old-role", {"replicas": 1})
    await reconciler.reconcile((namespace, "old-role"))
    cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/old-role")
    assert cr["status"]["observedGeneration"] == 1
    events = kube.http.get(f"/api/v1/namespaces/{namespace}/events")["items"]
    (warning,) = [e for e in events if e["reason"] == "PodMonitorFailed"]
    assert warning["type"] == "Warning" and "403 Forbidden" in warning["message"]
