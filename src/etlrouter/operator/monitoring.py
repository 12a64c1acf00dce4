"""The PodMonitor of a router cluster, for clusters that run the Prometheus Operator (kube-prometheus).

Self-contained: `ensure_pod_monitor(api, cluster)` applies it when the PodMonitor CRD exists and does
nothing otherwise, so a cluster without the Prometheus Operator is not an error. The manifest matches
k8s/monitoring/podmonitors.yaml (HTTPS, the cluster's CA and a viewer token from the Secret
`etlrouter-metrics`), narrowed to this cluster's pods and owned by its EtlRouterCluster, so it goes away
with it. Wiring (one call, in the cluster reconciler after the cluster's own objects are applied):

    await monitoring.ensure_pod_monitor(api, cr)

The operator's ClusterRole then needs `get` on customresourcedefinitions (apiextensions.k8s.io) and
`get, patch` on podmonitors (monitoring.coreos.com).
"""

from __future__ import annotations

from typing import Any

from etlrouter.operator import kube
from etlrouter.operator.cluster import labels, selector

POD_MONITOR_CRD = "podmonitors.monitoring.coreos.com"
CRDS = kube.Resource("apiextensions.k8s.io/v1", "customresourcedefinitions", namespaced=False)
METRICS_SECRET = "etlrouter-metrics"  # keys: ca.crt (the cluster's CA), token (a viewer bearer token)
SERVER_NAME = "etlrouter-metrics"  # the DNS SAN every serving certificate carries for scrapers


def pod_monitor_name(cluster_name: str) -> str:
    return f"{cluster_name}-routers"


def desired_pod_monitor(
    cluster: dict[str, Any], secret: str = METRICS_SECRET, interval: str = "15s"
) -> dict[str, Any]:
    """The PodMonitor scraping every router of `cluster` (an EtlRouterCluster object)."""
    meta = cluster["metadata"]
    name, namespace = meta["name"], meta.get("namespace", "default")
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": pod_monitor_name(name),
            "namespace": namespace,
            "labels": labels(name),
            "ownerReferences": [kube.owner_reference(cluster)],
        },
        "spec": {
            "selector": {"matchLabels": selector(name)},
            "podMetricsEndpoints": [
                {
                    "port": "http",
                    "path": "/metrics",
                    "interval": interval,
                    "scheme": "https",
                    "tlsConfig": {
                        "ca": {"secret": {"name": secret, "key": "ca.crt"}},
                        "serverName": SERVER_NAME,
                    },
                    "authorization": {"type": "Bearer", "credentials": {"name": secret, "key": "token"}},
                    "relabelings": [
                        {"targetLabel": "etlrouter_cluster", "replacement": name},
                        {"targetLabel": "etlrouter_role", "replacement": "router"},
                    ],
                }
            ],
        },
    }


async def ensure_pod_monitor(api: Any, cluster: dict[str, Any]) -> bool:
    """Apply the cluster's PodMonitor if the Prometheus Operator's CRD exists; whether it did."""
    if await kube.get(api, CRDS, "", POD_MONITOR_CRD) is None:
        return False
    await kube.apply(api, desired_pod_monitor(cluster))
    return True
