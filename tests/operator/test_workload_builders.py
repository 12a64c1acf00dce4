"""The workload controller's pure parts: spec checks, desired Deployment and Service, instances, verdicts."""

from __future__ import annotations

import json
from typing import Any

import pytest

from etlrouter._proto.v1 import admin_pb2, control_pb2
from etlrouter.operator.inject import SIDECAR_NAME, TOKEN_VOLUME, SidecarSpec, SidecarTls, sidecar_container
from etlrouter.operator.workloads import (
    CONFIG_ENV,
    SpecError,
    desired_deployment,
    desired_service,
    instances_of,
    parse_spec,
    workload_verdict,
)

OBJ: dict[str, Any] = {
    "apiVersion": "etlrouter.io/v1alpha1",
    "kind": "EtlSink",
    "metadata": {"name": "archive", "namespace": "ns", "uid": "uid-1"},
    "spec": {
        "image": "sink:1",
        "port": 50051,
        "replicas": 2,
        "args": ["--x"],
        "env": [{"name": "A", "value": "1"}],
        "config": {"path": "/data"},
        "router": "r:7400",
    },
}


def test_spec_defaults_and_values() -> None:
    spec = parse_spec(OBJ["spec"])
    assert (spec.image, spec.port, spec.replicas, spec.args) == ("sink:1", 50051, 2, ("--x",))
    assert parse_spec({"image": "i", "port": 1}).replicas == 1


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"replicas": -1}, "spec.replicas: must be an integer from 0 to 1000, got -1"),
        ({"port": 0}, "spec.port"),
        ({"image": ""}, "spec.image"),
        ({"args": [1]}, "spec.args"),
        ({"env": [{"value": "x"}]}, "spec.env[0].name"),
        ({"env": [{"name": CONFIG_ENV}]}, "spec.env[0].name"),
        ({"config": {"k": 1}}, "spec.config.k"),
    ],
)
def test_bad_specs_name_the_field(change: dict[str, Any], needle: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**OBJ["spec"], **change})
    assert needle in str(info.value)


def test_deployment_has_the_service_and_the_same_sidecar_the_webhook_injects() -> None:
    deployment = desired_deployment(OBJ, "etlsinks", parse_spec(OBJ["spec"]), "r:7400", "etlrouter:9")
    meta = deployment["metadata"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "etlrouter.io/v1alpha1",
            "kind": "EtlSink",
            "name": "archive",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    service, sidecar = spec["template"]["spec"]["containers"]
    assert service["image"] == "sink:1" and service["args"] == ["--x"]
    assert service["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"}]
    assert service["env"][0] == {"name": "A", "value": "1"}
    assert json.loads(service["env"][1]["value"]) == {"path": "/data"}
    assert sidecar["name"] == SIDECAR_NAME
    assert sidecar == sidecar_container(
        SidecarSpec(image="etlrouter:9", routers=("r:7400",), scan_ports="50051")
    )
    assert spec["template"]["metadata"]["annotations"] == {"etlrouter.io/injected": "true"}


def test_service_selects_the_pods() -> None:
    service = desired_service(OBJ, "etlsinks", parse_spec(OBJ["spec"]))
    deployment = desired_deployment(OBJ, "etlsinks", parse_spec(OBJ["spec"]), "r:7400", "e")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in service["spec"]["ports"]] == [50051, 7500, 7580]


def test_instances_are_the_registered_services_of_that_name() -> None:
    sidecars = admin_pb2.ListSidecarsResponse(
        sidecars=[
            admin_pb2.SidecarInfo(
                sidecar_id="sc-1",
                health=control_pb2.HEALTH_SERVING,
                services=[
                    control_pb2.ServiceInstance(
                        name="archive", endpoint="127.0.0.1:50051", sidecar_id="sc-1"
                    ),
                    control_pb2.ServiceInstance(name="orders", endpoint="127.0.0.1:50052", sidecar_id="sc-1"),
                ],
            )
        ]
    )
    services = admin_pb2.ListServicesResponse(
        services=[
            control_pb2.ServiceInstance(name="archive", endpoint="10.0.0.9:1"),
            control_pb2.ServiceInstance(name="archive", endpoint="127.0.0.1:50051", sidecar_id="sc-1"),
        ]
    )
    assert instances_of("archive", sidecars, services) == [
        {"sidecar": "", "address": "10.0.0.9:1", "health": "unknown"},
        {"sidecar": "sc-1", "address": "127.0.0.1:50051", "health": "serving"},
    ]


def test_verdicts() -> None:
    spec = parse_spec(OBJ["spec"])
    two = [{"sidecar": "a"}, {"sidecar": "b"}]
    assert workload_verdict(spec, 2, two).ready[0] == "True"
    assert workload_verdict(spec, 0, two).ready[1] == "WaitingForPods"
    assert workload_verdict(spec, 2, two[:1]).ready[1] == "WaitingForRegistration"
    down = workload_verdict(spec, 2, None, "cannot reach the router cluster")
    assert down.degraded[:2] == ("True", "RouterUnreachable")
    assert workload_verdict(parse_spec({**OBJ["spec"], "replicas": 0}), 0, []).ready[0] == "True"


def test_a_tls_clusters_workload_pods_carry_the_issuer_settings_and_name_their_cluster() -> None:
    tls = SidecarTls("https://issuer/v1/sidecar-certificate", "PEM", "main.ns.etlrouter", "ns/main")
    deployment = desired_deployment(
        OBJ, "etlsinks", parse_spec(OBJ["spec"]), "main-client.ns.svc:7400", "etlrouter:9", tls=tls
    )
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["etlrouter.io/cluster"] == "ns/main"
    sidecar = template["spec"]["containers"][1]
    expected = SidecarSpec(
        image="etlrouter:9", routers=("main-client.ns.svc:7400",), scan_ports="50051", tls=tls
    )
    assert sidecar == sidecar_container(expected)
    assert any(v["name"] == TOKEN_VOLUME for v in template["spec"]["volumes"])
