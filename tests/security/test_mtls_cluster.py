"""Mutual TLS and authorization against real processes: who is refused, with which status, and that the
parts of the cluster still move records while everyone else is kept out."""

from __future__ import annotations

import asyncio
import json
import ssl
import urllib.error
import urllib.request
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.health.v1 import health_grpc, health_pb2

from etlrouter._proto.v1 import (
    admin_grpc,
    admin_pb2,
    control_grpc,
    control_pb2,
    dataplane_grpc,
    dataplane_pb2,
)
from etlrouter.core.grpc import open_channel
from etlrouter.security.context import Security
from etlrouter.security.identity import ROUTER, SIDECAR
from etlrouter.security.pki import LocalCA
from tests.e2e.processes import jsonl_offsets, wait_until
from tests.security.conftest import SecureCluster

TIMEOUT = 10


async def _health(address: str, security: Security | None) -> int:
    channel = open_channel(address, security=security)
    try:
        reply = await asyncio.wait_for(
            health_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()), 5
        )
        return int(reply.status)
    finally:
        channel.close()


def health(address: str, security: Security | None) -> int:
    return asyncio.run(_health(address, security))


def status_of(call: Any) -> Status:
    """Run an async call expected to fail; its gRPC status."""
    with pytest.raises(GRPCError) as info:
        asyncio.run(call)
    return info.value.status


async def _unary(address: str, security: Security, expect: Any, stub: Any, method: str, request: Any) -> Any:
    channel = open_channel(address, security=security, expect=expect)
    try:
        return await asyncio.wait_for(getattr(stub(channel), method)(request), TIMEOUT)
    finally:
        channel.close()


def sidecar_address(cluster: SecureCluster, sidecar_id: str) -> str:
    return f"127.0.0.1:{cluster.sidecars[sidecar_id][0]}"


def test_records_flow_with_mutual_tls(secure_cluster: SecureCluster) -> None:
    wait_until(lambda: len(set(jsonl_offsets(secure_cluster.sink_file))) >= 20_000, 120, "20,000 records")
    assert set(jsonl_offsets(secure_cluster.sink_file)) == set(range(20_000))


def test_plaintext_and_foreign_ca_are_refused(secure_cluster: SecureCluster, tmp_path: Any) -> None:
    router = secure_cluster.routers.addresses[0]
    sidecar = sidecar_address(secure_cluster, "sidecar-clean")
    admin = secure_cluster.pki.security()
    assert health(router, admin) == health_pb2.HealthCheckResponse.SERVING  # the control: a good client
    assert health(sidecar, admin) == health_pb2.HealthCheckResponse.SERVING
    foreign_ca = LocalCA.open_or_create(tmp_path / "foreign")
    foreign = secure_cluster.pki.issue("router", "router-0", ca=foreign_ca)  # the right name, another CA
    from etlrouter.core.config import AuthConfig, TlsConfig

    impostor = Security(
        TlsConfig(
            ca=str(foreign.ca), cert=str(foreign.cert), key=str(foreign.key), trust_domain="etlrouter.test"
        ),
        AuthConfig(),
    )
    for address in (router, sidecar):
        with pytest.raises((StreamTerminatedError, ConnectionError, OSError)):
            health(address, None)  # plaintext: the TLS listener drops it at the handshake
        with pytest.raises((ssl.SSLError, StreamTerminatedError, ConnectionError, OSError)):
            health(address, impostor)


