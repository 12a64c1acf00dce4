"""One service whose name is registered elsewhere with another kind must not keep the other services of its
sidecar out of the cluster. Real processes throughout: 3 routers, 2 sidecars, 3 connector services.

sc-a fronts `orders` (a source); sc-b fronts `orders` (a sink: the clash) and `audit` (a sink). `audit`
registers and carries a pipeline fed by sc-a's `orders`; sc-b's `orders` joins once sc-a has left."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from etlrouter._proto.v1 import control_pb2
from etlrouter.client.router import RouterClient
from etlrouter.core.metrics import REGISTRY
from tests.conftest import free_port
from tests.e2e.processes import Processes, connector, jsonl_offsets, ready, sidecar, wait_until
from tests.integration.cluster import RouterProcesses
from tests.sidecar.test_cluster_client import eventually, metric, sidecars, svc
from tests.sidecar.test_cluster_client import sidecar as cluster_client

RECORDS = 300
PIPELINE = "pipeline audit-orders {\n  source orders | sink audit\n}\n"
KINDS = {control_pb2.SERVICE_KIND_SOURCE: "source", control_pb2.SERVICE_KIND_SINK: "sink"}
REJECTED_LINE = re.compile(r'^etlrouter_sidecar_services_rejected\{service="orders"\} (\S+)$', re.MULTILINE)


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[RouterProcesses, Processes, Path]]:
    routers = RouterProcesses(tmp_path / "routers", fsync=False)
    procs = Processes(tmp_path / "procs")
    routers.start_all()
    try:
        routers.wait_ready()
        yield routers, procs, tmp_path
    finally:
        procs.stop_all()
        routers.stop_all()


def ctl(routers: RouterProcesses, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "etlrouter", "ctl", "--router", routers.addresses[0], *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def services(routers: RouterProcesses) -> set[tuple[str, str, str]]:
    """(name, kind, sidecar) of every registered service, through `etlrouter ctl services`."""
    done = ctl(routers, "-o", "json", "services")
    assert done.returncode == 0, done.stderr
    return {(s["name"], s["kind"], s["sidecar"]) for s in json.loads(done.stdout)}


def http_get(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return str(response.read().decode())
    except OSError as error:  # /readyz answers 503 while not ready: read the body all the same
        body = getattr(error, "read", None)
        return body().decode() if body else ""


def rejected_gauge(port: int) -> float | None:
    match = REJECTED_LINE.search(http_get(port, "/metrics"))
    return float(match.group(1)) if match else None


def test_a_kind_clash_leaves_the_other_services_registered_until_it_clears(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    audit_file = tmp / "audit.jsonl"
    source = connector(procs, "orders", "generator", "--limit", str(RECORDS), "--seed", "3")
    http_a = sidecar(procs, "sc-a", routers, [source])
    wait_until(lambda: ready(http_a), 30, "sc-a registered")

    # A sink that calls itself `orders` too (its process and log are "orders-sink").
    clashing, sink_path = free_port(), ["--path", str(tmp / "orders.jsonl")]
    procs.start(
        "orders-sink",
        [
            "-m",
            "etlrouter.connectors.jsonl_file_sink",
            "--name",
            "orders",
            "--port",
            str(clashing),
            *sink_path,
        ],
    )
    audit = connector(procs, "audit", "jsonl_file_sink", "--path", str(audit_file))
    http_b = sidecar(procs, "sc-b", routers, [clashing, audit])

    # sc-b registers with `audit` only; it is ready and says what was left out.
    wait_until(lambda: ("audit", "SINK", "sc-b") in services(routers), 30, "audit registered behind sc-b")
    assert ("orders", "SOURCE", "sc-a") in services(routers)
    assert not any(name == "orders" and sc == "sc-b" for name, _, sc in services(routers))
    wait_until(lambda: ready(http_b), 10, "sc-b ready")
    reason = json.loads(http_get(http_b, "/readyz"))["reason"]
    assert "orders (offered as a sink, registered as a source)" in reason, reason
    assert rejected_gauge(http_b) == 1.0

    # The unrelated service is usable: a pipeline from sc-a's source into sc-b's `audit` runs.
    (tmp / "p.etl").write_text(PIPELINE)
    applied = ctl(routers, "apply", "-f", str(tmp / "p.etl"))
    assert applied.returncode == 0, applied.stderr
    wait_until(
        lambda: set(jsonl_offsets(audit_file)) == set(range(RECORDS)), 60, f"{RECORDS} records in audit"
    )
    deleted = ctl(routers, "delete", "audit-orders")
    assert deleted.returncode == 0, deleted.stderr

    # Resent with every heartbeat, but warned about once.
    warning = "did not register service `orders`"
    assert procs.log("sc-b").count(warning) == 1, procs.log("sc-b")[-3000:]

    # sc-a leaves (SIGTERM: drain, deregister); sc-b's `orders` joins within a few heartbeats (500 ms).
    assert procs.stop("sc-a") == 0
    wait_until(lambda: ("orders", "SINK", "sc-b") in services(routers), 10, "sc-b's orders registered")
    assert ("audit", "SINK", "sc-b") in services(routers)
    wait_until(lambda: rejected_gauge(http_b) is None, 5, "the rejected gauge cleared")
    reason = json.loads(http_get(http_b, "/readyz"))["reason"]
    assert "not registered" not in reason, reason
    assert "service `orders` is registered now" in procs.log("sc-b")
    assert procs.log("sc-b").count(warning) == 1
    assert "Traceback" not in procs.log("sc-b"), procs.log("sc-b")[-3000:]


async def test_a_clashing_service_found_later_is_left_out_of_the_heartbeat_registration(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    """The heartbeat path (services_changed), with in-process cluster clients against the real routers."""
    routers, _, _ = system
    admin = RouterClient(routers.addresses, timeout=20)

    async def registered(sidecar_id: str) -> set[tuple[str, str]]:
        listing = await sidecars(admin)
        return (
            {(s.name, KINDS[s.kind]) for s in listing[sidecar_id].services}
            if sidecar_id in listing
            else set()
        )

    failed = metric("etlrouter_sidecar_control_heartbeats_total", outcome="failed")
    try:
        async with (
            cluster_client(routers, "hb-a", [svc("hb-orders", "source", 5001)]) as (a, _, a_task),
            cluster_client(routers, "hb-b", [svc("hb-audit", "sink", 5002)]) as (b, _, _),
        ):
            assert not b.rejected
            b.update_services([svc("hb-audit", "sink", 5002), svc("hb-orders", "sink", 5003)])
            await eventually(lambda: "hb-orders" in b.rejected, what="hb-orders rejected")
            assert b.rejected["hb-orders"].registered == "source"
            assert "hb-orders (offered as a sink, registered as a source)" in b.readiness_note()
            assert metric("etlrouter_sidecar_services_rejected", service="hb-orders") == 1
            assert await registered("hb-b") == {("hb-audit", "sink")}
            # The list goes with every heartbeat now; the router accepts it each time.
            sent = metric("etlrouter_sidecar_control_heartbeats_total", outcome="sent")
            await eventually(
                lambda: metric("etlrouter_sidecar_control_heartbeats_total", outcome="sent") >= sent + 3,
                what="three more heartbeats",
            )
            assert metric("etlrouter_sidecar_control_heartbeats_total", outcome="failed") == failed
            assert await registered("hb-b") == {("hb-audit", "sink")}

            assert await a.deregister() is True
            await asyncio.wait_for(a_task, 5)

            async def joined() -> bool:
                return await registered("hb-b") == {("hb-audit", "sink"), ("hb-orders", "sink")}

            await eventually(joined, what="hb-orders registered behind hb-b")
            await eventually(lambda: not b.rejected, what="nothing rejected any more")
            assert b.readiness_note() == ""
            assert (
                REGISTRY.get_sample_value("etlrouter_sidecar_services_rejected", {"service": "hb-orders"})
                is None
            )
    finally:
        admin.close()
