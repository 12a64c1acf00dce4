"""A user service's side of a batch's trace: the SDK continues the context the sidecar sends in the gRPC
metadata, so spans the user's code starts (`opentelemetry.trace.get_tracer(...).start_as_current_span`)
are children of the call. Imported only once tracing is set up (sdk/server.py `run`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from etlrouter.core import tracing


@contextlib.contextmanager
def server_span(adapter: Any, method: str, metadata: Mapping[str, Any]) -> Iterator[None]:
    """A SERVER span (rpc.* conventions) for one call that came with a traceparent; nothing otherwise (a
    poll nobody traces would only add noise)."""
    tracer = tracing.TRACER
    traceparent = metadata.get(tracing.TRACEPARENT)
    if tracer is None or not isinstance(traceparent, str):
        yield
        return
    carrier = {tracing.TRACEPARENT: traceparent}
    tracestate = metadata.get(tracing.TRACESTATE)
    if isinstance(tracestate, str):
        carrier[tracing.TRACESTATE] = tracestate
    service = rpc_service(adapter)
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    with tracer.start_as_current_span(
        f"{service}/{method}",
        context=propagate.extract(carrier),
        kind=SpanKind.SERVER,
        attributes=attributes,
    ):
        yield


def rpc_service(adapter: Any) -> str:
    """`etlrouter.v1.TransformService` for an adapter built on the generated `TransformServiceBase`."""
    for base in type(adapter).__mro__:
        if base.__name__.endswith("ServiceBase") and base.__module__.startswith("etlrouter._proto"):
            return f"etlrouter.v1.{base.__name__.removesuffix('Base')}"
    return type(adapter).__name__
