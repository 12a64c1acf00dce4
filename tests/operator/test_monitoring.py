"""The router cluster's PodMonitor: what it selects and how it authenticates, that it is applied only
where the Prometheus Operator's CRD exists; the routers' token file and spec.monitoring."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from etlrouter.operator import kube, monitoring
from etlrouter.operator.cluster import SpecError, desired_objects, parse_spec, selector
from etlrouter.security.authz import Permission, holds
from etlrouter.security.tokens import parse_tokens

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


async def test_turned_off_it_deletes_the_pod_monitor_and_applies_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deleted: list[tuple[str, str, str]] = []

    async def delete(api: Any, res: kube.Resource, namespace: str, name: str) -> bool:
        deleted.append((res.plural, namespace, name))
        return True

    async def apply(api: Any, manifest: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("nothing is applied")

    monkeypatch.setattr(kube, "delete", delete)
    monkeypatch.setattr(kube, "apply", apply)
    assert not await monitoring.ensure_pod_monitor(object(), CLUSTER, enabled=False, crd_present=True)
    assert deleted == [("podmonitors", "etl", "main-routers")]
    deleted.clear()
    assert not await monitoring.ensure_pod_monitor(object(), CLUSTER, enabled=False, crd_present=False)
    assert deleted == []


def test_the_operators_pod_monitor_uses_the_clusters_own_secret_and_plain_http_without_tls() -> None:
    endpoint = monitoring.desired_pod_monitor(CLUSTER, None)["spec"]["podMetricsEndpoints"][0]
    assert endpoint["tlsConfig"]["ca"] == {"secret": {"name": "main-metrics", "key": "ca.crt"}}
    assert endpoint["authorization"]["credentials"] == {"name": "main-metrics", "key": "token"}
    plain = monitoring.desired_pod_monitor(CLUSTER, tls=False)["spec"]["podMetricsEndpoints"][0]
    assert plain["scheme"] == "http" and "tlsConfig" not in plain and "authorization" not in plain


def test_the_routers_token_file_makes_the_scrape_token_a_viewer_and_nothing_more() -> None:
    token = "t" * monitoring.MIN_TOKEN_CHARS
    table = parse_tokens(monitoring.tokens_csv(token), "tokens.csv")
    assert len(table) == 1
    identity = next(iter(table.values()))
    assert holds(identity, Permission.VIEWER)
    assert not holds(identity, Permission.TAP) and not holds(identity, Permission.EDITOR)


def router_pod(cr: dict[str, Any]) -> dict[str, Any]:
    objects = desired_objects(cr, bootstrap_peers="", statefulset_replicas=1, pdb_api_version="policy/v1")
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    return dict(sts["spec"]["template"]["spec"])


def test_tls_routers_mount_the_token_file_and_serve_http_on_the_port_the_pod_monitor_names() -> None:
    pod = router_pod(CLUSTER)
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ETLROUTER_AUTH__TOKENS_FILE"] == "/etc/etlrouter-auth/tokens.csv"
    assert env["ETLROUTER_AUTH__GRPC_TOKENS"] == "false"  # gRPC still requires a client certificate
    assert {"name": "tokens", "secret": {"secretName": "main-router-tokens", "defaultMode": 0o440}} in pod[
        "volumes"
    ]
    assert {"name": "tokens", "mountPath": "/etc/etlrouter-auth", "readOnly": True} in container[
        "volumeMounts"
    ]
    port = monitoring.desired_pod_monitor(CLUSTER)["spec"]["podMetricsEndpoints"][0]["port"]
    assert {"name": port, "containerPort": 7480, "protocol": "TCP"} in container["ports"]

    plain = router_pod({**CLUSTER, "spec": {"tls": {"enabled": False}}})
    assert all(v["name"] != "tokens" for v in plain["volumes"])
    assert not any(e["name"].startswith("ETLROUTER_AUTH__") for e in plain["containers"][0]["env"])


def test_spec_monitoring_pod_monitor_defaults_on_and_a_wrong_value_names_the_field() -> None:
    assert parse_spec(CLUSTER).pod_monitor is True
    assert parse_spec({**CLUSTER, "spec": {"monitoring": {"podMonitor": False}}}).pod_monitor is False
    with pytest.raises(SpecError, match=r"^spec\.monitoring\.podMonitor: expected true or false"):
        parse_spec({**CLUSTER, "spec": {"monitoring": {"podMonitor": "yes"}}})
    with pytest.raises(SpecError, match=r"^spec\.monitoring: expected an object"):
        parse_spec({**CLUSTER, "spec": {"monitoring": True}})
