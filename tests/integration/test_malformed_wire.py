"""Malformed protobuf sent to every gRPC method of a running router cluster and a running sidecar.

The methods are enumerated from the generated service bases (plus grpclib's health and reflection) and
filtered by what the process itself lists by reflection, so a new method or service is covered without
touching this test. Every malformed request must be answered INVALID_ARGUMENT (an oversized one
RESOURCE_EXHAUSTED), the processes stay up, and the replicated state does not change.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import pkgutil
import random
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from grpclib.client import Channel
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError
from grpclib.reflection.v1 import reflection_pb2
from grpclib.reflection.v1.reflection_grpc import ServerReflectionStub

import etlrouter._proto.v1
from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from tests.conftest import free_port
from tests.e2e.processes import Processes, ready, wait_until
from tests.integration.cluster import RouterProcesses

MAX_MESSAGE_BYTES = 1 << 20  # small, so that an oversized message is cheap to send


def all_methods() -> dict[str, dict[str, tuple[Cardinality, Any]]]:
    """service name -> method path -> (cardinality, request type), from every generated *Base class."""
    modules = [
        importlib.import_module(f"etlrouter._proto.v1.{m.name}")
        for m in pkgutil.iter_modules(etlrouter._proto.v1.__path__)
        if m.name.endswith("_grpc")
    ]
    modules += [
        importlib.import_module("grpclib.health.v1.health_grpc"),
        importlib.import_module("grpclib.reflection.v1.reflection_grpc"),
        importlib.import_module("grpclib.reflection.v1alpha.reflection_grpc"),
    ]
    services: dict[str, dict[str, tuple[Cardinality, Any]]] = {}
    for module in modules:
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if not name.endswith("Base") or cls.__module__ != module.__name__:
                continue
            # __mapping__ only reads the handler attributes: a namespace stands in for an instance.
            fake = types.SimpleNamespace(**dict.fromkeys(cls.__abstractmethods__))
            for path, handler in cls.__mapping__(fake).items():
                services.setdefault(path.split("/")[1], {})[path] = (
                    handler.cardinality,
                    handler.request_type,
                )
    return services


class RawCodec(CodecBase):
    """Sends the bytes it is given as the message, unchecked."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


def payloads(request_type: Any) -> list[tuple[str, bytes]]:
    """Bytes that do not parse as `request_type`; each is checked locally so the test asks for the truth."""
    rng = random.Random(request_type.DESCRIPTOR.full_name)
    random_bytes = b""
    while True:
        random_bytes = rng.randbytes(64)
        try:
            request_type.FromString(random_bytes)
        except DecodeError:
            break
    cases = [
        ("truncated varint", b"\x08\xff\xff"),
        ("wire type 7", b"\x0f\x01"),
        ("truncated fixed64", b"\x09\x01\x02"),
        ("length beyond the message", b"\x0a\x40abc"),
        ("random bytes", random_bytes),
    ]
    for _what, data in cases:
        with pytest.raises(DecodeError):
            request_type.FromString(data)
    return cases


async def send(channel: Channel, path: str, cardinality: Cardinality, data: bytes) -> GRPCError | None:
    try:
        async with channel.request(path, cardinality, bytes, bytes, timeout=10) as stream:
            await stream.send_message(data, end=True)
            while await stream.recv_message() is not None:
                pass
            await stream.recv_trailing_metadata()
    except GRPCError as error:
        return error
    return None


async def list_services(address: str) -> set[str]:
    host, port = address.rsplit(":", 1)
    channel = Channel(host, int(port))
    try:
        async with ServerReflectionStub(channel).ServerReflectionInfo.open(timeout=10) as stream:
            await stream.send_message(reflection_pb2.ServerReflectionRequest(list_services=""), end=True)
            reply = await stream.recv_message()
            assert reply is not None
            return {s.name for s in reply.list_services_response.service}
    finally:
        channel.close()


