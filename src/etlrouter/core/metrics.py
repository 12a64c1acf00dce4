"""The process's Prometheus registry. Every module registers its metrics here, under `etlrouter_`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, PlatformCollector, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

BUILD_INFO = Gauge(
    "etlrouter_build_info",
    "Always 1; labels say which version and role this process runs.",
    ["version", "role"],
    registry=REGISTRY,
)

MALFORMED_REQUESTS = Counter(
    "etlrouter_grpc_malformed_requests_total",
    "gRPC requests refused because a message did not parse (INVALID_ARGUMENT), per method.",
    ["method"],
    registry=REGISTRY,
)
