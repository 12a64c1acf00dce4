"""The I/O edge of cluster_tls.py: read and write a cluster's CA and router Secrets, and the operator's own
client credentials for the cluster's routers.

Only the leader reconciles clusters, so the Secrets have one writer; the issuer (every replica) only reads
the CA Secret.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from etlrouter.core.config import AuthConfig, TlsConfig
from etlrouter.operator import cluster_tls, kube
from etlrouter.operator.cluster_tls import ClusterCA
from etlrouter.security import pki
from etlrouter.security.context import Security

log = logging.getLogger(__name__)

SECRETS = kube.Resource("v1", "secrets")


def decode_secret(secret: Mapping[str, Any] | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in ((secret or {}).get("data") or {}).items():
        with contextlib.suppress(ValueError, TypeError):
            out[key] = base64.b64decode(value)
    return out


def _owned_by(secret: Mapping[str, Any], cr: Mapping[str, Any]) -> bool:
    uid = cr["metadata"].get("uid")
    return any(r.get("uid") == uid for r in (secret.get("metadata") or {}).get("ownerReferences") or [])


def secret_manifest(cr: dict[str, Any], name: str, data: Mapping[str, bytes]) -> dict[str, Any]:
    meta = cr["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": {
                "app.kubernetes.io/name": "etlrouter",
                "app.kubernetes.io/instance": meta["name"],
                "app.kubernetes.io/managed-by": "etlrouter-operator",
            },
            # Owned by the cluster: deleting the EtlRouterCluster deletes its CA and certificates.
            "ownerReferences": [kube.owner_reference(cr)],
        },
        "data": {k: base64.b64encode(v).decode() for k, v in sorted(data.items())},
    }


class CertificateError(Exception):
    """The cluster's certificates cannot be made (a user's CA Secret that does not work)."""


@dataclass(frozen=True)
class CertificateStatus:
    ca: ClusterCA
    ca_expires: dt.datetime
    routers_expire: dt.datetime | None
    renew_at: dt.datetime | None  # when the next router certificate falls due
    actions: tuple[str, ...]  # what this reconcile did, for events ("" when nothing)


async def load_ca(api: kube.ApiClient, cr: dict[str, Any], secret_name: str | None) -> ClusterCA | None:
    meta = cr["metadata"]
    name = cluster_tls.ca_secret_name(meta["name"], secret_name)
    return ClusterCA.from_data(decode_secret(await kube.get(api, SECRETS, meta["namespace"], name)))


async def ensure_ca(
    api: kube.ApiClient, cr: dict[str, Any], secret_name: str | None, now: dt.datetime
) -> tuple[ClusterCA, str]:
    """The cluster's CA, made or rotated when due; (CA, what was done: "" for nothing)."""
    meta = cr["metadata"]
    name = cluster_tls.ca_secret_name(meta["name"], secret_name)
    secret = await kube.get(api, SECRETS, meta["namespace"], name)
    # A Secret the operator did not make is the user's own CA: used, never replaced.
    ours = secret is None or _owned_by(secret, cr)
    stored = ClusterCA.from_data(decode_secret(secret))
    plan = cluster_tls.plan_ca(stored, now, ours=ours)
    if plan.action == "invalid":
        raise CertificateError(f"spec.tls.secretName: Secret {name}: {plan.reason}")
    if plan.action == "reuse":
        assert stored is not None
        return stored, ""
    ca = cluster_tls.carry_out_ca(plan, stored, now, meta["name"])
    await kube.apply(api, secret_manifest(cr, name, ca.to_data()))
    log.info("cluster CA written", extra={"fields": {"cluster": meta["name"], "action": plan.action}})
    return ca, f"CA: {plan.action} ({plan.reason})"


async def ensure_router_certs(
    api: kube.ApiClient,
    cr: dict[str, Any],
    ca: ClusterCA,
    node_ids: list[str],
    now: dt.datetime,
    validity: dt.timedelta = cluster_tls.ROUTER_VALIDITY,
) -> tuple[dict[str, bytes], str]:
    """The routers' Secret, with a pair per router in `node_ids`; (its data, what was done)."""
    meta = cr["metadata"]
    cluster, namespace = meta["name"], meta["namespace"]
    name = cluster_tls.router_secret_name(cluster)
    stored = decode_secret(await kube.get(api, SECRETS, namespace, name))
    plan = cluster_tls.plan_routers(ca, stored, node_ids, cluster, namespace, now)
    if not plan.changed:
        return stored, ""
    data = cluster_tls.carry_out_routers(plan, ca, stored, cluster, namespace, now, validity)
    await kube.apply(api, secret_manifest(cr, name, data))
    issued = ", ".join(f"{node} ({why})" for node, why in plan.issue)
    done = f"router certificates issued: {issued}" if issued else "router trust bundle updated"
    log.info(done, extra={"fields": {"cluster": cluster}})
    return data, done


class OperatorCredentials:
    """The operator's client certificate per cluster (in memory and a private temp dir), re-issued when
    due or when the cluster's CA changes; `security()` is what RouterClient is handed."""

    def __init__(self) -> None:
        self._root: Path | None = None  # made at the first TLS cluster
        self._cache: dict[tuple[str, str], tuple[bytes, x509.Certificate, Security]] = {}

    def security(self, cr: dict[str, Any], ca: ClusterCA, now: dt.datetime) -> Security:
        meta = cr["metadata"]
        key = (meta["namespace"], meta["name"])
        cached = self._cache.get(key)
        if cached is not None and cached[0] == ca.bundle and not cluster_tls.due(cached[1], now):
            return cached[2]
        cert, private = cluster_tls.operator_credentials(ca, meta["name"], meta["namespace"], now)
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="etlrouter-operator-tls-"))
        directory = self._root / f"{meta['namespace']}.{meta['name']}"
        directory.mkdir(mode=0o700, exist_ok=True)
        files = pki.CertFiles(directory / "ca.crt", directory / "operator.crt", directory / "operator.key")
        pki.write_atomically(files.key, private)
        pki.write_atomically(files.cert, cert)
        pki.write_atomically(files.ca, ca.bundle)
        tls = TlsConfig(
            ca=str(files.ca),
            cert=str(files.cert),
            key=str(files.key),
            trust_domain=cluster_tls.trust_domain(meta["name"], meta["namespace"]),
        )
        security = Security(tls, AuthConfig())
        self._cache[key] = (ca.bundle, x509.load_pem_x509_certificate(cert), security)
        return security

    def forget(self, namespace: str, name: str) -> None:
        self._cache.pop((namespace, name), None)

    def close(self) -> None:
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
            self._root = None
        self._cache.clear()
