"""The issuer's pure checks: request, CSR, TokenReview answer, pod, cluster; and what it signs."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from etlrouter.operator import cluster_tls
from etlrouter.operator.cluster_tls import carry_out_ca, plan_ca
from etlrouter.operator.inject import cluster_of
from etlrouter.operator.issuer import (
    PodIdentity,
    Refused,
    check_cluster,
    check_pod,
    parse_request,
    pod_of_review,
    public_key_of,
    sign,
)
from etlrouter.security.context import _peer_cert_dict
from etlrouter.security.identity import from_peer_cert

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
WHO = PodIdentity("team", "app", "web-7d9f-x2", "uid-1")


def csr(key: Any = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anything")]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM)


def refusal(fn: Any, *args: Any) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args)
    return info.value


def review(
    authenticated: bool = True,
    username: str = "system:serviceaccount:team:app",
    extra: dict[str, Any] | None = None,
) -> Any:
    extras: dict[str, Any] = {
        "authentication.kubernetes.io/pod-name": ["web-7d9f-x2"],
        "authentication.kubernetes.io/pod-uid": ["uid-1"],
    }
    extras.update(extra or {})
    user = {"username": username, "extra": {k: v for k, v in extras.items() if v is not None}}
    return {
        "status": {"authenticated": authenticated, "user": user, "error": "" if authenticated else "expired"}
    }


def pod(**changes: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "web-7d9f-x2",
        "namespace": "team",
        "uid": "uid-1",
        "annotations": {
            "etlrouter.io/inject": "true",
            "etlrouter.io/injected": "true",
            "etlrouter.io/router": "main-client.team.svc:7400",
        },
    }
    meta.update(changes.pop("meta", {}))
    return {"metadata": meta, "spec": {"serviceAccountName": "app", **changes}}


def test_requests_must_carry_a_csr_and_the_sidecar_id() -> None:
    assert parse_request(json.dumps({"csr": "PEM", "sidecar_id": "s"}).encode()).sidecar_id == "s"
    assert "not JSON" in refusal(parse_request, b"{").message
    assert refusal(parse_request, b"[]").status == 400
    assert "csr: missing" in refusal(parse_request, b'{"sidecar_id": "s"}').message
    assert "sidecar_id: missing" in refusal(parse_request, b'{"csr": "x"}').message


def test_the_csr_must_verify_and_use_a_strong_key() -> None:
    assert isinstance(public_key_of(csr()), ec.EllipticCurvePublicKey)
    assert "not a PEM" in refusal(public_key_of, b"junk").message
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert "at least 2048" in refusal(public_key_of, csr(weak)).message
    tampered = csr().replace(b"M", b"N", 1)
    assert refusal(public_key_of, tampered).status == 400


def test_only_a_valid_pod_bound_service_account_token_names_a_pod() -> None:
    assert pod_of_review(review()) == WHO
    assert "expired" in refusal(pod_of_review, review(False)).message
    assert "not a ServiceAccount's" in refusal(pod_of_review, review(username="alice")).message
    unbound = review(extra={"authentication.kubernetes.io/pod-name": None})
    assert "not bound to a pod" in refusal(pod_of_review, unbound).message
    assert refusal(pod_of_review, {}).status == 401


def test_the_pod_must_be_the_tokens_injected_and_name_its_cluster() -> None:
    assert check_pod(pod(), WHO, "web-7d9f-x2") == ("team", "main")
    cases = [
        (None, "does not exist"),
        (pod(meta={"uid": "uid-2"}), "not the pod the token was made for"),
        (pod(meta={"deletionTimestamp": "2026-01-01T00:00:00Z"}), "being deleted"),
        (pod(serviceAccountName="other"), "ServiceAccount does not run that pod"),
        (pod(meta={"annotations": {"etlrouter.io/inject": "true"}}), "no injected etlrouter sidecar"),
        (pod(meta={"annotations": {"etlrouter.io/injected": "true"}}), "names no EtlRouterCluster"),
    ]
    for obj, message in cases:
        refused = refusal(check_pod, obj, WHO, "web-7d9f-x2")
        assert refused.status == 403 and message in refused.message, message
    assert "the token is pod 'web-7d9f-x2'" in refusal(check_pod, pod(), WHO, "db-0").message


def test_a_pod_names_its_cluster_by_annotation_or_by_the_clusters_client_service() -> None:
    assert cluster_of("team", {"etlrouter.io/cluster": "main"}) == ("team", "main")
    assert cluster_of("team", {"etlrouter.io/cluster": "prod/main"}) == ("prod", "main")
    assert cluster_of("team", {"etlrouter.io/router": "main-client.prod.svc:7400"}) == ("prod", "main")
    assert cluster_of("team", {"etlrouter.io/router": "main-client.prod.svc.cluster.local:7400"}) == (
        "prod",
        "main",
    )
    assert cluster_of("team", {"etlrouter.io/router": "10.0.0.1:7400"}) is None
    assert cluster_of("team", {"etlrouter.io/router": "main-0.main-headless.prod.svc:7400"}) is None


def test_the_cluster_must_run_tls_and_take_sidecars_from_the_pods_namespace() -> None:
    on: dict[str, Any] = {"spec": {}}
    check_cluster(on, ("team", "main"), "team")
    assert "does not exist" in refusal(check_cluster, None, ("team", "main"), "team").message
    off = {"spec": {"tls": {"enabled": False}}}
    assert "runs without TLS" in refusal(check_cluster, off, ("team", "main"), "team").message
    assert "sidecarNamespaces" in refusal(check_cluster, on, ("prod", "main"), "team").message
    check_cluster({"spec": {"tls": {"sidecarNamespaces": ["team"]}}}, ("prod", "main"), "team")
    check_cluster({"spec": {"tls": {"sidecarNamespaces": ["*"]}}}, ("prod", "main"), "team")


def test_the_certificate_names_only_the_pod_whatever_the_csr_asked() -> None:
    ca = carry_out_ca(plan_ca(None, NOW), None, NOW, "main")
    key = ec.generate_private_key(ec.SECP256R1())
    uri = cluster_tls.sidecar_id("main", "prod", "team", "web-7d9f-x2")
    pem = sign(ca, key.public_key(), uri, "web-7d9f-x2", NOW, cluster_tls.SIDECAR_VALIDITY)
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert))
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_after_utc == NOW + dt.timedelta(hours=24)
    identity = from_peer_cert(_peer_cert_dict(pem), "main.prod.etlrouter")
    assert identity is not None
    assert (identity.kind, identity.name, identity.uri) == ("sidecar", "web-7d9f-x2", uri)
    assert uri == "spiffe://main.prod.etlrouter/ns/team/sidecar/web-7d9f-x2"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
    assert sans.get_values_for_type(x509.DNSName) == ["etlrouter-metrics"]  # for scrapers, not an identity
