"""tests/e2e/grpcio_services.py with OpenTelemetry's gRPC server instrumentation: a service written the way
a grpcio user instruments theirs, exporting its own spans over OTLP (the standard OTEL_* variables).

    python tests/observability/otel_grpcio_service.py sink --name N --port P --path FILE
"""

from __future__ import annotations

import sys
from pathlib import Path

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.grpc import GrpcInstrumentorServer
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    name = sys.argv[sys.argv.index("--name") + 1]
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    # Simple (synchronous) export: every span is at the receiver before the call returns.
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(insecure=True)))
    trace.set_tracer_provider(provider)
    GrpcInstrumentorServer().instrument()  # patches grpc.server: every call continues the caller's trace
    from tests.e2e import grpcio_services

    try:
        grpcio_services.main()
    finally:
        provider.shutdown()


if __name__ == "__main__":
    main()
