"""Concurrent clients and a status poller, run on a thread inside the `client` namespace.

- register clients: each op picks one of KEYS and either writes it (ApplyPipelines of a pipeline named after
  the key, carrying the written value in a stage option) or reads it (GetPipeline, linearizable); the history
  goes to the project's linearizability checker as a key-value register history;
- a durable writer: registers a new service name per write and remembers which writes were acknowledged;
- a status poller: asks every router directly for GetClusterStatus every ~100 ms and records (node, term,
  leader) claims.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import admin_grpc, admin_pb2, control_grpc, control_pb2
from etlrouter.client.router import RouterClient
from etlrouter.testing.linearizability import Operation, OpKind

KEYS = ["a", "b"]
VALUE = re.compile(r'config\.v = "([^"]+)"')


def definition(key: str, value: str) -> str:
    return f'pipeline {key} {{ source lin-src (config.v = "{value}") | sink lin-sink }}\n'


@dataclass
class Observations:
    operations: list[Operation] = field(default_factory=list)
    # (monotonic time, node asked, term, leader id it reports)
    status: list[tuple[float, str, int, str]] = field(default_factory=list)
    durable_acked: list[str] = field(default_factory=list)
    durable_unknown: list[str] = field(default_factory=list)
    write_acks: list[float] = field(default_factory=list)  # response times of acknowledged writes
    errors: list[str] = field(default_factory=list)


class Workload:
    def __init__(self, routers: list[str], seed: int, *, prefix: str = "lin", clients: int = 3) -> None:
        self.routers = routers
        self.keys = [f"{prefix}-{k}" for k in KEYS]
        self.seed = seed
        self.clients = clients
        self.obs = Observations()
        self.stop = threading.Event()
        self.paused = threading.Event()  # set: clients idle (the poller keeps going)

    async def _register_client(self, client_no: int) -> None:
        rng = random.Random(self.seed * 100 + client_no)
        client = RouterClient(self.routers, timeout=3)
        i = 0
        try:
            while not self.stop.is_set():
                if self.paused.is_set():
                    await asyncio.sleep(0.05)
                    continue
                key = rng.choice(self.keys)
                if rng.random() < 0.5:
                    i += 1
                    value = f"c{client_no}-{i}"
                    request = admin_pb2.ApplyPipelinesRequest(
                        definition=definition(key, value), filename="lin.etl"
                    )
                    invoke = time.monotonic()
                    try:
                        reply = await client.call(
                            admin_grpc.PipelineAdminStub, "ApplyPipelines", request, write=True
                        )
                        if reply.diagnostics:
                            self.obs.errors.append(f"apply: {[d.message for d in reply.diagnostics]}")
                            continue
                        now = time.monotonic()
                        self.obs.operations.append(
                            Operation(client_no, OpKind.WRITE, key, value, invoke, now)
                        )
                        self.obs.write_acks.append(now)
                    except Exception:  # outcome unknown: it may take effect at any later time, or never
                        self.obs.operations.append(Operation(client_no, OpKind.WRITE, key, value, invoke))
                        client.close()
                        client = RouterClient(self.routers, timeout=3)
                else:
                    invoke = time.monotonic()
                    try:
                        got = await client.call(
                            admin_grpc.PipelineAdminStub,
                            "GetPipeline",
                            admin_pb2.GetPipelineRequest(name=key),
                        )
                        match = VALUE.search(got.pipeline.definition)
                        read: str | None = match.group(1) if match else None
                    except GRPCError as e:
                        if e.status != Status.NOT_FOUND:
                            continue  # unanswered read: no information
                        read = None
                    except Exception:
                        continue
                    self.obs.operations.append(
                        Operation(client_no, OpKind.READ, key, read, invoke, time.monotonic())
                    )
                await asyncio.sleep(rng.uniform(0.0, 0.05))
        finally:
            client.close()

    async def _durable_writer(self) -> None:
        client = RouterClient(self.routers, timeout=3)
        i = 0
        try:
            while not self.stop.is_set():
                if self.paused.is_set():
                    await asyncio.sleep(0.05)
                    continue
                i += 1
                name = f"dur-{self.seed}-{i}"
                instance = control_pb2.ServiceInstance(
                    name=name, kind=control_pb2.SERVICE_KIND_SINK, endpoint=f"10.213.7.250:{1000 + i}"
                )
                request = control_pb2.RegisterServiceRequest(instance=instance, ttl_ms=3_600_000)
                try:
                    await client.call(control_grpc.ServiceRegistryStub, "Register", request, write=True)
                    self.obs.durable_acked.append(name)
                except Exception:
                    self.obs.durable_unknown.append(name)
                    client.close()
                    client = RouterClient(self.routers, timeout=3)
                await asyncio.sleep(0.1)
        finally:
            client.close()

    async def _poll_status(self) -> None:
        channels = {a: Channel(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in self.routers}
        try:
            while not self.stop.is_set():

                async def ask(address: str, channel: Channel) -> None:
                    stub = admin_grpc.PipelineAdminStub(channel)
                    try:
                        status = await stub.GetClusterStatus(admin_pb2.GetClusterStatusRequest(), timeout=0.5)
                    except Exception:
                        return
                    self.obs.status.append((time.monotonic(), status.node_id, status.term, status.leader_id))

                await asyncio.gather(*(ask(a, c) for a, c in channels.items()))
                await asyncio.sleep(0.1)
        finally:
            for channel in channels.values():
                channel.close()

    async def _register_lin_services(self) -> None:
        """The register pipelines name a source and a sink no sidecar offers: known, never placed."""
        client = RouterClient(self.routers, timeout=30)
        try:
            for name, kind in (
                ("lin-src", control_pb2.SERVICE_KIND_SOURCE),
                ("lin-sink", control_pb2.SERVICE_KIND_SINK),
            ):
                instance = control_pb2.ServiceInstance(name=name, kind=kind, endpoint="10.213.7.251:1")
                request = control_pb2.RegisterServiceRequest(instance=instance, ttl_ms=24 * 3_600_000)
                await client.call(control_grpc.ServiceRegistryStub, "Register", request, write=True)
        finally:
            client.close()

    async def main(self) -> None:
        await self._register_lin_services()
        tasks = [asyncio.create_task(self._register_client(n)) for n in range(self.clients)]
        tasks += [asyncio.create_task(self._durable_writer()), asyncio.create_task(self._poll_status())]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                self.obs.errors.append(f"task failed: {r!r}")

    def run(self) -> None:
        asyncio.run(self.main())


def leaders_by_term(status: list[tuple[float, str, int, str]]) -> dict[int, set[str]]:
    """Every (term → leaders) claim seen: a node naming itself or another as the leader of its term."""
    out: dict[int, set[str]] = {}
    for _, _, term, leader in status:
        if leader:
            out.setdefault(term, set()).add(leader)
    return out


def unknown_outcome(op: Operation) -> bool:
    return math.isinf(op.response)
