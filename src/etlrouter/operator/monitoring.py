"""Scraping a router cluster: its metrics credentials, and its PodMonitor for the Prometheus Operator.

Two parts, both called by the cluster reconciler (cluster.py, docs/observability.md):
- `ensure_metrics_credentials` (TLS clusters, before the StatefulSet is applied: the pods mount it): the
  Secret `<cluster>-metrics` holds what a scraper needs, `ca.crt` (the cluster's CA bundle) and `token` (a
  random bearer token, made once and kept); the Secret `<cluster>-router-tokens` holds the routers' token
  file (`tokens.csv`, security/tokens.py's format) granting that token the `viewer` role. Both exist
  whether or not the Prometheus Operator runs, for any scraper (and so installing it later restarts no
  router).
- `ensure_pod_monitor` (after the cluster's own objects are applied): where the PodMonitor CRD exists,
  the PodMonitor `<cluster>-routers` (HTTPS, that CA and token, `serverName: etlrouter-metrics`, a DNS SAN of
  every router certificate: cluster_tls.router_names), owned by the EtlRouterCluster so it goes away with
  it. Without the CRD nothing happens: not an error. `spec.monitoring.podMonitor: false` deletes it.

The operator's ClusterRole needs `get` on customresourcedefinitions (apiextensions.k8s.io) and `get,
create, patch, delete` on podmonitors (monitoring.coreos.com); secrets it has already.
"""

from __future__ import annotations

import secrets
from typing import Any

from etlrouter.operator import cluster as cluster_mod  # cluster.py imports this module: no from-import
from etlrouter.operator import kube, tls_secrets
from etlrouter.operator.cluster_tls import METRICS_SERVER_NAME, ClusterCA

POD_MONITOR_CRD = "podmonitors.monitoring.coreos.com"
CRDS = kube.Resource("apiextensions.k8s.io/v1", "customresourcedefinitions", namespaced=False)
POD_MONITORS = kube.Resource("monitoring.coreos.com/v1", "podmonitors")
METRICS_SECRET = "etlrouter-metrics"  # the shipped k8s/monitoring/podmonitors.yaml's (made by the user)
SERVER_NAME = METRICS_SERVER_NAME  # the DNS SAN every router certificate carries for scrapers
TOKEN_KEY, CA_KEY = "token", "ca.crt"
TOKENS_KEY = "tokens.csv"  # in the routers' token Secret
TOKENS_DIR = "/etc/etlrouter-auth"  # where the routers mount it
TOKEN_USER = "etlrouter-metrics"  # who the scraper is in the routers' logs and denials
MIN_TOKEN_CHARS = 32


def pod_monitor_name(cluster_name: str) -> str:
    return f"{cluster_name}-routers"


def metrics_secret_name(cluster_name: str) -> str:
    """Per cluster: two clusters in one namespace have two CAs (and tokens)."""
    return f"{cluster_name}-metrics"


def tokens_secret_name(cluster_name: str) -> str:
    return f"{cluster_name}-router-tokens"


def tokens_file() -> str:
    return f"{TOKENS_DIR}/{TOKENS_KEY}"


def tokens_csv(token: str) -> str:
    """The routers' token file: the scraper's token, role viewer (token,user,uid,"roles")."""
    return (
        "# Written by etlrouter-operator: the scrape token of the Secret <cluster>-metrics.\n"
        f"{token},{TOKEN_USER},{TOKEN_USER},viewer\n"
    )


def desired_pod_monitor(
    cluster: dict[str, Any],
    secret: str | None = METRICS_SECRET,
    interval: str = "15s",
    *,
    tls: bool = True,
) -> dict[str, Any]:
    """The PodMonitor scraping every router of `cluster` (an EtlRouterCluster object). `tls` false: plain
    HTTP without credentials (spec.tls.enabled false: the routers serve plaintext, unauthenticated)."""
    meta = cluster["metadata"]
    name, namespace = meta["name"], meta.get("namespace", "default")
    endpoint: dict[str, Any] = {"port": "http", "path": "/metrics", "interval": interval}
    if tls:
        secret = secret or metrics_secret_name(name)
        endpoint |= {
            "scheme": "https",
            "tlsConfig": {
                "ca": {"secret": {"name": secret, "key": CA_KEY}},
                "serverName": SERVER_NAME,
            },
            "authorization": {"type": "Bearer", "credentials": {"name": secret, "key": TOKEN_KEY}},
        }
    else:
        endpoint["scheme"] = "http"
    endpoint["relabelings"] = [
        {"targetLabel": "etlrouter_cluster", "replacement": name},
        {"targetLabel": "etlrouter_role", "replacement": "router"},
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": pod_monitor_name(name),
            "namespace": namespace,
            "labels": cluster_mod.labels(name),
            "ownerReferences": [kube.owner_reference(cluster)],
        },
        "spec": {
            "selector": {"matchLabels": cluster_mod.selector(name)},
            "podMetricsEndpoints": [endpoint],
        },
    }


async def crd_exists(api: Any) -> bool:
    return await kube.get(api, CRDS, "", POD_MONITOR_CRD) is not None


async def ensure_pod_monitor(
    api: Any,
    cluster: dict[str, Any],
    *,
    enabled: bool = True,
    tls: bool = True,
    crd_present: bool | None = None,
) -> bool:
    """Apply the cluster's PodMonitor if the Prometheus Operator's CRD exists (`crd_present`: already
    asked); whether it did. Not `enabled`: delete the one made before, if any."""
    if crd_present is None:
        crd_present = await crd_exists(api)
    if not crd_present:
        return False
    meta = cluster["metadata"]
    if not enabled:
        await kube.delete(api, POD_MONITORS, meta.get("namespace", "default"), pod_monitor_name(meta["name"]))
        return False
    await kube.apply(api, desired_pod_monitor(cluster, metrics_secret_name(meta["name"]), tls=tls))
    return True


def _usable(token: bytes | None) -> str | None:
    if not token:
        return None
    try:
        text = token.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if len(text) < MIN_TOKEN_CHARS or any(c in text for c in ',"# \t\r\n'):
        return None
    return text


async def ensure_metrics_credentials(api: Any, cluster: dict[str, Any], ca: ClusterCA) -> str:
    """The Secrets `<cluster>-metrics` (ca.crt, token) and `<cluster>-router-tokens` (tokens.csv); what was
    done ("" when both were already right). The token is kept once made (a deleted Secret gets a new one)."""
    meta = cluster["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    done = []
    metrics_name = metrics_secret_name(name)
    stored = tls_secrets.decode_secret(await kube.get(api, tls_secrets.SECRETS, namespace, metrics_name))
    token = _usable(stored.get(TOKEN_KEY))
    if token is None:
        token = secrets.token_urlsafe(MIN_TOKEN_CHARS)
        done.append("metrics token made")
    metrics = {CA_KEY: ca.bundle, TOKEN_KEY: token.encode()}
    if stored != metrics:
        await kube.apply(api, tls_secrets.secret_manifest(cluster, metrics_name, metrics))
        if not done:
            done.append("metrics CA updated")
    tokens_name = tokens_secret_name(name)
    wanted = {TOKENS_KEY: tokens_csv(token).encode()}
    if tls_secrets.decode_secret(await kube.get(api, tls_secrets.SECRETS, namespace, tokens_name)) != wanted:
        await kube.apply(api, tls_secrets.secret_manifest(cluster, tokens_name, wanted))
    return ", ".join(done)
