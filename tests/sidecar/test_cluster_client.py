"""The sidecar's cluster client against a real 3-node router cluster (separate processes, real sockets)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from etlrouter._proto.v1 import admin_grpc, admin_pb2, control_grpc, control_pb2
from etlrouter.client.router import RouterClient
from etlrouter.core.metrics import REGISTRY
from etlrouter.sidecar.cluster import ClusterClient, is_stale
from etlrouter.sidecar.model import LocalService
from tests.conftest import free_port
from tests.integration.cluster import RouterProcesses

INTERVAL_S = 0.2


class RecordingTarget:
    """A data plane that only records what it was told to do (implements AssignmentTarget)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, str, list[str]]] = []
        self.fail_next_assign = False

    async def assign(self, fencing_token: int, command: control_pb2.Assign) -> None:
        if self.fail_next_assign:
            self.fail_next_assign = False
            raise RuntimeError("the stage runner could not start")
        self.calls.append(
            ("assign", fencing_token, command.dag.id, sorted(p.stage_id for p in command.local))
        )

    async def revoke(self, fencing_token: int, command: control_pb2.Revoke) -> None:
        self.calls.append(("revoke", fencing_token, command.dag_id, sorted(command.stage_ids)))

    def stage_reports(self) -> Sequence[control_pb2.StageReport]:
        return []

    def load(self) -> control_pb2.SidecarLoad:
        return control_pb2.SidecarLoad(records_per_second=1.0, running_stages=len(self.calls))

    def of(self, kind: str, dag_id: str | None = None) -> list[tuple[str, int, str, list[str]]]:
        return [c for c in self.calls if c[0] == kind and (dag_id is None or c[2] == dag_id)]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 15, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcesses]:
    cluster = RouterProcesses(tmp_path_factory.mktemp("routers"), fsync=False)
    cluster.start_all()
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
async def admin(routers: RouterProcesses) -> AsyncIterator[RouterClient]:
    routers.wait_ready(list(routers.ids))  # a previous test may have restarted a node
    client = RouterClient(routers.addresses, timeout=20)
    yield client
    client.close()


@contextlib.asynccontextmanager
async def sidecar(
    routers: RouterProcesses, sidecar_id: str, services: list[LocalService]
) -> AsyncIterator[tuple[ClusterClient, RecordingTarget, asyncio.Task[None]]]:
    target = RecordingTarget()
    client = ClusterClient(
        sidecar_id,
        f"127.0.0.1:{free_port()}",
        RouterClient(routers.addresses, timeout=10),
        target,
        heartbeat_interval_s=INTERVAL_S,
        call_timeout_s=5,
    )
    await client.register(services)
    task = asyncio.create_task(client.run())
    try:
        yield client, target, task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.close()
        client.routers.close()


def svc(name: str, kind: Any, port: int) -> LocalService:
    return LocalService(name=name, kind=kind, endpoint=f"127.0.0.1:{port}", capabilities_proto=b"\n\x01x")


async def apply(admin: RouterClient, definition: str) -> None:
    reply = await admin.call(
        admin_grpc.PipelineAdminStub,
        "ApplyPipelines",
        admin_pb2.ApplyPipelinesRequest(definition=definition, filename="test.etl"),
        write=True,
    )
    assert not reply.diagnostics, [d.message for d in reply.diagnostics]


async def stage_ids(admin: RouterClient, pipeline: str) -> dict[str, str]:
    """service name -> stage id for one pipeline's DAG."""
    listing = await admin.call(
        admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
    )
    return {
        stage.service: stage.id for dag in listing.dags for stage in dag.stages if pipeline in stage.pipelines
    }


async def sidecars(admin: RouterClient) -> dict[str, admin_pb2.SidecarInfo]:
    reply = await admin.call(admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest())
    return {s.sidecar_id: s for s in reply.sidecars}


