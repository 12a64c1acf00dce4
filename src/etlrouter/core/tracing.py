"""Distributed tracing: W3C trace context per batch, spans exported with the OpenTelemetry SDK over OTLP/gRPC.

Tracing is optional (`pip install etlrouter[tracing]`) and off unless an OTLP endpoint is configured
(`tracing.endpoint` or the standard OTEL_EXPORTER_OTLP_ENDPOINT). Everything that makes spans lives in
modules that import OpenTelemetry (sidecar/tracing.py, sdk/tracing.py); they are imported only once
`setup_tracing` has installed a tracer. Until then `TRACER` is None, and the data plane's hooks were
chosen when a stage started: with tracing off a batch meets no tracing code at all.

This module is importable without OpenTelemetry: the settings are resolved by a pure function, and the
few helpers the rare paths call (a span event for a credit wait, ids for a log line) test `TRACER` first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from etlrouter.core.config import TracingConfig

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
INSTRUMENTATION = "etlrouter"

# The process's tracer once tracing is set up; None = off. Read at call time (`tracing.TRACER`).
TRACER: Tracer | None = None
_PROVIDER: TracerProvider | None = None

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


class TracingUnavailableError(RuntimeError):
    """Tracing is configured but the `tracing` extra is not installed."""


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """What the exporter and the sampler are built from, resolved from config and OTEL_* variables."""

    endpoint: str
    insecure: bool
    sampler: str
    ratio: float
    service_name: str
    resource_attributes: dict[str, str] = field(default_factory=dict)


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def parse_resource_attributes(text: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES: `key1=value1,key2=value2` (values may be percent-encoded)."""
    from urllib.parse import unquote

    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            out[key.strip()] = unquote(value.strip())
    return out


def resolve(
    config: TracingConfig, environ: Mapping[str, str], role: str, default_service_name: str = ""
) -> TracingSettings | None:
    """The effective tracing settings, or None when tracing is off.

    A config key wins over its OTEL_* variable (it is the more specific setting); OTEL_SDK_DISABLED=true
    or OTEL_TRACES_EXPORTER=none turn tracing off whatever the config says. Raises ValueError naming a bad
    sampler or ratio.
    """
    if _truthy(environ.get("OTEL_SDK_DISABLED", "")) or environ.get("OTEL_TRACES_EXPORTER", "") == "none":
        return None
    endpoint = (
        config.endpoint
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "")
    )
    if not endpoint:
        return None
    if config.insecure is not None:
        insecure = config.insecure
    elif "OTEL_EXPORTER_OTLP_INSECURE" in environ:
        insecure = _truthy(environ["OTEL_EXPORTER_OTLP_INSECURE"])
    else:
        insecure = endpoint.startswith("http://")
    sampler = (config.sampler or environ.get("OTEL_TRACES_SAMPLER", "") or "parentbased_always_on").lower()
    if sampler not in SAMPLERS:
        raise ValueError(f"tracing sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    arg = config.sampler_arg or environ.get("OTEL_TRACES_SAMPLER_ARG", "")
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        raise ValueError(f"tracing sampler_arg {arg!r}: expected a ratio from 0 to 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"tracing sampler_arg {arg!r}: expected a ratio from 0 to 1")
    attributes = parse_resource_attributes(environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    attributes.update(config.resource_attributes)
    service_name = (
        config.service_name
        or environ.get("OTEL_SERVICE_NAME", "")
        or attributes.get("service.name", "")
        or default_service_name
        or f"etlrouter-{role}"
    )
    return TracingSettings(endpoint, insecure, sampler, ratio, service_name, attributes)


def _sampler(settings: TracingSettings) -> Any:
    from opentelemetry.sdk.trace import sampling

    ratio = sampling.TraceIdRatioBased(settings.ratio)
    return {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": ratio,
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(ratio),
    }[settings.sampler]


def setup_tracing(settings: TracingSettings | None, exporter: Any = None) -> bool:
    """Install the tracer provider (once per process); returns whether tracing is on.

    `exporter` replaces the OTLP exporter (tests pass an in-memory one). Raises TracingUnavailableError
    when tracing is configured but OpenTelemetry is not installed.
    """
    global TRACER, _PROVIDER
    if settings is None:
        return False
    try:
        from opentelemetry import propagate, trace
        from opentelemetry.propagators.composite import CompositePropagator
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError as e:
        raise TracingUnavailableError(
            f"tracing is configured (endpoint {settings.endpoint}) but OpenTelemetry is not installed: "
            "pip install 'etlrouter[tracing]'"
        ) from e
    resource = Resource.create({**settings.resource_attributes, "service.name": settings.service_name})
    provider = TracerProvider(resource=resource, sampler=_sampler(settings))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        endpoint = settings.endpoint.removeprefix("http://").removeprefix("https://")
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint, settings.insecure)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    # W3C trace context only (no baggage): the one format the batch header and the metadata carry.
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    if _PROVIDER is None:
        trace.set_tracer_provider(provider)
    _PROVIDER = provider
    TRACER = provider.get_tracer(INSTRUMENTATION)
    log.info(
        "tracing on",
        extra={
            "fields": {"endpoint": settings.endpoint, "sampler": settings.sampler, "ratio": settings.ratio}
        },
    )
    return True


def setup_from(
    config: TracingConfig, role: str, instance: str = "", environ: Mapping[str, str] | None = None
) -> bool:
    """Set up a role's tracing; `instance` (a sidecar's id) becomes service.instance.id unless given."""
    settings = resolve(config, os.environ if environ is None else environ, role)
    if settings is not None and instance:
        settings.resource_attributes.setdefault("service.instance.id", instance)
    return setup_tracing(settings)


def shutdown_tracing() -> None:
    """Export what is still buffered, then stop (a role's exit)."""
    global TRACER, _PROVIDER
    if _PROVIDER is not None:
        _PROVIDER.shutdown()
    TRACER = None
    _PROVIDER = None


def add_event(name: str, attributes: Mapping[str, float | int | str]) -> None:
    """An event on the current span, when tracing is on (for rare paths: a credit wait, a retry)."""
    if TRACER is None:
        return
    from opentelemetry import trace

    span = trace.get_current_span()
    if span.is_recording():
        span.add_event(name, dict(attributes))


def current_ids() -> tuple[str, str] | None:
    """(trace_id, span_id) in hex of the current span, for log lines; None when there is none."""
    if TRACER is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def is_sampled(traceparent: str) -> bool:
    """Whether a W3C traceparent (`00-<trace id>-<span id>-<flags>`) has the sampled flag."""
    if len(traceparent) < 55:
        return False
    try:
        return bool(int(traceparent[53:55], 16) & 1)
    except ValueError:
        return False
