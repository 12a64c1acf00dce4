"""A source, a transform and a sink written with grpcio (Google's C-core gRPC), not with etlrouter's SDK.

    python tests/e2e/grpcio_services.py source    --name N --port P --state FILE --limit 5000
    python tests/e2e/grpcio_services.py transform --name N --port P
    python tests/e2e/grpcio_services.py sink      --name N --port P --path FILE

Nothing is generated for grpcio: the services are generic handlers over the protobuf message classes of
etlrouter._proto.v1 (services_pb2 / records_pb2), with grpcio's server reflection and health service, the
way a user in another language would serve the contract. Each declares its name through GetCapabilities.
Run it as its own process: grpcio's reflection and health modules and grpclib's bundled ones cannot share
a protobuf descriptor pool (tests/interop/grpcio_probe.py); this file imports nothing from grpclib.

- source: records 0..limit-1 of partition 0 (value `record-<n>`), honours `rewind`, and after every
  Acknowledge replaces --state with {"acked": <highest offset>, "acks": <calls>, "pulls": <calls>}.
  With --slow-pull-at N --slow-pull-ms D, the first pull handing out offset N first answers D ms late
  (a slow source: the records are taken from the stream before the answer is sent).
- transform: upper-cases every value and adds the header `via-grpcio = <name>`.
- sink: appends one JSON line per record ({"batch_id", "offset", "value", "headers"}) to --path, and
  skips a batch id it already wrote (idempotent on retry).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]  # grpcio ships no type stubs
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from etlrouter._proto.v1 import records_pb2, services_pb2

MAX_MESSAGE = 64 << 20


def unary(
    behaviour: Callable[[Any, grpc.ServicerContext], Any], request_type: Any, response_type: Any
) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=request_type.FromString,
        response_serializer=response_type.SerializeToString,
    )


def capabilities_handler(capabilities: records_pb2.Capabilities) -> grpc.RpcMethodHandler:
    def get(request: records_pb2.GetCapabilitiesRequest, context: grpc.ServicerContext) -> Any:
        return records_pb2.GetCapabilitiesResponse(capabilities=capabilities)

    return unary(get, records_pb2.GetCapabilitiesRequest, records_pb2.GetCapabilitiesResponse)


class Source:
    def __init__(self, limit: int, state: Path, slow_pull_at: int = -1, slow_pull_s: float = 0.0) -> None:
        self.limit = limit
        self.state = state
        self.slow_pull_at = slow_pull_at  # the first pull starting at this offset answers late
        self.slow_pull_s = slow_pull_s
        self.lock = threading.Lock()
        self.next_offset = 0
        self.high_water = 0  # one past the highest offset ever handed out
        self.acked = -1
        self.acks = 0
        self.pulls = 0

    def pull(self, request: services_pb2.PullRecordsRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.pulls += 1
            if request.rewind:
                self.next_offset = self.acked + 1
            start = self.next_offset
            end = min(self.limit, start + (request.max_records or 1000))
            self.next_offset = end
            self.high_water = max(self.high_water, end)
            self.save()
            slow = start == self.slow_pull_at and end > start
            if slow:
                self.slow_pull_at = -1
        if slow:
            time.sleep(self.slow_pull_s)  # the records are handed out; the answer comes late
        reply = services_pb2.PullRecordsResponse(end_of_stream=start >= self.limit)
        if end > start:
            batch = reply.batch
            for offset in range(start, end):
                batch.records.records.add(
                    key=b"k%d" % offset,
                    value=b"record-%d" % offset,
                    headers={"origin": "grpcio"},
                    event_time_ms=1_700_000_000_000 + offset,
                    offset=offset,
                )
            header = batch.header
            header.partition = 0
            header.first_offset, header.last_offset = start, end - 1
            header.record_count = end - start
            header.byte_size = batch.records.ByteSize()
            header.min_event_time_ms = 1_700_000_000_000 + start
            header.max_event_time_ms = 1_700_000_000_000 + end - 1
        return reply

    def acknowledge(self, request: services_pb2.AcknowledgeRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.acks += 1
            for ack in request.acks:
                if ack.partition != 0 or ack.up_to_offset >= self.high_water:
                    context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"ack up to {ack.up_to_offset} of partition {ack.partition}: never delivered",
                    )
                self.acked = max(self.acked, ack.up_to_offset)
            self.save()
        return services_pb2.AcknowledgeResponse()

    def save(self) -> None:
        tmp = self.state.with_name(self.state.name + ".tmp")
        tmp.write_text(json.dumps({"acked": self.acked, "acks": self.acks, "pulls": self.pulls}))
        tmp.replace(self.state)

    def handler(self, capabilities: records_pb2.Capabilities) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "etlrouter.v1.SourceService",
            {
                "PullRecords": unary(
                    self.pull, services_pb2.PullRecordsRequest, services_pb2.PullRecordsResponse
                ),
                "Acknowledge": unary(
                    self.acknowledge, services_pb2.AcknowledgeRequest, services_pb2.AcknowledgeResponse
                ),
                "GetCapabilities": capabilities_handler(capabilities),
            },
        )


class Transform:
    def __init__(self, name: str) -> None:
        self.name = name

    def process(self, request: services_pb2.ProcessBatchRequest, context: grpc.ServicerContext) -> Any:
        reply = services_pb2.ProcessBatchResponse()
        reply.batch.header.CopyFrom(request.batch.header)
        for record in request.batch.records.records:
            out = reply.batch.records.records.add()
            out.CopyFrom(record)
            out.value = record.value.upper()
            out.headers["via-grpcio"] = self.name
        return reply

    def handler(self, capabilities: records_pb2.Capabilities) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "etlrouter.v1.TransformService",
            {
                "ProcessBatch": unary(
                    self.process, services_pb2.ProcessBatchRequest, services_pb2.ProcessBatchResponse
                ),
                "GetCapabilities": capabilities_handler(capabilities),
            },
        )


class Sink:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.written: set[str] = set()

    def write(self, request: services_pb2.WriteBatchRequest, context: grpc.ServicerContext) -> Any:
        records = request.batch.records.records
        batch_id = request.batch.header.batch_id
        with self.lock:
            if batch_id not in self.written:
                lines = [
                    json.dumps(
                        {
                            "batch_id": batch_id,
                            "offset": r.offset,
                            "value": r.value.decode(),
                            "headers": dict(r.headers),
                        }
                    )
                    + "\n"
                    for r in records
                ]
                with self.path.open("a") as f:
                    f.writelines(lines)
                self.written.add(batch_id)
        return services_pb2.WriteBatchResponse(written=len(records))

    def flush(self, request: services_pb2.FlushRequest, context: grpc.ServicerContext) -> Any:
        return services_pb2.FlushResponse()

    def handler(self, capabilities: records_pb2.Capabilities) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "etlrouter.v1.SinkService",
            {
                "WriteBatch": unary(
                    self.write, services_pb2.WriteBatchRequest, services_pb2.WriteBatchResponse
                ),
                "Flush": unary(self.flush, services_pb2.FlushRequest, services_pb2.FlushResponse),
                "GetCapabilities": capabilities_handler(capabilities),
            },
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["source", "transform", "sink"])
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--state", type=Path)
    parser.add_argument("--path", type=Path)
    parser.add_argument("--slow-pull-at", type=int, default=-1, help="source: offset whose pull answers late")
    parser.add_argument("--slow-pull-ms", type=int, default=0, help="source: how late")
    args = parser.parse_args()

    capabilities = records_pb2.Capabilities(name=args.name, version="grpcio", labels={"stack": "grpcio"})
    service: Source | Transform | Sink
    if args.kind == "source":
        assert args.state is not None, "--state is required for a source"
        service = Source(args.limit, args.state, args.slow_pull_at, args.slow_pull_ms / 1000)
        service.save()
    elif args.kind == "transform":
        service = Transform(args.name)
    else:
        assert args.path is not None, "--path is required for a sink"
        service = Sink(args.path)
    full_name = f"etlrouter.v1.{args.kind.capitalize()}Service"

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    server.add_generic_rpc_handlers((service.handler(capabilities),))
    health_servicer = health.HealthServicer()
    health_servicer.set(full_name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((full_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if server.add_insecure_port(f"127.0.0.1:{args.port}") != args.port:
        raise SystemExit(f"cannot listen on 127.0.0.1:{args.port}")
    server.start()
    print(
        f"{args.kind} {args.name} serving on 127.0.0.1:{args.port} with grpcio {grpc.__version__}", flush=True
    )

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()


if __name__ == "__main__":
    main()
