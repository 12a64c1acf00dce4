"""Tracing settings: config keys over the standard OTEL_* variables, off without an endpoint."""

from __future__ import annotations

import pytest

from etlrouter.core.config import TracingConfig
from etlrouter.core.tracing import is_sampled, parse_resource_attributes, resolve


def test_off_without_an_endpoint_or_when_the_sdk_is_disabled() -> None:
    assert resolve(TracingConfig(), {}, "sidecar") is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}
    assert resolve(TracingConfig(), env, "sidecar") is None
    assert (
        resolve(TracingConfig(), {**env, "OTEL_SDK_DISABLED": "", "OTEL_TRACES_EXPORTER": "none"}, "x")
        is None
    )


def test_the_standard_variables_drive_it() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.01",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,k8s.namespace.name=etl%2Dprod",
    }
    s = resolve(TracingConfig(), env, "sidecar")
    assert s is not None
    assert (s.endpoint, s.insecure, s.sampler, s.ratio) == (
        "http://collector:4317",
        True,
        "parentbased_traceidratio",
        0.01,
    )
    assert s.service_name == "etlrouter-sidecar"
    assert s.resource_attributes == {"deployment.environment": "prod", "k8s.namespace.name": "etl-prod"}


def test_config_keys_win_over_the_variables() -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317", "OTEL_SERVICE_NAME": "from-env"}
    config = TracingConfig(
        endpoint="https://b:4317",
        sampler="always_off",
        service_name="from-config",
        resource_attributes={"x": "1"},
    )
    s = resolve(config, env, "router")
    assert s is not None
    assert (s.endpoint, s.insecure, s.sampler, s.service_name) == (
        "https://b:4317",
        False,
        "always_off",
        "from-config",
    )
    assert resolve(TracingConfig(), env, "router", "orders") is not None
    assert resolve(TracingConfig(), env, "router", "orders").service_name == "from-env"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("sampler", "arg"), [("sometimes", ""), ("traceidratio", "2"), ("traceidratio", "x")]
)
def test_a_bad_sampler_is_named(sampler: str, arg: str) -> None:
    with pytest.raises(ValueError, match="sampler"):
        resolve(TracingConfig(endpoint="http://a:4317", sampler=sampler, sampler_arg=arg), {}, "sidecar")


def test_traceparent_flags_and_resource_attributes() -> None:
    assert is_sampled("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert not is_sampled("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    assert not is_sampled("")
    assert parse_resource_attributes("a=1, b = two ,junk") == {"a": "1", "b": "two"}
