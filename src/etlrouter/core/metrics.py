"""The process's Prometheus registry. Every module registers its metrics here, under `etlrouter_`."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

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

EVENT_LOOP_LAG = Histogram(
    "etlrouter_event_loop_lag_seconds",
    "How late a task that sleeps a fixed interval wakes up: time the event loop was busy with other work.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)

AUTH_DENIALS = Counter(
    "etlrouter_auth_denials_total",
    "Calls refused: api is grpc or http; reason is unauthenticated (no or bad credentials) or denied "
    "(an identity without the permission).",
    ["api", "reason"],
    registry=REGISTRY,
)

TLS_RELOADS = Counter(
    "etlrouter_tls_reloads_total",
    "Certificate/key reloads after their files changed; result is ok or failed (the previous pair stays).",
    ["result"],
    registry=REGISTRY,
)

TLS_CERT_NOT_AFTER = Gauge(
    "etlrouter_tls_certificate_not_after_timestamp_seconds",
    "When the certificate this process presents expires (Unix time): alert well before it.",
    registry=REGISTRY,
)
