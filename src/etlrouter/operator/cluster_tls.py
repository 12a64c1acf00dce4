"""Certificates of one EtlRouterCluster: its CA, its routers' certificates, and when to make new ones.

Pure (no I/O, the clock is an argument): `plan_ca` and `plan_routers` look at what the Secrets hold and
say what to do, `carry_out_ca` / `carry_out_routers` make the keys. The reconciler (cluster.py) reads
and writes the Secrets; the issuer (issuer.py) signs sidecar certificates with the same CA.

The scheme (docs/security.md):
- trust domain `<cluster>.<namespace>.etlrouter`: one CA per cluster, so one trust domain per cluster;
- a router: `spiffe://TD/ns/<namespace>/router/<node id>` (node id = pod name `<cluster>-<ordinal>`);
- a sidecar: `spiffe://TD/ns/<pod namespace>/sidecar/<pod name>`;
- the operator itself: `spiffe://TD/user/etlrouter-operator`, role `admin` (membership changes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from etlrouter.security import pki
from etlrouter.security.identity import spiffe_id

CA_CERT, CA_KEY, CA_PREVIOUS = "ca.crt", "ca.key", "ca-previous.crt"
BUNDLE = "ca.crt"  # in the routers' Secret: the CAs a router trusts (the CA, and its predecessor)
CA_VALIDITY = pki.CA_VALIDITY  # 5 years
ROUTER_VALIDITY = dt.timedelta(days=30)
SIDECAR_VALIDITY = dt.timedelta(hours=24)
OPERATOR_VALIDITY = dt.timedelta(days=7)
# Renew when less than this fraction of the lifetime is left (10 days of a router's 30).
RENEW_FRACTION = 1 / 3
OPERATOR_USER = "etlrouter-operator"
TLS_DIR = "/etc/etlrouter-tls"  # where the routers' Secret is mounted (not under the ConfigMap's mount)
# A DNS SAN of every router certificate: scrapers verify it (Prometheus' `serverName`) as pods are scraped
# by IP address. The same on every cluster, so one scrape configuration serves them all.
METRICS_SERVER_NAME = "etlrouter-metrics"


def trust_domain(cluster: str, namespace: str) -> str:
    return f"{cluster}.{namespace}.etlrouter"


def router_id(cluster: str, namespace: str, node_id: str) -> str:
    return spiffe_id(trust_domain(cluster, namespace), "router", node_id, namespace)


def sidecar_id(cluster: str, namespace: str, pod_namespace: str, pod_name: str) -> str:
    return spiffe_id(trust_domain(cluster, namespace), "sidecar", pod_name, pod_namespace)


def ca_secret_name(cluster: str, configured: str | None = None) -> str:
    return configured or f"{cluster}-ca"


def router_secret_name(cluster: str) -> str:
    return f"{cluster}-router-tls"


def cert_key(node_id: str) -> str:
    return f"{node_id}.crt"


def key_key(node_id: str) -> str:
    return f"{node_id}.key"


@dataclass(frozen=True)
class ClusterCA:
    cert: bytes
    key: bytes
    previous: bytes = b""  # the CA this one replaced, trusted until it expires

    @property
    def bundle(self) -> bytes:
        return self.cert + self.previous

    def to_data(self) -> dict[str, bytes]:
        data = {CA_CERT: self.cert, CA_KEY: self.key}
        if self.previous:
            data[CA_PREVIOUS] = self.previous
        return data

    @classmethod
    def from_data(cls, data: Mapping[str, bytes]) -> ClusterCA | None:
        if not (data.get(CA_CERT) and data.get(CA_KEY)):
            return None
        return cls(data[CA_CERT], data[CA_KEY], data.get(CA_PREVIOUS, b""))


@dataclass(frozen=True)
class CaPlan:
    action: str  # "reuse" | "new" | "rotate" | "prune" (drop an expired predecessor) | "invalid"
    reason: str


def due(cert: x509.Certificate, now: dt.datetime) -> bool:
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - now < lifetime * RENEW_FRACTION


def renew_at(cert: x509.Certificate) -> dt.datetime:
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - lifetime * RENEW_FRACTION


def plan_ca(stored: ClusterCA | None, now: dt.datetime, *, ours: bool = True) -> CaPlan:
    """What to do with the CA Secret. `ours`: the operator made it (a user's own CA is never replaced:
    an unreadable or expiring one is reported instead)."""
    if stored is None:
        if not ours:
            return CaPlan("invalid", f"the Secret has no {CA_CERT} and {CA_KEY}")
        return CaPlan("new", "no CA stored yet")
    try:
        ca = x509.load_pem_x509_certificate(stored.cert)
        serialization.load_pem_private_key(stored.key, password=None)
    except ValueError as e:
        if not ours:
            return CaPlan("invalid", f"the CA does not load: {e}")
        return CaPlan("new", f"the stored CA is unreadable: {e}")
    if due(ca, now):
        if not ours:
            return CaPlan("invalid", f"the CA expires at {ca.not_valid_after_utc.isoformat()}; replace it")
        return CaPlan("rotate", f"the CA expires at {ca.not_valid_after_utc.isoformat()}")
    if stored.previous:
        try:
            previous = x509.load_pem_x509_certificate(stored.previous)
            expired = previous.not_valid_after_utc <= now
        except ValueError:
            expired = True
        if expired:
            return CaPlan("prune", "the previous CA expired")
    return CaPlan("reuse", "valid")


def carry_out_ca(plan: CaPlan, stored: ClusterCA | None, now: dt.datetime, cluster: str) -> ClusterCA:
    if plan.action in ("reuse", "invalid"):
        assert stored is not None or plan.action == "invalid"
        return stored  # type: ignore[return-value]
    if plan.action == "prune":
        assert stored is not None
        return ClusterCA(stored.cert, stored.key)
    cert, key = pki.new_ca(now, CA_VALIDITY, common_name=f"etlrouter-{cluster}-ca")
    previous = stored.cert if plan.action == "rotate" and stored is not None else b""
    return ClusterCA(cert, key, previous)


@dataclass(frozen=True)
class RouterPlan:
    issue: tuple[tuple[str, str], ...]  # (node id, why)
    drop: tuple[str, ...]  # Secret keys of routers that no longer exist
    bundle_changed: bool

    @property
    def changed(self) -> bool:
        return bool(self.issue or self.drop or self.bundle_changed)


def _why_reissue(
    ca: x509.Certificate,
    cert_pem: bytes | None,
    key_pem: bytes | None,
    uri: str,
    now: dt.datetime,
    dns: Sequence[str] = (),
) -> str:
    """Why a router's stored pair must be replaced ("" when it is good)."""
    if not cert_pem or not key_pem:
        return "no certificate yet"
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as e:
        return f"unreadable ({e})"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not issued by the current CA"
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = list(sans.get_values_for_type(x509.UniformResourceIdentifier))
        names = list(sans.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        uris, names = [], []
    if uris != [uri]:
        return f"names {', '.join(uris) or 'nothing'}, not {uri}"
    missing = [n for n in dns if n not in names]
    if missing:  # e.g. made before the scrape name existed
        return f"has no DNS name {', '.join(missing)}"
    if due(cert, now):
        return f"expires at {cert.not_valid_after_utc.isoformat()}"
    return ""


def plan_routers(
    ca: ClusterCA,
    stored: Mapping[str, bytes],
    node_ids: Sequence[str],
    cluster: str,
    namespace: str,
    now: dt.datetime,
) -> RouterPlan:
    """Which router certificates to (re)issue and which to drop, for the routers `node_ids`."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    issue = []
    for node in node_ids:
        why = _why_reissue(
            ca_cert,
            stored.get(cert_key(node)),
            stored.get(key_key(node)),
            router_id(cluster, namespace, node),
            now,
            router_names(cluster, namespace, node),
        )
        if why:
            issue.append((node, why))
    wanted = {BUNDLE} | {cert_key(n) for n in node_ids} | {key_key(n) for n in node_ids}
    drop = tuple(sorted(k for k in stored if k not in wanted))
    return RouterPlan(tuple(issue), drop, stored.get(BUNDLE) != ca.bundle)


def router_names(cluster: str, namespace: str, node_id: str) -> list[str]:
    """DNS names of a router (for tools that check host names; parts of the cluster check the URI)."""
    return [
        f"{node_id}.{cluster}-headless.{namespace}.svc",
        f"{cluster}-client.{namespace}.svc",
        METRICS_SERVER_NAME,
    ]


def carry_out_routers(
    plan: RouterPlan,
    ca: ClusterCA,
    stored: Mapping[str, bytes],
    cluster: str,
    namespace: str,
    now: dt.datetime,
    validity: dt.timedelta = ROUTER_VALIDITY,
) -> dict[str, bytes]:
    """The routers' Secret data after `plan` (generates a key per issued certificate)."""
    data = {k: v for k, v in stored.items() if k not in plan.drop}
    data[BUNDLE] = ca.bundle
    for node, _ in plan.issue:
        cert, key = pki.issue_cert(
            ca.cert,
            ca.key,
            router_names(cluster, namespace, node),
            now,
            validity,
            uris=[router_id(cluster, namespace, node)],
            common_name=node,
            server=True,
            client=True,
        )
        data[cert_key(node)], data[key_key(node)] = cert, key
    return data


def expires_at(cert_pem: bytes) -> dt.datetime:
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def earliest(data: Mapping[str, bytes], node_ids: Sequence[str]) -> tuple[dt.datetime, dt.datetime] | None:
    """(earliest expiry, earliest renewal time) of the routers' certificates, None when one is missing."""
    expiries, renewals = [], []
    for node in node_ids:
        pem = data.get(cert_key(node))
        if not pem:
            return None
        cert = x509.load_pem_x509_certificate(pem)
        expiries.append(cert.not_valid_after_utc)
        renewals.append(renew_at(cert))
    if not expiries:
        return None
    return min(expiries), min(renewals)


def operator_credentials(
    ca: ClusterCA, cluster: str, namespace: str, now: dt.datetime
) -> tuple[bytes, bytes]:
    """The operator's own client certificate for this cluster's routers: `user/etlrouter-operator`, role
    admin (it adds and removes Raft members, moves leadership). Kept in memory, never in a Secret."""
    return pki.issue_cert(
        ca.cert,
        ca.key,
        (),
        now,
        OPERATOR_VALIDITY,
        uris=[spiffe_id(trust_domain(cluster, namespace), "user", OPERATOR_USER)],
        organizations=["admin"],
        common_name=OPERATOR_USER,
        server=False,
        client=True,
    )