async def test_register_assign_revoke_and_fencing(routers: RouterProcesses, admin: RouterClient) -> None:
    stale_before = metric("etlrouter_sidecar_control_commands_total", type="assign", outcome="ignored_stale")
    edge = [svc("t1-src", "source", 1001), svc("t1-sink", "sink", 1002)]
    async with (
        sidecar(routers, "t1-edge", edge) as (edge_client, edge_target, _),
        sidecar(routers, "t1-mid", [svc("t1-clean", "transform", 1003)]) as (mid_client, mid_target, _),
    ):
        registered = await sidecars(admin)
        assert {s.name for s in registered["t1-edge"].services} == {"t1-src", "t1-sink"}
        assert {s.capabilities for s in registered["t1-edge"].services} == {b"\n\x01x"}

        await apply(admin, "pipeline t1 {\n  source t1-src | transform t1-clean | sink t1-sink\n}\n")
        stage = await stage_ids(admin, "t1")
        edge_stages, mid_stages = sorted([stage["t1-src"], stage["t1-sink"]]), [stage["t1-clean"]]

        def placed() -> bool:
            edge, mid = edge_target.of("assign"), mid_target.of("assign")
            return bool(edge and mid and edge[-1][3] == edge_stages and mid[-1][3] == mid_stages)

        await eventually(placed, what="each sidecar assigned its own stages")
        (_, token, dag_id, local) = edge_target.of("assign")[-1]
        assert token > 0 and edge_client.applied[dag_id] >= token
        assert edge_client.running == {dag_id: set(local)}

        # Heartbeats report the applied token: the router does not send the same Assign again.
        count = len(edge_target.calls)
        await asyncio.sleep(5 * INTERVAL_S)
        assert len(edge_target.calls) == count

        # A command older than what was applied for its DAG is ignored (and counted), in one place.
        assign = edge_target.of("assign")[-1]
        stale = control_pb2.AssignmentCommand(
            fencing_token=assign[1] - 1,
            assign=control_pb2.Assign(dag=control_pb2.DagSpec(id=dag_id)),
        )
        await edge_client.apply_commands([stale])
        assert len(edge_target.calls) == count and edge_client.stale_ignored == 1
        assert (
            metric("etlrouter_sidecar_control_commands_total", type="assign", outcome="ignored_stale")
            == stale_before + 1
        )
        assert is_stale({dag_id: 7}, dag_id, 6) and not is_stale({dag_id: 7}, dag_id, 7)

        # Deleting the pipeline revokes the whole DAG on both sidecars, with a newer token.
        await admin.call(
            admin_grpc.PipelineAdminStub,
            "DeletePipeline",
            admin_pb2.DeletePipelineRequest(name="t1"),
            write=True,
        )
        await eventually(lambda: bool(edge_target.of("revoke") and mid_target.of("revoke")), what="revokes")
        (_, revoke_token, revoked_dag, revoked_stages) = edge_target.of("revoke")[-1]
        assert revoked_dag == dag_id and revoked_stages == [] and revoke_token > token
        assert edge_client.running == {} and edge_client.applied[dag_id] == revoke_token
        assert mid_client.running == {}


async def test_a_failed_assign_is_retried_with_the_next_heartbeat(
    routers: RouterProcesses, admin: RouterClient
) -> None:
    services = [svc("t2-src", "source", 2001), svc("t2-sink", "sink", 2002)]
    async with sidecar(routers, "t2", services) as (_, target, _):
        target.fail_next_assign = True
        failed = metric("etlrouter_sidecar_control_commands_total", type="assign", outcome="failed")
        await apply(admin, "pipeline t2 {\n  source t2-src | sink t2-sink\n}\n")
        await eventually(lambda: bool(target.of("assign")), what="the assign after a failure")
        assert (
            metric("etlrouter_sidecar_control_commands_total", type="assign", outcome="failed") == failed + 1
        )
        stage = await stage_ids(admin, "t2")
        assert target.of("assign")[-1][3] == sorted(stage.values())
        await admin.call(
            admin_grpc.PipelineAdminStub,
            "DeletePipeline",
            admin_pb2.DeletePipelineRequest(name="t2"),
            write=True,
        )
        await eventually(lambda: bool(target.of("revoke")), what="the revoke")


