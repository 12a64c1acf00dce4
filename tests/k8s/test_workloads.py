"""EtlSource/EtlTransform/EtlSink controller against a real kube-apiserver (with the garbage collector)
and a real router cluster whose registry already holds the services."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from etlrouter.operator.inject import SIDECAR_NAME
from etlrouter.operator.kube import ApiClient, KubeError, request
from etlrouter.operator.workloads import WorkloadReconciler
from tests.k8s.conftest import Kube
from tests.k8s.operator_helpers import BASE, World, condition, events_of, eventually, get, operator, world


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world(tmp_path_factory.mktemp("workload-world")) as w:
        yield w


def reconcilers(ctx: Any) -> list[WorkloadReconciler]:
    return [WorkloadReconciler(ctx, p, recheck_s=0.5, wait_s=0.5) for p in ("etlsources", "etlsinks")]


def workload(kind: str, name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "etlrouter.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


async def test_sink_gets_a_deployment_with_the_sidecar_a_service_and_its_instances(
    kube: Kube, crds: list[str], namespace: str, routers: World
) -> None:
    sinks = f"{BASE}/namespaces/{namespace}/etlsinks"
    deployment_path = f"/apis/apps/v1/namespaces/{namespace}/deployments/archive"
    service_path = f"/api/v1/namespaces/{namespace}/services/archive"
    async with operator(kube, namespace, reconcilers) as ctx:
        api: ApiClient = ctx.api
        body = workload(
            "EtlSink", "archive", image="sink:1", port=50051, router=routers.address, config={"path": "/d"}
        )
        await request(api, "POST", sinks, body=body)
        deployment = await eventually(lambda: get(api, deployment_path), "the Deployment")
        service = await eventually(lambda: get(api, service_path), "the Service")
        sink = await get(api, f"{sinks}/archive")
        assert sink is not None
        for owned in (deployment, service):
            (ref,) = owned["metadata"]["ownerReferences"]
            assert (ref["kind"], ref["name"], ref["uid"], ref["controller"]) == (
                "EtlSink",
                "archive",
                sink["metadata"]["uid"],
                True,
            )
        containers = deployment["spec"]["template"]["spec"]["containers"]
        assert [c["name"] for c in containers] == ["service", SIDECAR_NAME]
        args = containers[1]["args"]
        assert args[args.index("--router") + 1] == routers.address
        assert args[args.index("--scan-ports") + 1] == "50051"
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]

        # The world's sidecar registered a service named `archive`: it is this resource's instance.
        async def instances() -> list[dict[str, str]]:
            obj = await get(api, f"{sinks}/archive")
            found = list(((obj or {}).get("status") or {}).get("instances") or [])
            return found if found and all(i["health"] == "serving" for i in found) else []

        (instance,) = await eventually(instances, "status.instances with a serving instance")
        assert instance["sidecar"] == "sc-world"
        assert instance["address"].startswith("127.0.0.1:")
        obj = await get(api, f"{sinks}/archive")
        assert condition(obj, "Ready")["reason"] == "WaitingForPods"  # no kubelet here

        # Play kubelet: the pod is ready, so the resource is.
        await request(
            api,
            "PATCH",
            deployment_path + "/status",
            body={"status": {"replicas": 1, "readyReplicas": 1}},
            content_type="application/merge-patch+json",
        )

        async def ready() -> bool:
            return condition(await get(api, f"{sinks}/archive"), "Ready").get("status") == "True"

        await eventually(ready, "EtlSink archive Ready")
        assert (await get(api, f"{sinks}/archive") or {})["status"]["readyReplicas"] == 1

        # Drift of owned objects is undone: a deleted Service comes back, a scaled Deployment is reset.
        await request(api, "DELETE", service_path)
        await request(
            api,
            "PATCH",
            deployment_path,
            body={"spec": {"replicas": 5}},
            content_type="application/merge-patch+json",
        )

        async def repaired() -> bool:
            d, s = await get(api, deployment_path), await get(api, service_path)
            return bool(d and s and d["spec"]["replicas"] == 1)

        await eventually(repaired, "the Service recreated and the Deployment back at 1 replica")

        # Deleting the resource deletes what it owns (garbage collector).
        await request(api, "DELETE", f"{sinks}/archive")

        async def collected() -> bool:
            return await get(api, deployment_path) is None and await get(api, service_path) is None

        await eventually(collected, "the Deployment and Service garbage-collected")


async def test_bad_workload_specs_are_refused_or_reported(
    kube: Kube, crds: list[str], namespace: str, routers: World
) -> None:
    async with operator(kube, namespace, reconcilers) as ctx:
        api = ctx.api
        sources = f"{BASE}/namespaces/{namespace}/etlsources"
        # Negative replicas: the apiserver refuses it, naming the field.
        try:
            await request(
                api,
                "POST",
                sources,
                body=workload(
                    "EtlSource", "neg", image="s:1", port=50051, replicas=-1, router=routers.address
                ),
            )
        except KubeError as e:
            assert e.status == 422 and "spec.replicas" in e.message
        else:
            raise AssertionError("replicas -1 must be refused")
        # A cluster that does not exist: Degraded and a Warning event naming it; nothing is created.
        await request(
            api, "POST", sources, body=workload("EtlSource", "lost", image="s:1", port=50051, cluster="nope")
        )

        async def degraded() -> dict[str, Any]:
            c = condition(await get(api, f"{sources}/lost"), "Degraded")
            return c if c.get("status") == "True" else {}

        c = await eventually(degraded, "EtlSource lost Degraded")
        assert c["reason"] == "ClusterNotFound"
        assert "EtlRouterCluster nope not found" in c["message"]

        async def warned() -> list[dict[str, Any]]:
            return [e for e in await events_of(api, namespace, "lost") if e["reason"] == "ClusterNotFound"]

        (event,) = await eventually(warned, "a ClusterNotFound event")
        assert event["type"] == "Warning" and "nope" in event["message"]
        assert await get(api, f"/apis/apps/v1/namespaces/{namespace}/deployments/lost") is None
