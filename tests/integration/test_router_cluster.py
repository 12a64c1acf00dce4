"""Three `etlrouter router` processes on loopback: registry, pipelines, assignments, kill -9 of the leader."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families

from etlrouter._proto.v1 import admin_grpc, admin_pb2, control_grpc, control_pb2
from etlrouter.client.router import RouterClient
from tests.integration.cluster import ELECTION_TICKS, TICK_MS, RouterProcesses

STALE = admin_pb2.READ_CONSISTENCY_STALE
PIPELINE = """
pipeline orders {
  source orders-src | transform clean | sink warehouse
}
"""


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[RouterProcesses]:
    cluster = RouterProcesses(tmp_path)
    cluster.start_all()
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
async def client(routers: RouterProcesses) -> AsyncIterator[RouterClient]:
    c = RouterClient(routers.addresses, timeout=20)
    yield c
    c.close()


def service(name: str, kind: int, port: int) -> control_pb2.ServiceInstance:
    return control_pb2.ServiceInstance(name=name, kind=kind, endpoint=f"127.0.0.1:{port}")


async def register_sidecar(
    client: RouterClient, sidecar_id: str, *services: control_pb2.ServiceInstance
) -> control_pb2.RegisterSidecarResponse:
    request = control_pb2.RegisterSidecarRequest(
        sidecar_id=sidecar_id, data_address=f"127.0.0.1:{7000 + len(sidecar_id)}", services=list(services)
    )
    return await client.call(control_grpc.SidecarCoordinatorStub, "RegisterSidecar", request, write=True)


async def leader_id(client: RouterClient) -> str:
    status = await client.call(
        admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
    )
    return str(status.leader_id)


async def test_registry_pipeline_assignments_and_leader_failover(
    routers: RouterProcesses, client: RouterClient
) -> None:
    await register_sidecar(client, "sc-src", service("orders-src", control_pb2.SERVICE_KIND_SOURCE, 50051))
    await register_sidecar(client, "sc-mid", service("clean", control_pb2.SERVICE_KIND_TRANSFORM, 50052))
    await register_sidecar(client, "sc-sink", service("warehouse", control_pb2.SERVICE_KIND_SINK, 50053))
    applied = await client.call(
        admin_grpc.PipelineAdminStub,
        "ApplyPipelines",
        admin_pb2.ApplyPipelinesRequest(definition=PIPELINE, filename="orders.etl"),
        write=True,
    )
    assert [(c.name, c.action) for c in applied.changes] == [
        ("orders", admin_pb2.PipelineChange.ACTION_CREATED)
    ]

    # The leader places every stage; each sidecar's heartbeat answer carries its Assign command.
    deadline = time.monotonic() + 10
    assigned: dict[str, list[str]] = {}
    while time.monotonic() < deadline and len(assigned) < 3:
        for sidecar_id in ("sc-src", "sc-mid", "sc-sink"):
            reply = await client.call(
                control_grpc.SidecarCoordinatorStub,
                "Heartbeat",
                control_pb2.SidecarHeartbeatRequest(sidecar_id=sidecar_id, health=control_pb2.HEALTH_SERVING),
            )
            for command in reply.commands:
                if command.HasField("assign"):
                    assigned[sidecar_id] = [p.stage_id for p in command.assign.local]
                    assert command.fencing_token > 0
        await asyncio.sleep(0.2)
    assert sorted(assigned) == ["sc-mid", "sc-sink", "sc-src"]
    listing = await client.call(
        admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
    )
    (pipeline,) = listing.pipelines
    assert pipeline.phase == admin_pb2.PIPELINE_PHASE_RUNNING
    stage_of = {stage.service: stage.id for stage in listing.dags[0].stages}
    assert assigned == {
        "sc-src": [stage_of["orders-src"]],
        "sc-mid": [stage_of["clean"]],
        "sc-sink": [stage_of["warehouse"]],
    }

    # kill -9 the leader: a new leader serves the same state within two (randomized) election timeouts.
    old_leader = await leader_id(client)
    routers.kill(old_leader)
    killed_at = time.monotonic()
    survivors = RouterClient([routers.address(n) for n in routers.ids if n != old_leader], timeout=20)
    try:
        new_leader = await leader_id(survivors)
        while not new_leader or new_leader == old_leader:
            await asyncio.sleep(0.02)
            new_leader = await leader_id(survivors)
        listing_after = await survivors.call(
            admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
        )
        failover_s = time.monotonic() - killed_at
        max_election_timeout_s = 2 * ELECTION_TICKS * TICK_MS / 1000  # timeouts are randomized in [T, 2T)
        assert failover_s < 2 * max_election_timeout_s, f"failover took {failover_s:.2f} s"
        assert listing_after.pipelines == listing.pipelines
        # Writes continue under the new leader.
        await register_sidecar(
            survivors, "sc-late", service("clean", control_pb2.SERVICE_KIND_TRANSFORM, 50054)
        )
    finally:
        survivors.close()


async def test_acknowledged_writes_survive_kill_9_of_the_leader(
    routers: RouterProcesses, client: RouterClient
) -> None:
    acknowledged: list[str] = []
    stop = asyncio.Event()

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            name = f"svc-{i}"
            request = control_pb2.RegisterServiceRequest(
                instance=service(name, control_pb2.SERVICE_KIND_SINK, 40000 + i), ttl_ms=600_000
            )
            try:
                await client.call(
                    control_grpc.ServiceRegistryStub, "Register", request, write=True, timeout=15
                )
                acknowledged.append(name)
            except Exception:  # an unacknowledged write may or may not be there; only acks are promised
                pass
            i += 1

    task = asyncio.ensure_future(writer())
    while len(acknowledged) < 50:
        await asyncio.sleep(0.05)
    killed = await leader_id(client)
    routers.kill(killed)
    before_kill = len(acknowledged)
    while len(acknowledged) < before_kill + 50:
        await asyncio.sleep(0.05)
    routers.start(killed)  # restarts from its data directory
    await asyncio.sleep(0.5)
    stop.set()
    await task
    routers.wait_ready()

    expected = set(acknowledged)
    for node in routers.ids:
        one = RouterClient([routers.address(node)], timeout=15)
        try:
            deadline = time.monotonic() + 15
            while True:
                reply = await one.call(
                    admin_grpc.PipelineAdminStub,
                    "ListServices",
                    admin_pb2.ListServicesRequest(consistency=STALE),
                    any_node=True,
                )
                present = {s.name for s in reply.services}
                if expected <= present or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            missing = expected - present
            assert not missing, f"{node} lost acknowledged writes: {sorted(missing)[:10]}"
            # Session de-duplication: no write was applied twice (each name registered once).
            names = [s.name for s in reply.services]
            assert len(names) == len(set(names))
        finally:
            one.close()


async def test_bad_input_names_the_problem_and_changes_nothing(
    routers: RouterProcesses, client: RouterClient
) -> None:
    admin = admin_grpc.PipelineAdminStub
    before = await client.call(admin, "ListPipelines", admin_pb2.ListPipelinesRequest())
    # Unknown service: diagnostics with file:line:col, nothing applied.
    reply = await client.call(
        admin,
        "ApplyPipelines",
        admin_pb2.ApplyPipelinesRequest(definition=PIPELINE, filename="orders.etl"),
        write=True,
    )
    assert not reply.changes
    assert any(
        "orders-src" in d.message and d.file == "orders.etl" and d.line == 3 for d in reply.diagnostics
    )
    # Wrong types / missing fields: INVALID_ARGUMENT naming the field.
    with pytest.raises(GRPCError) as info:
        await client.call(
            control_grpc.ServiceRegistryStub,
            "Register",
            control_pb2.RegisterServiceRequest(instance=control_pb2.ServiceInstance(name="x")),
            write=True,
        )
    assert info.value.status == Status.INVALID_ARGUMENT and "instance.kind" in str(info.value.message)
    # Oversized definition: refused before it reaches the log.
    with pytest.raises(GRPCError) as info:
        await client.call(
            admin,
            "ApplyPipelines",
            admin_pb2.ApplyPipelinesRequest(definition="#" * (2 << 20)),
            write=True,
        )
    assert info.value.status == Status.INVALID_ARGUMENT and "limit" in str(info.value.message)
    # Duplicate pipeline name through Create: ALREADY_EXISTS.
    await register_sidecar(client, "sc-a", service("orders-src", control_pb2.SERVICE_KIND_SOURCE, 1))
    await register_sidecar(client, "sc-b", service("clean", control_pb2.SERVICE_KIND_TRANSFORM, 2))
    await register_sidecar(client, "sc-c", service("warehouse", control_pb2.SERVICE_KIND_SINK, 3))
    create = admin_pb2.CreatePipelineRequest(definition=PIPELINE, filename="orders.etl")
    await client.call(admin, "CreatePipeline", create, write=True)
    with pytest.raises(GRPCError) as info:
        await client.call(admin, "CreatePipeline", create, write=True)
    assert info.value.status == Status.ALREADY_EXISTS and "orders" in str(info.value.message)
    after = await client.call(admin, "ListPipelines", admin_pb2.ListPipelinesRequest())
    assert len(before.pipelines) == 0 and [p.name for p in after.pipelines] == ["orders"]


async def test_silent_sidecar_expires_and_its_stage_moves(
    routers: RouterProcesses, client: RouterClient
) -> None:
    await register_sidecar(client, "sc-src", service("orders-src", control_pb2.SERVICE_KIND_SOURCE, 1))
    await register_sidecar(client, "sc-sink", service("warehouse", control_pb2.SERVICE_KIND_SINK, 2))
    await register_sidecar(client, "sc-a", service("clean", control_pb2.SERVICE_KIND_TRANSFORM, 3))
    await register_sidecar(client, "sc-b", service("clean", control_pb2.SERVICE_KIND_TRANSFORM, 4))
    await client.call(
        admin_grpc.PipelineAdminStub,
        "ApplyPipelines",
        admin_pb2.ApplyPipelinesRequest(definition=PIPELINE, filename="orders.etl"),
        write=True,
    )

    async def holders() -> dict[str, list[str]]:
        reply = await client.call(
            admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest()
        )
        return {s.sidecar_id: [p.stage_id for p in s.stages] for s in reply.sidecars}

    async def heartbeat(*sidecars: str) -> None:
        for sidecar_id in sidecars:
            await client.call(
                control_grpc.SidecarCoordinatorStub,
                "Heartbeat",
                control_pb2.SidecarHeartbeatRequest(sidecar_id=sidecar_id, health=control_pb2.HEALTH_SERVING),
            )

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(len(v) for v in (await holders()).values()) < 3:
        await heartbeat("sc-src", "sc-sink", "sc-a", "sc-b")
        await asyncio.sleep(0.2)
    placed = await holders()
    clean_holder = "sc-a" if placed["sc-a"] else "sc-b"
    other = "sc-b" if clean_holder == "sc-a" else "sc-a"
    # Everyone but the transform's holder keeps heartbeating; the holder falls silent.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        await heartbeat("sc-src", "sc-sink", other)
        now = await holders()
        if clean_holder not in now and now.get(other):
            break
        await asyncio.sleep(0.3)
    assert clean_holder not in now, "the silent sidecar was not deregistered"
    assert now[other] == placed[clean_holder], "its stage did not move to the live sidecar"
    assert now["sc-src"] == placed["sc-src"] and now["sc-sink"] == placed["sc-sink"]  # nothing else moved


async def test_metrics_parse_and_name_the_router_series(
    routers: RouterProcesses, client: RouterClient
) -> None:
    await register_sidecar(client, "sc-m", service("orders-src", control_pb2.SERVICE_KIND_SOURCE, 1))
    await client.call(
        control_grpc.SidecarCoordinatorStub,
        "Heartbeat",
        control_pb2.SidecarHeartbeatRequest(sidecar_id="sc-m", health=control_pb2.HEALTH_SERVING),
    )
    leader = await leader_id(client)
    url = f"http://127.0.0.1:{routers.http_ports[leader]}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    for name in (
        "etlrouter_raft_term",
        "etlrouter_raft_commit_index",
        "etlrouter_raft_applied_index",
        "etlrouter_raft_is_leader",
        "etlrouter_raft_proposals_total",
        "etlrouter_raft_save_seconds_count",
        "etlrouter_registry_objects",
        "etlrouter_api_request_seconds_count",
        "etlrouter_sidecar_heartbeats_total",
    ):
        assert name in samples, f"{name} missing from /metrics"
    assert samples["etlrouter_raft_is_leader"].value == 1
    assert samples["etlrouter_raft_commit_index"].value >= 2
    assert samples["etlrouter_sidecar_heartbeats_total"].value >= 1


async def test_a_router_joins_and_the_leader_leaves_through_the_admin_api(
    routers: RouterProcesses, client: RouterClient
) -> None:
    # A direct registration with a long ttl: a sidecar that never heartbeats would expire during the test.
    keep = control_pb2.RegisterServiceRequest(
        instance=service("kept", control_pb2.SERVICE_KIND_SINK, 1), ttl_ms=600_000
    )
    await client.call(control_grpc.ServiceRegistryStub, "Register", keep, write=True)
    routers.add_joining("router-3")

    async def members() -> dict[str, bool]:
        status = await client.call(
            admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
        )
        return {m.id: m.voter for m in status.members}

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (await members()).get("router-3") is not True:
        await asyncio.sleep(0.2)
    assert (await members()).get("router-3") is True, "the joining router did not become a voter"
    # The new member has the replicated state (a stale read there: it may still be applying).
    only_new = RouterClient([routers.address("router-3")], timeout=10)
    try:
        names: list[str] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "kept" not in names:
            reply = await only_new.call(
                admin_grpc.PipelineAdminStub,
                "ListServices",
                admin_pb2.ListServicesRequest(consistency=STALE),
                any_node=True,
            )
            names = [s.name for s in reply.services]
            await asyncio.sleep(0.1)
        assert "kept" in names
    finally:
        only_new.close()

    old_leader = await leader_id(client)
    await client.call(
        admin_grpc.PipelineAdminStub,
        "RemoveMember",
        admin_pb2.RemoveMemberRequest(node_id=old_leader),
        write=True,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and old_leader in await members():
        await asyncio.sleep(0.2)
    assert old_leader not in await members()
    assert await leader_id(client) not in ("", old_leader)
    await register_sidecar(
        client, "sc-y", service("orders-src", control_pb2.SERVICE_KIND_SOURCE, 2)
    )  # writes go on


async def test_concurrent_writes_from_one_client_all_apply(
    routers: RouterProcesses, client: RouterClient
) -> None:
    requests = [
        control_pb2.RegisterServiceRequest(
            instance=service(f"c-{i}", control_pb2.SERVICE_KIND_SINK, 30000 + i)
        )
        for i in range(30)
    ]
    replies = await asyncio.gather(
        *(client.call(control_grpc.ServiceRegistryStub, "Register", r, write=True) for r in requests)
    )
    assert len({r.instance_id for r in replies}) == 30
    listed = await client.call(admin_grpc.PipelineAdminStub, "ListServices", admin_pb2.ListServicesRequest())
    assert {s.name for s in listed.services} >= {f"c-{i}" for i in range(30)}