async def test_discovery_changes_are_sent_with_the_next_heartbeat(
    routers: RouterProcesses, admin: RouterClient
) -> None:
    async with sidecar(routers, "t3", [svc("t3-a", "sink", 3001)]) as (client, _, task):
        client.update_services([svc("t3-a", "sink", 3001), svc("t3-b", "lookup", 3002)])

        async def both() -> bool:
            return {s.name for s in (await sidecars(admin))["t3"].services} == {"t3-a", "t3-b"}

        await eventually(both, what="the new service list at the router")
        assert not client.services_changed

        # SIGTERM after draining: leave the cluster; the heartbeat loop ends by itself.
        assert await client.deregister() is True
        await asyncio.wait_for(task, 5)
        assert "t3" not in await sidecars(admin)


async def test_heartbeats_continue_after_kill_9_of_the_leader(
    routers: RouterProcesses, admin: RouterClient
) -> None:
    async with sidecar(routers, "t4", [svc("t4-a", "sink", 4001)]) as (client, _, _):
        status = await admin.call(
            admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
        )
        old_leader = status.leader_id
        routers.kill(old_leader)
        killed_at = time.monotonic()
        registrations = metric("etlrouter_sidecar_control_registrations_total", outcome="registered")
        try:
            sent = metric("etlrouter_sidecar_control_heartbeats_total", outcome="sent")
            old_address = routers.address(old_leader)

            def moved_on() -> bool:
                leader = client.routers.leader_address
                now_sent = metric("etlrouter_sidecar_control_heartbeats_total", outcome="sent")
                return leader is not None and leader != old_address and now_sent >= sent + 5

            await eventually(moved_on, timeout=20, what="heartbeats to the new leader")
            survivors = RouterClient([routers.address(n) for n in routers.ids if n != old_leader], timeout=20)
            try:
                seen = await sidecars(survivors)
                assert "t4" in seen and seen["t4"].last_heartbeat_age_ms < 2000
            finally:
                survivors.close()
            # It stayed registered: the new leader knew it (no reregister was needed).
            assert (
                metric("etlrouter_sidecar_control_registrations_total", outcome="registered") == registrations
            )
            assert time.monotonic() - killed_at < 20
        finally:
            routers.start(old_leader)
            routers.wait_ready([old_leader])


async def leader(admin: RouterClient) -> str:
    status = await admin.call(
        admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
    )
    return str(status.leader_id)


def heartbeats_served(routers: RouterProcesses, node: str, method: str) -> float:
    return routers.metric(node, "etlrouter_api_request_seconds_count", method=method, status="OK")


async def test_heartbeats_ride_one_stream_to_the_leader_and_follow_a_leadership_transfer(
    routers: RouterProcesses, admin: RouterClient
) -> None:
    old = await leader(admin)
    streams = routers.metric(old, "etlrouter_sidecar_heartbeat_streams")
    async with sidecar(routers, "t7", [svc("t7-a", "sink", 7001)]) as (client, _, _):
        failed = metric("etlrouter_sidecar_control_heartbeats_total", outcome="failed")
        await eventually(
            lambda: routers.metric(old, "etlrouter_sidecar_heartbeat_streams") == streams + 1,
            what="a heartbeat stream open on the leader",
        )
        calls = heartbeats_served(routers, old, "Heartbeat")
        on_stream = heartbeats_served(routers, old, "HeartbeatStream")
        await asyncio.sleep(10 * INTERVAL_S)
        # Ten intervals later: every heartbeat came on the stream, none as a call.
        assert heartbeats_served(routers, old, "Heartbeat") == calls
        assert heartbeats_served(routers, old, "HeartbeatStream") >= on_stream + 5

        await admin.call(
            admin_grpc.PipelineAdminStub,
            "TransferLeadership",
            admin_pb2.TransferLeadershipRequest(),
            write=True,
        )
        new = await leader(admin)
        assert new != old
        new_streams = routers.metric(new, "etlrouter_sidecar_heartbeat_streams")
        await eventually(
            lambda: (
                client.routers.leader_address == routers.address(new)
                and routers.metric(new, "etlrouter_sidecar_heartbeat_streams") == new_streams + 1
            ),
            what="the heartbeat stream moved to the new leader",
        )
        # The old leader ended the stream (the leader trailer); no heartbeat was lost on the way.
        await eventually(
            lambda: routers.metric(old, "etlrouter_sidecar_heartbeat_streams") == streams,
            what="the old leader's stream closed",
        )
        assert metric("etlrouter_sidecar_control_heartbeats_total", outcome="failed") == failed
        seen = await sidecars(admin)
        assert seen["t7"].last_heartbeat_age_ms < 2000


