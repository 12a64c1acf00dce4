"""Shared by B's operator tests: a real router cluster with registered services, and an in-process
operator (Manager + reconcilers) talking to the real kube-apiserver."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.core.config import Config
from etlrouter.operator.controller import Manager, OperatorContext, Reconciler
from etlrouter.operator.kube import ApiClient, Resource, request
from tests.e2e.processes import Processes, connector, ready, sidecar, wait_until
from tests.integration.cluster import RouterProcesses
from tests.k8s.conftest import Kube

BASE = "/apis/etlrouter.io/v1alpha1"
_T = TypeVar("_T")


class World:
    """3 routers, a source `orders` and sinks `archive` and `warehouse`, one sidecar fronting all three."""

    def __init__(self, workdir: Path) -> None:
        self.routers = RouterProcesses(workdir / "routers", fsync=False)
        self.procs = Processes(workdir / "procs")
        self.workdir = workdir

    def start(self) -> None:
        self.routers.start_all()
        self.routers.wait_ready()
        ports = [
            connector(self.procs, "orders", "generator", "--rate", "50"),
            connector(
                self.procs, "archive", "jsonl_file_sink", "--path", str(self.workdir / "archive.jsonl")
            ),
            connector(self.procs, "warehouse", "jsonl_file_sink", "--path", str(self.workdir / "wh.jsonl")),
        ]
        http = sidecar(self.procs, "sc-world", self.routers, ports)
        wait_until(lambda: ready(http), 30, "the sidecar to register its services")

    def stop(self) -> None:
        self.procs.stop_all()
        self.routers.stop_all()

    @property
    def address(self) -> str:
        return self.routers.address("router-0")

    def client(self) -> RouterClient:
        return RouterClient(self.routers.addresses, timeout=15)


@contextlib.contextmanager
def world(workdir: Path) -> Iterator[World]:
    w = World(workdir)
    try:
        w.start()
        yield w
    finally:
        w.stop()


async def router_pipelines(client: RouterClient) -> dict[str, admin_pb2.Pipeline]:
    reply = await client.call(admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest())
    return {p.name: p for p in reply.pipelines}


@contextlib.asynccontextmanager
async def operator(
    kube: Kube, namespace: str, make: Callable[[OperatorContext], Sequence[Reconciler]]
) -> AsyncIterator[OperatorContext]:
    api = await kube.api_client()
    ctx = OperatorContext(api=api, config=Config(), namespace=namespace)
    manager = Manager(ctx, make(ctx), resync_s=5.0)
    await manager.start()
    try:
        yield ctx
    finally:
        await manager.stop()
        await api.close()


async def eventually(check: Callable[[], Awaitable[_T | None]], what: str, timeout: float = 30.0) -> _T:
    """Poll `check()` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


async def get(api: ApiClient, path: str) -> dict[str, Any] | None:
    try:
        obj: dict[str, Any] = await request(api, "GET", path)
    except Exception as e:
        if getattr(e, "status", None) == 404:
            return None
        raise
    return obj


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return dict(c)
    return {}


async def events_of(api: ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    reply = await request(api, "GET", Resource("v1", "events").path(namespace))
    return [e for e in reply.get("items") or [] if e["involvedObject"]["name"] == name]
