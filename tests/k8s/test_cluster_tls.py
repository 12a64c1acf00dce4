"""A cluster's CA and router certificates on a real kube-apiserver: issued into Secrets owned by the
cluster, mounted into the StatefulSet, renewed before expiry (the reconciler's clock is moved forward),
reissued on scale-up; the opt-out and a user's own CA."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cryptography import x509

from etlrouter.core.config import Config
from etlrouter.operator.cluster import ClusterReconciler
from etlrouter.operator.controller import OperatorContext
from etlrouter.security import pki
from etlrouter.security.context import _peer_cert_dict
from etlrouter.security.identity import from_peer_cert
from tests.k8s.conftest import Kube
from tests.k8s.operator_helpers import condition

BASE = "/apis/etlrouter.io/v1alpha1"


class Clock:
    def __init__(self) -> None:
        self.offset = dt.timedelta()

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset


@pytest.fixture
async def reconciler(kube: Kube, crds: list[str], namespace: str) -> AsyncIterator[ClusterReconciler]:
    api = await kube.api_client()
    ctx = OperatorContext(api=api, config=Config(), namespace=namespace)
    r = ClusterReconciler(ctx, clock=Clock())
    try:
        yield r
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


def secret(kube: Kube, namespace: str, name: str) -> tuple[dict[str, bytes], dict[str, Any]] | None:
    obj = kube.http.get(f"/api/v1/namespaces/{namespace}/secrets/{name}")
    if obj is None:
        return None
    return {k: base64.b64decode(v) for k, v in obj["data"].items()}, obj["metadata"]


def router_container(kube: Kube, namespace: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    sts = kube.http.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{name}")
    pod = sts["spec"]["template"]["spec"]
    return pod["containers"][0], pod


def identity_of(pem: bytes, trust_domain: str) -> str:
    found = from_peer_cert(_peer_cert_dict(pem), trust_domain)
    assert found is not None
    return found.uri


def cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


async def test_router_certificates_are_issued_mounted_and_renewed_before_expiry(
    kube: Kube, namespace: str, reconciler: ClusterReconciler
) -> None:
    created = create(kube, namespace, "secure", {"replicas": 3})  # no spec.tls: secure by default
    await reconciler.reconcile((namespace, "secure"))
    td = f"secure.{namespace}.etlrouter"

    ca_found = secret(kube, namespace, "secure-ca")
    assert ca_found is not None
    ca_data, ca_meta = ca_found
    assert sorted(ca_data) == ["ca.crt", "ca.key"]
    assert [r["uid"] for r in ca_meta["ownerReferences"]] == [created["metadata"]["uid"]]
    routers_found = secret(kube, namespace, "secure-router-tls")
    assert routers_found is not None
    data, meta = routers_found
    assert [r["uid"] for r in meta["ownerReferences"]] == [created["metadata"]["uid"]]
    assert data["ca.crt"] == ca_data["ca.crt"]
    ca_cert = cert(ca_data["ca.crt"])
    for i in range(3):
        node = f"secure-{i}"
        assert identity_of(data[f"{node}.crt"], td) == f"spiffe://{td}/ns/{namespace}/router/{node}"
        cert(data[f"{node}.crt"]).verify_directly_issued_by(ca_cert)

    # Mounted: every pod has the Secret, and picks its own pair by its name.
    container, pod = router_container(kube, namespace, "secure")
    assert {"name": "tls", "secret": {"secretName": "secure-router-tls", "defaultMode": 0o440}} in pod[
        "volumes"
    ]
    assert {"name": "tls", "mountPath": "/etc/etlrouter-tls", "readOnly": True} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["ETLROUTER_TLS__CA"] == "/etc/etlrouter-tls/ca.crt"
    assert env["ETLROUTER_TLS__CERT"] == "/etc/etlrouter-tls/$(POD_NAME).crt"
    assert env["ETLROUTER_TLS__KEY"] == "/etc/etlrouter-tls/$(POD_NAME).key"
    assert env["ETLROUTER_TLS__TRUST_DOMAIN"] == td
    names = [e["name"] for e in container["env"]]
    assert names.index("POD_NAME") < names.index("ETLROUTER_TLS__CERT")  # $(POD_NAME) must be defined first
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"

    cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/secure")
    ready = condition(cr, "CertificatesReady")
    assert (ready["status"], ready["reason"]) == ("True", "Issued")
    first_expiry = min(cert(data[f"secure-{i}.crt"]).not_valid_after_utc for i in range(3))
    assert f"the first expires at {first_expiry.isoformat()}" in ready["message"]

    # Nothing is due: another reconcile writes nothing.
    await reconciler.reconcile((namespace, "secure"))
    again = secret(kube, namespace, "secure-router-tls")
    assert again is not None and again[1]["resourceVersion"] == meta["resourceVersion"]

    # 21 of 30 days later (due at 20): renewed, from the same CA, before they expire.
    assert isinstance(reconciler.clock, Clock)
    reconciler.clock.offset = dt.timedelta(days=21)
    later = reconciler.clock()
    await reconciler.reconcile((namespace, "secure"))
    renewed_found = secret(kube, namespace, "secure-router-tls")
    assert renewed_found is not None
    renewed, _ = renewed_found
    assert renewed["ca.crt"] == data["ca.crt"]
    for i in range(3):
        node = f"secure-{i}"
        old, new = cert(data[f"{node}.crt"]), cert(renewed[f"{node}.crt"])
        assert old.not_valid_after_utc > later  # still valid: renewed before expiry
        assert new.serial_number != old.serial_number and new.not_valid_after_utc > old.not_valid_after_utc
        assert renewed[f"{node}.key"] != data[f"{node}.key"]
        new.verify_directly_issued_by(ca_cert)
    ca_after = secret(kube, namespace, "secure-ca")
    assert ca_after is not None and ca_after[0] == ca_data

    # Scale-up: the new routers have their pairs before the StatefulSet grows.
    status, body = kube.http.request(
        "PATCH",
        f"{BASE}/namespaces/{namespace}/etlrouterclusters/secure",
        {"spec": {"replicas": 5}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    await reconciler.reconcile((namespace, "secure"))
    scaled = secret(kube, namespace, "secure-router-tls")
    assert scaled is not None
    assert {k for k in scaled[0] if k.endswith(".crt")} == {"ca.crt", *(f"secure-{i}.crt" for i in range(5))}
    assert scaled[0]["secure-0.crt"] == renewed["secure-0.crt"]


async def test_tls_can_be_turned_off(kube: Kube, namespace: str, reconciler: ClusterReconciler) -> None:
    create(kube, namespace, "plain", {"replicas": 1, "tls": {"enabled": False}})
    await reconciler.reconcile((namespace, "plain"))
    assert secret(kube, namespace, "plain-ca") is None
    assert secret(kube, namespace, "plain-router-tls") is None
    container, pod = router_container(kube, namespace, "plain")
    assert not any(e["name"].startswith("ETLROUTER_TLS__") for e in container["env"])
    assert all(v["name"] != "tls" for v in pod["volumes"])
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
    cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/plain")
    off = condition(cr, "CertificatesReady")
    assert (off["status"], off["reason"]) == ("False", "TLSDisabled")


async def test_a_users_own_ca_signs_the_router_certificates_and_is_left_alone(
    kube: Kube, namespace: str, reconciler: ClusterReconciler
) -> None:
    ca_cert, ca_key = pki.new_ca(dt.datetime.now(dt.UTC), common_name="my-ca")
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "my-ca"},
        "data": {"ca.crt": base64.b64encode(ca_cert).decode(), "ca.key": base64.b64encode(ca_key).decode()},
    }
    status, created = kube.http.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body)
    assert status == 201, created
    create(kube, namespace, "own", {"replicas": 1, "tls": {"secretName": "my-ca"}})
    await reconciler.reconcile((namespace, "own"))
    found = secret(kube, namespace, "own-router-tls")
    assert found is not None
    cert(found[0]["own-0.crt"]).verify_directly_issued_by(cert(ca_cert))
    mine = secret(kube, namespace, "my-ca")
    assert mine is not None
    assert mine[1]["resourceVersion"] == created["metadata"]["resourceVersion"]
    assert "ownerReferences" not in mine[1]

    # A Secret that holds no CA is reported, not overwritten.
    create(kube, namespace, "broken", {"replicas": 1, "tls": {"secretName": "nothing-here"}})
    kube.http.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "nothing-here"}, "data": {}},
    )
    await reconciler.reconcile((namespace, "broken"))
    cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/broken")
    failed = condition(cr, "CertificatesReady")
    assert (failed["status"], failed["reason"]) == ("False", "InvalidCA")
    assert "Secret nothing-here: the Secret has no ca.crt and ca.key" in failed["message"]