async def hammer(address: str) -> list[str]:
    """Every malformed payload to every method the process serves; returns what was answered wrongly."""
    served = await list_services(address)
    known = all_methods()
    assert served - set(known) == set(), f"{address} serves services this test does not know"
    host, port = address.rsplit(":", 1)
    channel = Channel(host, int(port), codec=RawCodec())
    wrong: list[str] = []
    try:
        for service in sorted(served):
            for path, (cardinality, request_type) in known[service].items():
                for what, data in payloads(request_type):
                    error = await send(channel, path, cardinality, data)
                    if error is None or error.status is not Status.INVALID_ARGUMENT:
                        wrong.append(f"{path} {what}: {error!r}")
                    # The server may parse with a wire-identical Raw* type (PushRecords does).
                    elif not (error.message or "").startswith("malformed "):
                        wrong.append(f"{path} {what}: message {error.message!r}")
                # Bigger than transport.max_message_bytes: refused before it is buffered.
                error = await send(channel, path, cardinality, b"\x00" * (MAX_MESSAGE_BYTES + 1))
                if error is None or error.status is not Status.RESOURCE_EXHAUSTED:
                    wrong.append(f"{path} oversized: {error!r}")
    finally:
        channel.close()
    return wrong


async def cluster_state(addresses: list[str]) -> tuple[Any, ...]:
    """What a malformed request must not change: every node's view of the term, leader and members, and the
    leader's pipelines and sidecars."""
    client = RouterClient(addresses, timeout=10)
    try:
        views = []
        for address in addresses:
            host, port = address.rsplit(":", 1)
            async with Channel(host, int(port)) as channel:
                stub = admin_grpc.PipelineAdminStub(channel)
                status = await stub.GetClusterStatus(admin_pb2.GetClusterStatusRequest(), timeout=10)
            views.append((status.term, status.leader_id, sorted((m.id, m.address) for m in status.members)))
        pipelines = await client.call(
            admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
        )
        sidecars = await client.call(
            admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest()
        )
        return (
            views,
            pipelines.revision,
            sorted((p.name, p.generation) for p in pipelines.pipelines),
            sorted(s.sidecar_id for s in sidecars.sidecars),
        )
    finally:
        client.close()


@pytest.fixture
def system(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[RouterProcesses, str, Processes]]:
    monkeypatch.setenv("ETLROUTER_TRANSPORT__MAX_MESSAGE_BYTES", str(MAX_MESSAGE_BYTES))
    routers = RouterProcesses(tmp_path / "routers", fsync=False)
    procs = Processes(tmp_path / "procs")
    routers.start_all()
    try:
        routers.wait_ready()
        grpc_port, http_port = free_port(), free_port()
        routers_args = [arg for address in routers.addresses for arg in ("--router", address)]
        ports = [
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--scan-ports",
            str(free_port()),
        ]
        env = {"ETLROUTER_SIDECAR__DATA_DIR": str(tmp_path / "dlq"), "ETLROUTER_LOGGING__FORMAT": "json"}
        procs.start(
            "sc-garbage", ["-m", "etlrouter", "sidecar", "--id", "sc-garbage", *routers_args, *ports], env
        )
        wait_until(lambda: ready(http_port), 30, "the sidecar to be ready")
        yield routers, f"127.0.0.1:{grpc_port}", procs
    finally:
        procs.stop_all()
        routers.stop_all()


def test_malformed_requests_are_invalid_argument_everywhere(
    system: tuple[RouterProcesses, str, Processes],
) -> None:
    routers, sidecar_address, procs = system
    before = asyncio.run(cluster_state(routers.addresses))
    assert before[3] == ["sc-garbage"]

    router_served = asyncio.run(list_services(routers.address(routers.ids[0])))
    assert {"etlrouter.v1.PipelineAdmin", "etlrouter.v1.RaftService", "etlrouter.v1.ServiceRegistry"} <= (
        router_served
    )
    sidecar_served = asyncio.run(list_services(sidecar_address))
    assert {"etlrouter.v1.SidecarDataPlane", "etlrouter.v1.SidecarAdmin"} <= sidecar_served

    wrong = asyncio.run(hammer(routers.address(routers.ids[0]))) + asyncio.run(hammer(sidecar_address))
    assert wrong == []

    for node in routers.ids:
        assert routers.procs[node].poll() is None, routers.log_of(node)
    assert procs.procs["sc-garbage"].poll() is None, procs.log("sc-garbage")
    after = asyncio.run(cluster_state(routers.addresses))
    assert after == before
    # Refused without a traceback, and logged once per method rather than once per request.
    logs = [routers.log_of(node) for node in routers.ids] + [procs.log("sc-garbage")]
    assert not any("Traceback" in text or "Application error" in text for text in logs)
    refused = logs[0].count("malformed request refused")
    assert 0 < refused <= sum(len(m) for s, m in all_methods().items() if s in router_served)
