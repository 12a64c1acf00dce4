"""The wire contract interoperates with Google's gRPC stack, not only with grpclib."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.core.grpc import GrpcServer, service_names

GRPC_MODULES = ["services_grpc", "control_grpc", "admin_grpc", "dataplane_grpc", "raft_grpc"]
ARCHITECTURE_SERVICES = [
    # implemented by users
    "SourceService",
    "TransformService",
    "SinkService",
    "LookupService",
    # infrastructure
    "ServiceRegistry",
    "SidecarCoordinator",
    "SidecarDataPlane",
    "SidecarAdmin",
    "RaftService",
    "BackupService",
    "PipelineAdmin",
]
PROBE = Path(__file__).with_name("grpcio_probe.py")


def all_service_bases() -> list[type]:
    bases = []
    for name in GRPC_MODULES:
        module = importlib.import_module(f"etlrouter._proto.v1.{name}")
        bases += [obj for attr, obj in vars(module).items() if attr.endswith("Base") and inspect.isclass(obj)]
    return bases


def unimplemented_service(base: type) -> Any:
    """A concrete subclass of a generated base whose every method answers UNIMPLEMENTED."""

    async def unimplemented(self: Any, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, "not implemented in this test server")

    methods = {name: unimplemented for name in base.__abstractmethods__}  # type: ignore[attr-defined]
    return type(f"Test{base.__name__}", (base,), methods)()


class EchoTransform(services_grpc.TransformServiceBase):
    async def ProcessBatch(self, stream: Stream[services_pb2.ProcessBatchRequest, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        out = services_pb2.ProcessBatchResponse()
        out.batch.CopyFrom(request.batch)
        if request.options.get("mode") == "upper":
            for record in out.batch.records.records:
                record.value = record.value.upper()
        await stream.send_message(out)

    async def GetCapabilities(self, stream: Stream[Any, Any]) -> None:
        await stream.send_message(records_pb2.GetCapabilitiesResponse())


async def test_grpcio_client_reflects_and_calls_every_service() -> None:
    bases = all_service_bases()
    services = [
        EchoTransform() if b is services_grpc.TransformServiceBase else unimplemented_service(b)
        for b in bases
    ]
    expected = service_names(services)
    assert expected == sorted(f"etlrouter.v1.{name}" for name in ARCHITECTURE_SERVICES)

    server = GrpcServer(services, host="127.0.0.1", port=0)
    await server.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROBE),
            server.address,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, stderr.decode()
        seen = json.loads(stdout)
    finally:
        await server.stop()

    assert set(expected) <= set(seen["services"])
    assert "grpc.health.v1.Health" in seen["services"]
    assert seen["health_overall"] == "SERVING"
    assert seen["health_transform"] == "SERVING"
    assert seen["echo_records"] == 1000
    assert seen["echo_first_value"] == "VVVVV"
    assert seen["echo_batch_id"] == "b-1"
    assert seen["unimplemented"] == "UNIMPLEMENTED"