async def test_a_heartbeat_stream_carries_one_sidecars_heartbeats(
    routers: RouterProcesses, admin: RouterClient
) -> None:
    """The router checks the caller against the first request (security/authz.py) and holds the stream
    to that sidecar: a later request naming another one ends it."""
    async with sidecar(routers, "t8", [svc("t8-a", "sink", 8001)]), sidecar(routers, "t9", []):
        host, port = routers.address(await leader(admin)).rsplit(":", 1)
        channel = Channel(host, int(port))
        try:
            # grpclib raises the router's status when the call is left, whether the router's reset
            # came before or after the client ended its side.
            with pytest.raises(GRPCError) as refused:
                async with control_grpc.SidecarCoordinatorStub(channel).HeartbeatStream.open() as stream:
                    await stream.send_message(control_pb2.SidecarHeartbeatRequest(sidecar_id="t8"))
                    assert not (await stream.recv_message()).reregister
                    await stream.send_message(control_pb2.SidecarHeartbeatRequest(sidecar_id="t9"), end=True)
                    assert await stream.recv_message() is None  # the router ended the stream
            assert refused.value.status == Status.INVALID_ARGUMENT
            assert "heartbeats of 't8', not of 't9'" in str(refused.value.message)
        finally:
            channel.close()


class CallsOnlyCoordinator(control_grpc.SidecarCoordinatorBase):
    """A router of a version before heartbeat streams: it answers heartbeat calls only (grpclib answers
    UNIMPLEMENTED for the stream, as for any method a server does not have)."""

    def __init__(self) -> None:
        self.calls = 0
        self.streams = 0

    async def RegisterSidecar(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(control_pb2.RegisterSidecarResponse(heartbeat_interval_ms=200))

    async def Heartbeat(self, stream: Any) -> None:
        await stream.recv_message()
        self.calls += 1
        await stream.send_message(control_pb2.SidecarHeartbeatResponse())

    async def DeregisterSidecar(self, stream: Any) -> None:
        await stream.recv_message()
        await stream.send_message(control_pb2.DeregisterSidecarResponse())

    async def HeartbeatStream(self, stream: Any) -> None:
        self.streams += 1
        raise GRPCError(Status.UNIMPLEMENTED, "Method not found")


async def test_a_router_without_heartbeat_streams_is_heartbeated_by_call() -> None:
    coordinator = CallsOnlyCoordinator()
    server = Server([coordinator])
    port = free_port()
    await server.start("127.0.0.1", port)
    routers = RouterClient([f"127.0.0.1:{port}"], timeout=5)
    client = ClusterClient(
        "old", f"127.0.0.1:{free_port()}", routers, RecordingTarget(), heartbeat_interval_s=0.05
    )
    try:
        await client.register([])
        failed = metric("etlrouter_sidecar_control_heartbeats_total", outcome="failed")
        for _ in range(5):
            await client.heartbeat()
        # The first by call, the second tried the stream (UNIMPLEMENTED) and went by call, then calls only.
        assert coordinator.calls == 5 and coordinator.streams == 1
        assert metric("etlrouter_sidecar_control_heartbeats_total", outcome="failed") == failed
    finally:
        await client.close()
        routers.close()
        server.close()
        await server.wait_closed()


async def test_a_sidecar_that_fell_silent_registers_again_by_itself(
    routers: RouterProcesses, admin: RouterClient
) -> None:
    services = [svc("t5-src", "source", 5001), svc("t5-sink", "sink", 5002)]
    async with sidecar(routers, "t5", services) as (client, target, task):
        first_revision = client.revision
        await apply(admin, "pipeline t5 {\n  source t5-src | sink t5-sink\n}\n")
        await eventually(lambda: bool(target.of("assign")), what="the assign")
        (_, token, dag_id, local) = target.of("assign")[-1]
        assigned_before = len(target.of("assign"))
        async with sidecar(routers, "t5-spare", services):  # where the stages go when t5 expires
            task.cancel()  # stop heartbeating; the test cluster expires sidecars after 3 s
            with contextlib.suppress(asyncio.CancelledError):
                await task

            async def gone() -> bool:
                return "t5" not in await sidecars(admin)

            await eventually(gone, timeout=20, what="the silent sidecar expired")

            async def spare_holds_them() -> bool:
                return {p.stage_id for p in (await sidecars(admin))["t5-spare"].stages} == set(local)

            await eventually(spare_holds_them, timeout=10, what="the stages moved to t5-spare")
            registrations = metric("etlrouter_sidecar_control_registrations_total", outcome="registered")
            task2 = asyncio.create_task(client.run())
            try:

                async def back() -> bool:
                    return "t5" in await sidecars(admin)

                await eventually(back, timeout=10, what="the sidecar registered again")
                assert client.registered and client.revision > first_revision
                assert (
                    metric("etlrouter_sidecar_control_registrations_total", outcome="registered")
                    == registrations + 1
                )
                # Its stages ran on t5-spare meanwhile: the re-registration's answer does not mention the
                # DAG at the old token, so the client stopped it locally (at the token it had applied).
                await eventually(lambda: bool(target.of("revoke")), what="the local revoke")
                assert target.of("revoke") == [("revoke", token, dag_id, [])]
                # The scheduler may then hand a stage back to the returned sidecar (spreading the DAG):
                # that is a new assignment with a newer token, never the old one resumed.
                assert all(call[1] > token for call in target.of("assign")[assigned_before:])
            finally:
                task2.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task2
        await admin.call(
            admin_grpc.PipelineAdminStub,
            "DeletePipeline",
            admin_pb2.DeletePipelineRequest(name="t5"),
            write=True,
        )


async def test_an_unreachable_cluster_is_warned_about_once_and_deregister_reports_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    target = RecordingTarget()
    routers = RouterClient([f"127.0.0.1:{free_port()}"], timeout=0.3)
    client = ClusterClient(
        "t6", "127.0.0.1:1", routers, target, heartbeat_interval_s=0.05, call_timeout_s=0.2
    )
    caplog.set_level(logging.WARNING, logger="etlrouter.sidecar.cluster")
    task = asyncio.create_task(client.run())
    try:
        failed = metric("etlrouter_sidecar_control_registrations_total", outcome="failed")
        await eventually(
            lambda: metric("etlrouter_sidecar_control_registrations_total", outcome="failed") >= failed + 3,
            timeout=10,
            what="three failed attempts",
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert target.calls == []  # the data plane was not touched
    assert await client.deregister(timeout=0.2) is False
    await client.close()
    routers.close()


async def test_outage_retries_double_from_200_ms_to_the_heartbeat_interval_with_20_percent_jitter() -> None:
    routers = RouterClient([f"127.0.0.1:{free_port()}"], timeout=0.3)
    client = ClusterClient("t7", "127.0.0.1:1", routers, RecordingTarget(), 1.0, rng=random.Random(3))
    ceilings = [0.2, 0.4, 0.8, 1.0, 1.0]
    delays = [client._backoff(n) for n in range(1, 6)]
    assert all(0.8 * c <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    again = ClusterClient("t7", "127.0.0.1:1", routers, RecordingTarget(), 1.0, rng=random.Random(3))
    assert [again._backoff(n) for n in range(1, 6)] == delays  # a seeded source repeats the schedule
    fast = ClusterClient("t8", "127.0.0.1:1", routers, RecordingTarget(), heartbeat_interval_s=0.05)
    assert 0.04 <= fast._backoff(1) <= 0.05  # never longer than one (short) interval
    await client.close()
    await again.close()
    await fast.close()
    routers.close()