def test_a_sidecar_acts_only_for_itself(secure_cluster: SecureCluster) -> None:
    pki, router = secure_cluster.pki, secure_cluster.routers.addresses[0]
    a = pki.security("sidecar", "sidecar-a")
    coordinator = control_grpc.SidecarCoordinatorStub
    as_b = [
        (
            "RegisterSidecar",
            control_pb2.RegisterSidecarRequest(sidecar_id="sidecar-clean", data_address="127.0.0.1:1"),
        ),
        ("Heartbeat", control_pb2.SidecarHeartbeatRequest(sidecar_id="sidecar-clean")),
        ("HeartbeatStream", [control_pb2.SidecarHeartbeatRequest(sidecar_id="sidecar-clean")]),
        ("DeregisterSidecar", control_pb2.DeregisterSidecarRequest(sidecar_id="sidecar-clean")),
    ]
    for method, request in as_b:
        # The leader may be another router: a follower refuses before forwarding, so any router will do.
        status = status_of(_unary(router, a, ROUTER, coordinator, method, request))
        assert status == Status.PERMISSION_DENIED, method
    backup = _unary(
        router, a, ROUTER, admin_grpc.BackupServiceStub, "CreateSnapshot", admin_pb2.CreateSnapshotRequest()
    )
    with pytest.raises(GRPCError) as info:

        async def snapshot() -> None:
            channel = open_channel(router, security=a, expect=ROUTER)
            try:
                async with admin_grpc.BackupServiceStub(channel).CreateSnapshot.open() as stream:
                    await stream.send_message(admin_pb2.CreateSnapshotRequest(), end=True)
                    await stream.recv_message()
            finally:
                channel.close()

        asyncio.run(asyncio.wait_for(snapshot(), TIMEOUT))
    assert info.value.status == Status.PERMISSION_DENIED
    backup.close()
    apply = admin_pb2.ApplyPipelinesRequest(definition="pipeline x { source orders | sink out }\n")
    status = status_of(_unary(router, a, ROUTER, admin_grpc.PipelineAdminStub, "ApplyPipelines", apply))
    assert status == Status.PERMISSION_DENIED
    # The sidecar of the cluster still heartbeats as itself (the rule is not "sidecars may not").
    ok = _unary(
        router,
        pki.security("sidecar", "sidecar-clean"),
        ROUTER,
        admin_grpc.PipelineAdminStub,
        "GetClusterStatus",
        admin_pb2.GetClusterStatusRequest(),
    )
    assert asyncio.run(ok).leader_id


def _open_edge(
    address: str, security: Security, open_frame: dataplane_pb2.EdgeOpen
) -> dataplane_pb2.ControlFrame:
    async def go() -> dataplane_pb2.ControlFrame:
        channel = open_channel(address, security=security, expect=SIDECAR)
        try:
            async with dataplane_grpc.SidecarDataPlaneStub(channel).ReceiveRecords.open() as stream:
                await stream.send_message(dataplane_pb2.DataFrame(open=open_frame))
                first = await stream.recv_message()  # the receiver's first credit grant
                await stream.send_message(dataplane_pb2.DataFrame(close=True), end=True)
                assert first is not None
                return first
        finally:
            channel.close()

    return asyncio.run(asyncio.wait_for(go(), TIMEOUT))


def test_an_edge_only_from_an_upstream_sidecar(secure_cluster: SecureCluster) -> None:
    pki = secure_cluster.pki
    listing = secure_cluster.admin_call("ListPipelines", admin_pb2.ListPipelinesRequest())
    dag = listing.dags[0]  # type: ignore[attr-defined]
    by_service = {s.service: s.id for s in dag.stages}
    clean = sidecar_address(secure_cluster, "sidecar-clean")

    def frame(sender: str) -> dataplane_pb2.EdgeOpen:
        return dataplane_pb2.EdgeOpen(
            dag_id=dag.id,
            stage_id=by_service["clean"],
            from_stage_id=by_service["orders"],
            sender_sidecar_id=sender,
        )

    # The source's sidecar feeds the filter: its edge opens (and closes at once).
    grant = _open_edge(clean, pki.security("sidecar", "sidecar-orders"), frame("sidecar-orders"))
    assert grant.grant.records > 0
    # The sink's sidecar runs no stage upstream of the filter; another sidecar may not claim to be the source.
    for who, claims in (("sidecar-out", "sidecar-out"), ("sidecar-out", "sidecar-orders")):
        with pytest.raises(GRPCError) as info:
            _open_edge(clean, pki.security("sidecar", who), frame(claims))
        assert info.value.status == Status.PERMISSION_DENIED, (who, claims)
    # A sender acting on a newer assignment than the receiver knows is told to retry, not refused: the
    # receiver's view of the placements may lag by a heartbeat.
    newer = frame("sidecar-out")
    newer.fencing_token = 1 << 62
    with pytest.raises(GRPCError) as info:
        _open_edge(clean, pki.security("sidecar", "sidecar-out"), newer)
    assert info.value.status == Status.UNAVAILABLE
    # A person, even an admin, does not push records into an edge.
    with pytest.raises(GRPCError) as info:
        _open_edge(clean, pki.security(), frame("sidecar-orders"))
    assert info.value.status == Status.PERMISSION_DENIED


