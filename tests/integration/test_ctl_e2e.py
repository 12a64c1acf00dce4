"""`etlrouter ctl` against a real 3-node router cluster: apply, list, get, describe, delete, services,
sidecars, cluster status, backup create/restore; every output format; exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from etlrouter._proto.v1 import control_grpc, control_pb2
from etlrouter.client.router import RouterClient
from etlrouter.control import ControlState
from tests.conftest import free_port
from tests.integration.cluster import RouterProcesses

PIPELINES = """
pipeline to-archive {
  source orders | transform clean (parallelism = 2) | sink archive
}
pipeline to-warehouse {
  source orders | transform clean (parallelism = 2) | sink warehouse
}
"""


SIDECARS = ["sc-orders", "sc-clean", "sc-archive", "sc-warehouse"]


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcesses]:
    cluster = RouterProcesses(tmp_path_factory.mktemp("ctl"), fsync=False)
    cluster.start_all()
    stop = threading.Event()
    heartbeats = threading.Thread(
        target=lambda: asyncio.run(keep_alive(cluster.addresses, stop)), daemon=True
    )
    try:
        cluster.wait_ready()
        asyncio.run(register_sidecars(cluster.addresses))
        heartbeats.start()  # fake sidecars: without heartbeats the leader would expire them
        yield cluster
    finally:
        stop.set()
        if heartbeats.is_alive():
            heartbeats.join(timeout=10)
        cluster.stop_all()


async def keep_alive(addresses: list[str], stop: threading.Event) -> None:
    client = RouterClient(addresses, timeout=5)
    try:
        while not stop.is_set():
            for sidecar_id in SIDECARS:
                request = control_pb2.SidecarHeartbeatRequest(
                    sidecar_id=sidecar_id, health=control_pb2.HEALTH_SERVING
                )
                with contextlib.suppress(Exception):
                    await client.call(control_grpc.SidecarCoordinatorStub, "Heartbeat", request)
            await asyncio.sleep(0.5)
    finally:
        client.close()


async def register_sidecars(addresses: list[str]) -> None:
    client = RouterClient(addresses, timeout=20)
    kinds = {
        "orders": control_pb2.SERVICE_KIND_SOURCE,
        "clean": control_pb2.SERVICE_KIND_TRANSFORM,
        "archive": control_pb2.SERVICE_KIND_SINK,
        "warehouse": control_pb2.SERVICE_KIND_SINK,
    }
    try:
        for i, (name, kind) in enumerate(kinds.items()):
            instance = control_pb2.ServiceInstance(name=name, kind=kind, endpoint=f"127.0.0.1:{50051 + i}")
            request = control_pb2.RegisterSidecarRequest(
                sidecar_id=f"sc-{name}", data_address=f"127.0.0.1:{7500 + i}", services=[instance]
            )
            await client.call(control_grpc.SidecarCoordinatorStub, "RegisterSidecar", request, write=True)
    finally:
        client.close()


def ctl(
    routers: RouterProcesses | None, *args: str, router: str | None = None
) -> subprocess.CompletedProcess[str]:
    address = router or (routers.addresses[1] if routers else "127.0.0.1:1")  # a follower, usually
    return subprocess.run(
        [sys.executable, "-m", "etlrouter", "ctl", "--router", address, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_apply_is_idempotent_and_lists_in_every_format(routers: RouterProcesses, tmp_path: Path) -> None:
    file = tmp_path / "orders.etl"
    file.write_text(PIPELINES)
    first = ctl(routers, "apply", "-f", str(file))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [
        "pipeline/to-archive created (generation 1)",
        "pipeline/to-warehouse created (generation 1)",
    ]
    again = ctl(routers, "-o", "json", "apply", "-f", str(file))
    assert [c["action"] for c in json.loads(again.stdout)["changes"]] == ["UNCHANGED", "UNCHANGED"]

    table = ctl(routers, "list")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["NAME", "PHASE", "GENERATION"]
    assert [r.split()[0] for r in rows] == ["to-archive", "to-warehouse"]
    as_json = json.loads(ctl(routers, "-o", "json", "list").stdout)
    as_yaml = yaml.safe_load(ctl(routers, "-o", "yaml", "list").stdout)
    assert as_json == as_yaml
    assert {p["name"]: p["dag"] for p in as_json}["to-archive"] == {p["name"]: p["dag"] for p in as_json}[
        "to-warehouse"
    ]

    got = json.loads(ctl(routers, "-o", "json", "get", "to-archive").stdout)
    assert got[0]["generation"] == 1


def test_describe_shows_shared_stages_and_placement(routers: RouterProcesses, tmp_path: Path) -> None:
    file = tmp_path / "orders.etl"
    file.write_text(PIPELINES)
    assert ctl(routers, "apply", "-f", str(file)).returncode == 0
    for _ in range(50):  # the leader places stages within a control-loop round
        described = json.loads(ctl(routers, "-o", "json", "describe", "to-archive").stdout)
        if described["phase"] == "RUNNING":
            break
    assert described["phase"] == "RUNNING"
    clean = next(s for s in described["stages"] if s["service"] == "clean")
    assert clean["shared_with"] == ["to-warehouse"]
    assert clean["parallelism"] == 2 and clean["running_on"] == ["sc-clean#0", "sc-clean#1"]
    text = ctl(routers, "describe", "to-archive")
    assert "Phase:       RUNNING" in text.stdout and "source orders" in text.stdout


def test_services_sidecars_and_cluster_status(routers: RouterProcesses) -> None:
    services = json.loads(ctl(routers, "-o", "json", "services").stdout)
    assert {s["name"]: s["kind"] for s in services}["orders"] == "SOURCE"
    sidecars = yaml.safe_load(ctl(routers, "-o", "yaml", "sidecars").stdout)
    assert {s["id"] for s in sidecars} == set(SIDECARS)
    assert all(s["health"] == "SERVING" for s in sidecars)
    status = json.loads(ctl(routers, "-o", "json", "cluster", "status").stdout)
    assert len(status["members"]) == 3 and status["leader"] in routers.ids
    assert sum(1 for m in status["members"] if m["role"] == "leader") == 1


def test_delete_and_errors(routers: RouterProcesses, tmp_path: Path) -> None:
    file = tmp_path / "tmp.etl"
    file.write_text("pipeline short-lived { source orders | sink archive }\n")
    assert ctl(routers, "apply", "-f", str(file)).returncode == 0
    deleted = ctl(routers, "delete", "short-lived")
    assert deleted.returncode == 0 and deleted.stdout.strip() == "pipeline/short-lived deleted"
    missing = ctl(routers, "get", "short-lived")
    assert missing.returncode == 2 and "NOT_FOUND" in missing.stderr
    bad = tmp_path / "bad.etl"
    bad.write_text("pipeline p { source nope | sink archive }\n")
    invalid = ctl(routers, "apply", "-f", str(bad))
    assert invalid.returncode == 2
    assert f"{bad}:1:21: error:" in invalid.stderr and "nope" in invalid.stderr


def test_unreachable_cluster_exits_3() -> None:
    result = ctl(None, "--output", "json", "list", router=f"127.0.0.1:{free_port()}")
    assert result.returncode == 3
    assert "cannot reach the router cluster" in result.stderr


def test_backup_and_restore_into_a_fresh_cluster(routers: RouterProcesses, tmp_path: Path) -> None:
    file = tmp_path / "orders.etl"
    file.write_text(PIPELINES)
    assert ctl(routers, "apply", "-f", str(file)).returncode == 0
    snapshot = tmp_path / "backup.snap"
    created = ctl(routers, "backup", "create", str(snapshot))
    assert created.returncode == 0, created.stderr
    assert snapshot.stat().st_size > 0

    fresh = RouterProcesses(tmp_path / "fresh", size=1, fsync=False)
    fresh.start_all()
    try:
        fresh.wait_ready()
        restored = ctl(None, "backup", "restore", str(snapshot), router=fresh.addresses[0])
        assert restored.returncode == 0, restored.stderr
        before = json.loads(ctl(routers, "-o", "json", "list").stdout)
        after = json.loads(ctl(None, "-o", "json", "list", router=fresh.addresses[0]).stdout)
        # Same pipelines and generations; phases differ (the fresh cluster has no sidecars).
        assert [(p["name"], p["generation"], p["dag"]) for p in after] == [
            (p["name"], p["generation"], p["dag"]) for p in before
        ]
        # The whole portable state (pipelines with generations, direct services, merged DAGs) is identical:
        # compare canonical dumps of a backup of each cluster.
        copy = tmp_path / "copy.snap"
        assert ctl(None, "backup", "create", str(copy), router=fresh.addresses[0]).returncode == 0
        original_dump = ControlState.from_snapshot(snapshot.read_bytes()).canonical_dump(portable=True)
        restored_dump = ControlState.from_snapshot(copy.read_bytes()).canonical_dump(portable=True)
        assert restored_dump == original_dump
        again = ctl(None, "backup", "restore", str(snapshot), router=fresh.addresses[0])
        assert again.returncode == 2 and "FAILED_PRECONDITION" in again.stderr  # only into an empty cluster
    finally:
        fresh.stop_all()
