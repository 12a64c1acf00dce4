"""The router cluster's PodMonitor: what it selects and how it authenticates, and that it is applied only
where the Prometheus Operator's CRD exists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from etlrouter.operator import kube, monitoring
from etlrouter.operator.cluster import selector

CLUSTER = {
    "apiVersion": "etlrouter.io/v1alpha1",
    "kind": "EtlRouterCluster",
    "metadata": {"name": "main", "namespace": "etl", "uid": "u-1"},
    "spec": {},
}
SHIPPED = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "podmonitors.yaml"


def test_the_pod_monitor_scrapes_this_clusters_routers_over_https_with_the_token() -> None:
    pm = monitoring.desired_pod_monitor(CLUSTER)
    assert (pm["metadata"]["name"], pm["metadata"]["namespace"]) == ("main-routers", "etl")
    assert pm["metadata"]["ownerReferences"][0]["uid"] == "u-1"  # deleted with the cluster
    assert pm["spec"]["selector"] == {"matchLabels": selector("main")}
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    # The same TLS and authorization as the shipped PodMonitor for routers.
    shipped = next(
        d for d in yaml.safe_load_all(SHIPPED.read_text()) if d["metadata"]["name"] == "etlrouter-routers"
    )
    expected = shipped["spec"]["podMetricsEndpoints"][0]
    for key in ("port", "path", "scheme", "tlsConfig", "authorization"):
        assert endpoint[key] == expected[key], key
    assert {"targetLabel": "etlrouter_cluster", "replacement": "main"} in endpoint["relabelings"]


@pytest.mark.parametrize("crd_present", [True, False])
async def test_it_is_applied_only_when_the_crd_exists(
    monkeypatch: pytest.MonkeyPatch, crd_present: bool
) -> None:
    applied: list[dict[str, Any]] = []

    async def get(api: Any, res: kube.Resource, namespace: str, name: str) -> dict[str, Any] | None:
        assert (res.plural, name) == ("customresourcedefinitions", monitoring.POD_MONITOR_CRD)
        return {"metadata": {"name": name}} if crd_present else None

    async def apply(api: Any, manifest: dict[str, Any]) -> dict[str, Any]:
        applied.append(manifest)
        return manifest

    monkeypatch.setattr(kube, "get", get)
    monkeypatch.setattr(kube, "apply", apply)
    assert await monitoring.ensure_pod_monitor(object(), CLUSTER) is crd_present
    assert [m["kind"] for m in applied] == (["PodMonitor"] if crd_present else [])