def _graphql(
    cluster: SecureCluster, query: str, token: str | None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    port = cluster.routers.http_ports[cluster.routers.ids[0]]
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}/graphql", json.dumps({"query": query}).encode(), headers
    )
    try:
        with urllib.request.urlopen(request, timeout=20, context=cluster.pki.https()) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_graphql_roles(secure_cluster: SecureCluster) -> None:
    tokens = secure_cluster.pki.tokens
    status, body, headers = _graphql(secure_cluster, "{ pipelines { name } }", None)
    assert status == 401 and "Bearer" in headers.get("WWW-Authenticate", "")
    status, body, _ = _graphql(secure_cluster, "{ pipelines { name } }", tokens["viewer"])
    assert status == 200 and [p["name"] for p in body["data"]["pipelines"]] == ["guarded"]
    mutation = 'mutation { deletePipeline(name: "guarded") { deleted } }'
    status, body, _ = _graphql(secure_cluster, mutation, tokens["viewer"])
    assert status == 403
    assert (
        "Mutation.deletePipeline" in body["errors"][0]["message"]
        and "'editor'" in body["errors"][0]["message"]
    )
    # A dead letter's record is data: `tap`, which an editor does not hold.
    letter = '{ deadLetter(sidecar: "sidecar-clean", id: "x") { id } }'
    status, body, _ = _graphql(secure_cluster, letter, tokens["editor"])
    assert status == 403 and "'tap'" in body["errors"][0]["message"]
    status, body, _ = _graphql(secure_cluster, letter, tokens["tap"])
    assert status == 200


def test_metrics_need_a_viewer_and_denials_are_counted(secure_cluster: SecureCluster) -> None:
    port = secure_cluster.routers.http_ports[secure_cluster.routers.ids[0]]
    url = f"https://127.0.0.1:{port}/metrics"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10, context=secure_cluster.pki.https())
    assert info.value.code == 401
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {secure_cluster.pki.tokens['viewer']}"}
    )
    with urllib.request.urlopen(request, timeout=10, context=secure_cluster.pki.https()) as r:
        text = r.read().decode()
    denials = [line for line in text.splitlines() if line.startswith("etlrouter_auth_denials_total{")]
    assert any('reason="unauthenticated"' in line and not line.endswith(" 0.0") for line in denials), denials


def test_sidecars_heartbeat_on_streams_to_the_leader(secure_cluster: SecureCluster) -> None:
    """Each sidecar's HeartbeatStream passes the same authorization as its calls (a refused stream would
    fall back to calls, unseen but for this gauge)."""
    routers, viewer = secure_cluster.routers, secure_cluster.pki.tokens["viewer"]

    def open_streams() -> float:
        return sum(routers.metric(n, "etlrouter_sidecar_heartbeat_streams", viewer) for n in routers.ids)

    wait_until(lambda: open_streams() == len(secure_cluster.sidecars), 30, "one stream per sidecar")


def test_ctl_tap_needs_the_tap_permission(secure_cluster: SecureCluster) -> None:
    denied = secure_cluster.ctl("tap", "guarded", "out", "--limit", "1", token_role="viewer")
    assert denied.returncode != 0
    assert "PERMISSION_DENIED" in denied.stderr and "'tap'" in denied.stderr, denied.stderr
    listed = secure_cluster.ctl("list", token_role="viewer")
    assert listed.returncode == 0 and "guarded" in listed.stdout, listed.stderr
    unauthenticated = secure_cluster.ctl("list")
    assert unauthenticated.returncode != 0 and "UNAUTHENTICATED" in unauthenticated.stderr
