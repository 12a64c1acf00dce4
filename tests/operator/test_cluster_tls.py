"""cluster_tls's pure decisions: a cluster's CA and router certificates, with the clock as an argument."""

from __future__ import annotations

import datetime as dt

from cryptography import x509

from etlrouter.operator import cluster_tls
from etlrouter.operator.cluster_tls import ClusterCA, carry_out_ca, carry_out_routers, plan_ca, plan_routers
from etlrouter.security import pki
from etlrouter.security.context import _peer_cert_dict
from etlrouter.security.identity import from_peer_cert

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NODES = ["main-0", "main-1", "main-2"]


def new_ca(now: dt.datetime = NOW) -> ClusterCA:
    return carry_out_ca(plan_ca(None, now), None, now, "main")


def issued(ca: ClusterCA, now: dt.datetime = NOW, nodes: list[str] = NODES) -> dict[str, bytes]:
    return carry_out_routers(plan_routers(ca, {}, nodes, "main", "prod", now), ca, {}, "main", "prod", now)


def uri_of(pem: bytes) -> str:
    identity = from_peer_cert(_peer_cert_dict(pem), cluster_tls.trust_domain("main", "prod"))
    assert identity is not None
    return identity.uri


def test_a_new_cluster_gets_a_ca_and_a_pair_per_router_naming_its_node_id() -> None:
    assert plan_ca(None, NOW).action == "new"
    ca = new_ca()
    plan = plan_routers(ca, {}, NODES, "main", "prod", NOW)
    assert [node for node, _ in plan.issue] == NODES
    data = carry_out_routers(plan, ca, {}, "main", "prod", NOW)
    assert sorted(data) == sorted(["ca.crt", *(f"{n}.{e}" for n in NODES for e in ("crt", "key"))])
    assert data["ca.crt"] == ca.cert
    for node in NODES:
        assert uri_of(data[f"{node}.crt"]) == f"spiffe://main.prod.etlrouter/ns/prod/router/{node}"
        cert = x509.load_pem_x509_certificate(data[f"{node}.crt"])
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert))
        assert cert.not_valid_after_utc == NOW + cluster_tls.ROUTER_VALIDITY


def test_valid_certificates_are_kept() -> None:
    ca = new_ca()
    data = issued(ca)
    assert plan_ca(ca, NOW + dt.timedelta(days=365)).action == "reuse"
    plan = plan_routers(ca, data, NODES, "main", "prod", NOW + dt.timedelta(days=19))
    assert not plan.changed


def test_router_certificates_are_renewed_when_a_third_of_their_life_is_left() -> None:
    ca = new_ca()
    data = issued(ca)
    later = NOW + dt.timedelta(days=20, minutes=1)  # 30 days, renewed with 10 left
    plan = plan_routers(ca, data, NODES, "main", "prod", later)
    assert [node for node, _ in plan.issue] == NODES
    assert all("expires at" in why for _, why in plan.issue)
    renewed = carry_out_routers(plan, ca, data, "main", "prod", later)
    for node in NODES:
        assert renewed[f"{node}.crt"] != data[f"{node}.crt"]
        assert x509.load_pem_x509_certificate(renewed[f"{node}.crt"]).not_valid_after_utc > later
    # Lifetime 30 days + the 5 minutes of back-dating; due when a third of it is left.
    assert cluster_tls.earliest(data, NODES) == (
        NOW + dt.timedelta(days=30),
        NOW + dt.timedelta(days=20) - dt.timedelta(seconds=100),
    )


def test_scaling_issues_new_routers_and_drops_removed_ones() -> None:
    ca = new_ca()
    data = issued(ca)
    plan = plan_routers(ca, data, [*NODES, "main-3"], "main", "prod", NOW)
    assert plan.issue == (("main-3", "no certificate yet"),) and plan.drop == ()
    plan = plan_routers(ca, data, NODES[:2], "main", "prod", NOW)
    assert plan.issue == () and plan.drop == ("main-2.crt", "main-2.key")


