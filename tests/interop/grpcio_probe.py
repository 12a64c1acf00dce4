"""A grpcio (Google's C-core gRPC) client that knows nothing of etlrouter's generated code.

It lists services through server reflection, rebuilds the message types from the reflected descriptors,
calls grpc.health.v1 Health, and round-trips a RecordBatch through TransformService.ProcessBatch. Run as
a separate process: grpcio's and grpclib's bundled health/reflection protos cannot share a descriptor pool.
Prints one JSON object with what it saw.
"""

from __future__ import annotations

import json
import sys

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def reflect(channel: grpc.Channel) -> tuple[list[str], descriptor_pool.DescriptorPool]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    reqs = [reflection_pb2.ServerReflectionRequest(list_services="")]
    (resp,) = list(stub.ServerReflectionInfo(iter(reqs), timeout=10))
    names = sorted(s.name for s in resp.list_services_response.service)
    pool = descriptor_pool.DescriptorPool()
    seen: set[str] = set()
    pending = [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=n)
        for n in names
        if n.startswith("etlrouter.")
    ]
    protos: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    while pending:
        for answer in stub.ServerReflectionInfo(iter(pending), timeout=10):
            for raw in answer.file_descriptor_response.file_descriptor_proto:
                fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
                protos[fdp.name] = fdp
        missing = {dep for fdp in protos.values() for dep in fdp.dependency} - set(protos)
        pending = [reflection_pb2.ServerReflectionRequest(file_by_filename=name) for name in sorted(missing)]

    def add(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in protos[name].dependency:
            add(dep)
        pool.Add(protos[name])

    for name in sorted(protos):
        add(name)
    return names, pool


def main(address: str) -> None:
    out: dict[str, object] = {}
    with grpc.insecure_channel(address) as channel:
        names, pool = reflect(channel)
        out["services"] = names
        health = health_pb2_grpc.HealthStub(channel)
        out["health_overall"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        )
        out["health_transform"] = health_pb2.HealthCheckResponse.ServingStatus.Name(
            health.Check(
                health_pb2.HealthCheckRequest(service="etlrouter.v1.TransformService"), timeout=5
            ).status
        )
        service = pool.FindServiceByName("etlrouter.v1.TransformService")
        method = service.methods_by_name["ProcessBatch"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls()
        request.batch.header.batch_id = "b-1"
        for i in range(1000):
            rec = request.batch.records.records.add()
            rec.key = f"k{i}".encode()
            rec.value = b"v" * 200
            rec.headers["h"] = "x"
            rec.offset = i
        request.options["mode"] = "upper"
        call = channel.unary_unary(
            "/etlrouter.v1.TransformService/ProcessBatch",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        reply = call(request, timeout=10)
        out["echo_records"] = len(reply.batch.records.records)
        out["echo_first_value"] = reply.batch.records.records[0].value.decode()[:5]
        out["echo_batch_id"] = reply.batch.header.batch_id
        try:
            channel.unary_unary("/etlrouter.v1.SinkService/Flush")(b"", timeout=5)
            out["unimplemented"] = "OK?"
        except grpc.RpcError as e:
            out["unimplemented"] = e.code().name
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
