"""All four services of the contract on one grpcio (Google's C-core gRPC) server, the way a user in another
language would serve them: generic handlers over the protobuf classes, grpcio's reflection and health.

    python tests/conformance/grpcio_service.py --port P --sink-path FILE

Run as its own process: grpcio's reflection and health modules and grpclib's cannot share one protobuf
descriptor pool (see tests/e2e/grpcio_services.py); nothing from grpclib is imported here.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type stubs
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: `tests.` imports

from etlrouter._proto.v1 import records_pb2, services_pb2
from tests.conformance import contract

POLL_S = 0.02


def _unary(behaviour: Callable[[Any, Any], Any], request_type: Any, response_type: Any) -> Any:
    def handle(request: Any, context: Any) -> Any:
        try:
            return behaviour(request, context)
        except contract.Abort as e:
            context.abort(getattr(grpc.StatusCode, e.code), e.message)

    return grpc.unary_unary_rpc_method_handler(
        handle,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )


def _wait(seconds: float, context: Any) -> None:
    """A long poll that ends early when the caller gave up (grpcio marks the context inactive)."""
    end = time.monotonic() + seconds
    while context.is_active() and time.monotonic() < end:
        time.sleep(POLL_S)


def handlers(sink_path: Path) -> list[Any]:
    source = contract.SourceLogic()
    transform = contract.TransformLogic()
    sink = contract.SinkLogic(sink_path)
    lookup = contract.LookupLogic()

    def caps(kind: str) -> Any:
        return _unary(
            lambda request, context: records_pb2.GetCapabilitiesResponse(
                capabilities=contract.capabilities(kind, ())
            ),
            records_pb2.GetCapabilitiesRequest,
            records_pb2.GetCapabilitiesResponse,
        )

    def pull(request: Any, context: Any) -> Any:
        reply, wait = source.pull(request)
        _wait(wait, context)
        return reply

    def write(request: Any, context: Any) -> Any:
        reply, _ = sink.write(request)
        return reply

    def batch_lookup(request: Any, context: Any) -> Any:
        reply, _ = lookup.batch_lookup(request)
        return reply

    s = services_pb2
    table = {
        "etlrouter.v1.SourceService": {
            "PullRecords": _unary(pull, s.PullRecordsRequest, s.PullRecordsResponse),
            "Acknowledge": _unary(
                lambda r, c: source.acknowledge(r), s.AcknowledgeRequest, s.AcknowledgeResponse
            ),
            "GetCapabilities": caps("source"),
        },
        "etlrouter.v1.TransformService": {
            "ProcessBatch": _unary(
                lambda r, c: transform.process(r), s.ProcessBatchRequest, s.ProcessBatchResponse
            ),
            "GetCapabilities": caps("transform"),
        },
        "etlrouter.v1.SinkService": {
            "WriteBatch": _unary(write, s.WriteBatchRequest, s.WriteBatchResponse),
            "Flush": _unary(lambda r, c: sink.flush(r), s.FlushRequest, s.FlushResponse),
            "GetCapabilities": caps("sink"),
        },
        "etlrouter.v1.LookupService": {
            "Lookup": _unary(lambda r, c: lookup.lookup(r), s.LookupRequest, s.LookupResponse),
            "BatchLookup": _unary(batch_lookup, s.BatchLookupRequest, s.BatchLookupResponse),
            "GetCapabilities": caps("lookup"),
        },
    }
    return [grpc.method_handlers_generic_handler(name, methods) for name, methods in table.items()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sink-path", type=Path, required=True)
    args = parser.parse_args()
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=options)
    for handler in handlers(args.sink_path):
        server.add_generic_rpc_handlers((handler,))
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [
        "etlrouter.v1.SourceService",
        "etlrouter.v1.TransformService",
        "etlrouter.v1.SinkService",
        "etlrouter.v1.LookupService",
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(names, server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