def test_a_certificate_from_another_ca_or_for_another_identity_is_replaced() -> None:
    ca, other = new_ca(), new_ca()
    data = issued(other)
    plan = plan_routers(ca, data, NODES, "main", "prod", NOW)
    assert {why for _, why in plan.issue} == {"not issued by the current CA"}
    assert plan.bundle_changed
    swapped = issued(ca)
    swapped["main-0.crt"], swapped["main-0.key"] = swapped["main-1.crt"], swapped["main-1.key"]
    plan = plan_routers(ca, swapped, NODES, "main", "prod", NOW)
    assert [node for node, _ in plan.issue] == ["main-0"]
    assert "router/main-1, not" in plan.issue[0][1]
    broken = {**issued(ca), "main-2.key": b"garbage"}
    assert [n for n, _ in plan_routers(ca, broken, NODES, "main", "prod", NOW).issue] == ["main-2"]


def test_an_expiring_ca_is_rotated_and_the_old_one_stays_trusted_until_it_expires() -> None:
    ca = new_ca()
    near_end = NOW + cluster_tls.CA_VALIDITY * 0.7
    plan = plan_ca(ca, near_end)
    assert plan.action == "rotate"
    rotated = carry_out_ca(plan, ca, near_end, "main")
    assert rotated.cert != ca.cert and rotated.previous == ca.cert
    assert rotated.bundle == rotated.cert + ca.cert
    # Every router moves to the new CA; the bundle trusts both while the old CA lives.
    routers = plan_routers(rotated, issued(ca), NODES, "main", "prod", near_end)
    assert len(routers.issue) == 3 and routers.bundle_changed
    assert plan_ca(rotated, near_end + dt.timedelta(days=1)).action == "reuse"
    after_old_expiry = NOW + cluster_tls.CA_VALIDITY + dt.timedelta(days=1)
    assert plan_ca(rotated, after_old_expiry).action == "prune"
    assert carry_out_ca(plan_ca(rotated, after_old_expiry), rotated, after_old_expiry, "main").previous == b""


def test_a_users_own_ca_is_never_replaced() -> None:
    assert plan_ca(None, NOW, ours=False).action == "invalid"
    assert plan_ca(ClusterCA(b"x", b"y"), NOW, ours=False).action == "invalid"
    ca = new_ca()
    assert plan_ca(ca, NOW, ours=False).action == "reuse"
    expiring = plan_ca(ca, NOW + cluster_tls.CA_VALIDITY * 0.9, ours=False)
    assert expiring.action == "invalid" and "replace it" in expiring.reason
    # Unreadable and ours: start over.
    assert plan_ca(ClusterCA(b"x", b"y"), NOW).action == "new"


def test_the_operator_is_an_admin_user_of_the_clusters_trust_domain() -> None:
    ca = new_ca()
    cert, _ = cluster_tls.operator_credentials(ca, "main", "prod", NOW)
    identity = from_peer_cert(_peer_cert_dict(cert), "main.prod.etlrouter")
    assert identity is not None
    assert (identity.kind, identity.name, identity.roles) == (
        "user",
        "etlrouter-operator",
        frozenset({"admin"}),
    )


def test_router_certificates_carry_the_scrape_name_and_old_ones_without_it_are_reissued() -> None:
    ca = new_ca()
    data = issued(ca)
    cert = x509.load_pem_x509_certificate(data["main-0.crt"])
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert cluster_tls.METRICS_SERVER_NAME in names.get_values_for_type(x509.DNSName)
    assert not plan_routers(ca, data, NODES, "main", "prod", NOW).issue

    # A pair made before the scrape name existed (same URI, fewer DNS names): replaced.
    old_cert, old_key = pki.issue_cert(
        ca.cert,
        ca.key,
        ["main-0.main-headless.prod.svc"],
        NOW,
        cluster_tls.ROUTER_VALIDITY,
        uris=[cluster_tls.router_id("main", "prod", "main-0")],
        server=True,
        client=True,
    )
    stale = {**data, "main-0.crt": old_cert, "main-0.key": old_key}
    plan = plan_routers(ca, stale, NODES, "main", "prod", NOW)
    assert [node for node, _ in plan.issue] == ["main-0"]
    assert "etlrouter-metrics" in plan.issue[0][1]
