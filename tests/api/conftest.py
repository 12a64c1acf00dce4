"""Real router processes with sidecars that keep heartbeating, and a small GraphQL-over-HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from etlrouter._proto.v1 import control_grpc, control_pb2
from etlrouter.client.router import RouterClient
from tests.integration.cluster import RouterProcesses

# Sidecars and the services they offer: two pipelines below share `orders-src | clean`.
SIDECARS = {
    "sc-src": ("orders-src", control_pb2.SERVICE_KIND_SOURCE),
    "sc-clean": ("clean", control_pb2.SERVICE_KIND_TRANSFORM),
    "sc-warehouse": ("warehouse", control_pb2.SERVICE_KIND_SINK),
    "sc-audit": ("audit-log", control_pb2.SERVICE_KIND_SINK),
}
TWO_PIPELINES = """\
pipeline orders {
  source orders-src | transform clean | sink warehouse
}

pipeline audit {
  source orders-src | transform clean | sink audit-log  on_branch_lag = shed(after = 5s)
}
"""


class GraphQLHttp:
    """POSTs GraphQL requests to a router's /graphql, as curl or a browser would."""

    def __init__(self, session: aiohttp.ClientSession, routers: RouterProcesses) -> None:
        self.session = session
        self.routers = routers

    def url(self, node: str) -> str:
        return f"http://127.0.0.1:{self.routers.http_ports[node]}/graphql"

    async def post(
        self, node: str, query: str, variables: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any]]:
        body: dict[str, Any] = {"query": query}
        if variables is not None:
            body["variables"] = variables
        async with self.session.post(self.url(node), json=body) as response:
            return response.status, await response.json()

    async def data(self, node: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `data` of a request that must succeed without errors."""
        status, body = await self.post(node, query, variables)
        assert status == 200 and "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    async def roles(self) -> tuple[str, list[str]]:
        """(leader, followers) by asking each router for its cluster view."""
        leader = ""
        for node in self.routers.ids:
            cluster = (await self.data(node, "{ cluster { isLeader } }"))["cluster"]
            if cluster["isLeader"]:
                leader = node
        assert leader, "no router says it is the leader"
        return leader, [n for n in self.routers.ids if n != leader]


def _start(tmp_path: Path, size: int) -> RouterProcesses:
    cluster = RouterProcesses(tmp_path, size, fsync=False)
    cluster.start_all()
    try:
        cluster.wait_ready()
    except BaseException:
        cluster.stop_all()
        raise
    return cluster


@pytest.fixture
def routers(tmp_path: Path) -> Iterator[RouterProcesses]:
    cluster = _start(tmp_path, 3)
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
def single_router(tmp_path: Path) -> Iterator[RouterProcesses]:
    cluster = _start(tmp_path, 1)
    try:
        yield cluster
    finally:
        cluster.stop_all()


@pytest.fixture
async def client(routers: RouterProcesses) -> AsyncIterator[RouterClient]:
    c = RouterClient(routers.addresses, timeout=20)
    yield c
    c.close()


@pytest.fixture
async def http(routers: RouterProcesses) -> AsyncIterator[GraphQLHttp]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield GraphQLHttp(session, routers)


@pytest.fixture
async def sidecars(client: RouterClient) -> AsyncIterator[list[str]]:
    """Registers SIDECARS and heartbeats them every 0.3 s (the routers expire silent ones after 3 s)."""
    for port, (sidecar_id, (name, kind)) in enumerate(SIDECARS.items(), start=51000):
        await client.call(
            control_grpc.SidecarCoordinatorStub,
            "RegisterSidecar",
            control_pb2.RegisterSidecarRequest(
                sidecar_id=sidecar_id,
                data_address=f"127.0.0.1:{port + 100}",
                services=[control_pb2.ServiceInstance(name=name, kind=kind, endpoint=f"127.0.0.1:{port}")],
            ),
            write=True,
        )

    async def heartbeat() -> None:
        while True:
            for sidecar_id in SIDECARS:
                with contextlib.suppress(Exception):
                    await client.call(
                        control_grpc.SidecarCoordinatorStub,
                        "Heartbeat",
                        control_pb2.SidecarHeartbeatRequest(
                            sidecar_id=sidecar_id, health=control_pb2.HEALTH_SERVING
                        ),
                    )
            await asyncio.sleep(0.3)

    task = asyncio.ensure_future(heartbeat())
    try:
        yield list(SIDECARS)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
