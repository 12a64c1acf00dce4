"""The CRDs of k8s/crds against a real kube-apiserver: install, defaults, validation messages, status."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from etlrouter import __version__
from tests.k8s.conftest import Kube

CRD_DIR = Path(__file__).resolve().parents[2] / "k8s" / "crds"
BASE = "/apis/etlrouter.io/v1alpha1"


def _cr(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "etlrouter.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_every_crd_is_established_with_short_names_and_status(kube: Kube, crds: list[str]) -> None:
    assert sorted(crds) == sorted(
        f"{p}.etlrouter.io"
        for p in ("etlrouterclusters", "etlpipelines", "etlsources", "etltransforms", "etlsinks")
    )
    discovery = kube.http.get(BASE)
    resources = {r["name"]: r for r in discovery["resources"]}
    short = {name: r.get("shortNames") for name, r in resources.items() if "/" not in name}
    assert short == {
        "etlrouterclusters": ["erc"],
        "etlpipelines": ["epl"],
        "etlsources": ["esrc"],
        "etltransforms": ["etr"],
        "etlsinks": ["esnk"],
    }
    # Every kind has a /status subresource, and every one is namespaced.
    assert {name for name in resources if name.endswith("/status")} == {f"{p}/status" for p in short}
    assert all(r["namespaced"] for r in resources.values())


def test_workload_crds_share_one_schema() -> None:
    def version(plural: str) -> dict[str, Any]:
        doc = yaml.safe_load((CRD_DIR / f"{plural}.yaml").read_text())
        return dict(doc["spec"]["versions"][0])

    first, *rest = (version(p) for p in ("etlsources", "etltransforms", "etlsinks"))
    for other in rest:
        assert other == first


def test_cluster_defaults_are_filled_in(kube: Kube, crds: list[str], namespace: str) -> None:
    status, body = kube.http.request(
        "POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", _cr("EtlRouterCluster", "c1", {})
    )
    assert status == 201, body
    assert body["spec"] == {
        "replicas": 3,
        "image": f"etlrouter:{__version__}",
        "storage": {"size": "1Gi"},
        "tls": {"enabled": True},  # secure by default
        "ports": {"grpc": 7400, "http": 7480, "raft": 7450},
        "monitoring": {"podMonitor": True},  # where the Prometheus Operator's CRD exists
    }


def test_unknown_fields_are_pruned_and_status_is_a_subresource(
    kube: Kube, crds: list[str], namespace: str
) -> None:
    cr = _cr("EtlSink", "s1", {"cluster": "main", "image": "sink:1", "port": 50051, "bogus": "x"})
    cr["status"] = {"readyReplicas": 5}
    status, body = kube.http.request("POST", f"{BASE}/namespaces/{namespace}/etlsinks", cr)
    assert status == 201, body
    assert "bogus" not in body["spec"]
    assert body["spec"]["replicas"] == 1  # the default
    assert "status" not in body or body["status"].get("readyReplicas") is None  # ignored on create
    status, body = kube.http.request(
        "PATCH",
        f"{BASE}/namespaces/{namespace}/etlsinks/s1/status",
        {"status": {"readyReplicas": 2}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    assert body["status"]["readyReplicas"] == 2
    assert body["metadata"]["generation"] == 1  # status writes do not bump the generation


PIPELINE = {"cluster": "main", "dsl": "pipeline p { source a | sink b }"}
SOURCE = {"cluster": "main", "image": "src:1", "port": 50051}
INVALID: list[tuple[str, str, dict[str, Any], list[str]]] = [
    ("etlrouterclusters", "EtlRouterCluster", {"replicas": 9}, ["spec.replicas", "less than or equal to 7"]),
    (
        "etlrouterclusters",
        "EtlRouterCluster",
        {"replicas": 0},
        ["spec.replicas", "greater than or equal to 1"],
    ),
    ("etlrouterclusters", "EtlRouterCluster", {"replicas": "three"}, ["spec.replicas", "integer"]),
    ("etlrouterclusters", "EtlRouterCluster", {"image": ""}, ["spec.image"]),
    ("etlrouterclusters", "EtlRouterCluster", {"storage": {"size": "lots"}}, ["spec.storage.size"]),
    ("etlrouterclusters", "EtlRouterCluster", {"ports": {"grpc": 70000}}, ["spec.ports.grpc"]),
    ("etlrouterclusters", "EtlRouterCluster", {"tls": {"enabled": "yes"}}, ["spec.tls.enabled", "boolean"]),
    (
        "etlrouterclusters",
        "EtlRouterCluster",
        {"monitoring": {"podMonitor": "yes"}},
        ["spec.monitoring.podMonitor", "boolean"],
    ),
    ("etlpipelines", "EtlPipeline", {"cluster": "main"}, ["spec.dsl", "Required value"]),
    ("etlpipelines", "EtlPipeline", {**PIPELINE, "dsl": ""}, ["spec.dsl"]),
    ("etlpipelines", "EtlPipeline", {"dsl": "x"}, ["spec", "oneOf"]),
    ("etlpipelines", "EtlPipeline", {**PIPELINE, "router": "127.0.0.1:7400"}, ["spec", "oneOf"]),
    ("etlpipelines", "EtlPipeline", {**PIPELINE, "cluster": "Not_A_Name"}, ["spec.cluster"]),
    ("etlpipelines", "EtlPipeline", {"router": "no-port", "dsl": "x"}, ["spec.router"]),
    ("etlsources", "EtlSource", {**SOURCE, "port": 70000}, ["spec.port", "less than or equal to 65535"]),
    ("etlsources", "EtlSource", {"cluster": "main", "port": 50051}, ["spec.image", "Required value"]),
    ("etltransforms", "EtlTransform", {"cluster": "main", "image": "t:1"}, ["spec.port", "Required value"]),
    ("etlsinks", "EtlSink", {**SOURCE, "replicas": -1}, ["spec.replicas"]),
    ("etlsinks", "EtlSink", {**SOURCE, "config": {"batch": 5}}, ["spec.config.batch", "string"]),
    ("etlsinks", "EtlSink", {**SOURCE, "env": [{"value": "x"}]}, ["spec.env.name", "Required value"]),
]


@pytest.mark.parametrize(
    ("plural", "kind", "spec", "needles"), INVALID, ids=[f"{c[0]}-{i}" for i, c in enumerate(INVALID)]
)
def test_invalid_specs_are_rejected_naming_the_field(
    kube: Kube,
    crds: list[str],
    namespace: str,
    plural: str,
    kind: str,
    spec: dict[str, Any],
    needles: list[str],
) -> None:
    status, body = kube.http.request(
        "POST", f"{BASE}/namespaces/{namespace}/{plural}", _cr(kind, "bad", copy.deepcopy(spec))
    )
    assert status == 422, body
    message = body["message"]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_printer_columns_show_state(kube: Kube, crds: list[str], namespace: str) -> None:
    status, body = kube.http.request(
        "POST",
        f"{BASE}/namespaces/{namespace}/etlrouterclusters",
        _cr("EtlRouterCluster", "c2", {"replicas": 5}),
    )
    assert status == 201, body
    kube.http.request(
        "PATCH",
        f"{BASE}/namespaces/{namespace}/etlrouterclusters/c2/status",
        {"status": {"readyReplicas": 4, "leader": "c2-1"}},
        content_type="application/merge-patch+json",
    )
    # What `kubectl get erc` shows: the server-side table.
    status, table = kube.http.request(
        "GET",
        f"{BASE}/namespaces/{namespace}/etlrouterclusters",
        accept="application/json;as=Table;v=v1;g=meta.k8s.io",
    )
    assert status == 200, table
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns[:5] == ["Name", "Replicas", "Ready-Replicas", "Leader", "Ready"]
    assert table["rows"][0]["cells"][:4] == ["c2", 5, 4, "c2-1"]
