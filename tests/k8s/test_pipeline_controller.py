"""EtlPipeline controller against a real kube-apiserver and a real 3-router cluster on loopback.

The operator runs in the test process (Manager + PipelineReconciler); routers, services and the sidecar are
separate processes; everything talks over real sockets.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.operator.kube import ApiClient, request
from etlrouter.operator.pipeline import FINALIZER, PipelineReconciler
from tests.k8s.conftest import Kube
from tests.k8s.operator_helpers import (
    BASE,
    World,
    condition,
    events_of,
    eventually,
    get,
    operator,
    router_pipelines,
    world,
)


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with world(tmp_path_factory.mktemp("pipeline-world")) as w:
        yield w


def pipeline(name: str, dsl: str, router: str) -> dict[str, Any]:
    return {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlPipeline",
        "metadata": {"name": name},
        "spec": {"router": router, "dsl": dsl},
    }


def reconcilers(ctx: Any) -> list[PipelineReconciler]:
    return [PipelineReconciler(ctx, recheck_s=0.5, wait_s=0.5)]


async def create(api: ApiClient, namespace: str, body: dict[str, Any]) -> None:
    await request(api, "POST", f"{BASE}/namespaces/{namespace}/etlpipelines", body=body)


async def test_pipeline_reaches_the_router_turns_ready_and_is_removed_on_delete(
    kube: Kube, crds: list[str], namespace: str, routers: World
) -> None:
    dsl = (
        "pipeline orders-archive { source orders | sink archive }\n"
        "pipeline orders-warehouse { source orders | sink warehouse }\n"
    )
    path = f"{BASE}/namespaces/{namespace}/etlpipelines/two"
    client = routers.client()
    async with operator(kube, namespace, reconcilers) as ctx:
        await create(ctx.api, namespace, pipeline("two", dsl, routers.address))

        async def ready() -> dict[str, Any] | None:
            obj = await get(ctx.api, path)
            return obj if condition(obj, "Ready").get("status") == "True" else None

        obj = await eventually(ready, "EtlPipeline two to become Ready")
        status = obj["status"]
        assert status["pipelines"] == ["orders-archive", "orders-warehouse"]
        assert status["observedGeneration"] == obj["metadata"]["generation"]
        assert status["assignments"]["stages"] == 3  # one shared source stage, two sinks
        assert status["assignments"]["placed"] == 3 and status["assignments"]["sidecars"] == 1
        assert status["routerRevision"] > 0
        assert condition(obj, "Degraded")["status"] == "False"
        assert FINALIZER in obj["metadata"]["finalizers"]
        at_router = await router_pipelines(client)
        assert {"orders-archive", "orders-warehouse"} <= at_router.keys()
        assert at_router["orders-archive"].phase == admin_pb2.PIPELINE_PHASE_RUNNING
        events = await events_of(ctx.api, namespace, "two")
        assert any(e["reason"] == "Applied" and "orders-archive" in e["message"] for e in events), events

        await request(ctx.api, "DELETE", path)

        async def gone() -> bool:
            return await get(ctx.api, path) is None

        await eventually(gone, "EtlPipeline two to be deleted after its finalizer ran")
        at_router = await router_pipelines(client)
        assert "orders-archive" not in at_router and "orders-warehouse" not in at_router
    client.close()


async def test_drift_at_the_router_is_repaired(
    kube: Kube, crds: list[str], namespace: str, routers: World
) -> None:
    dsl = "pipeline drift-me { source orders | sink archive }\n"
    path = f"{BASE}/namespaces/{namespace}/etlpipelines/drift"
    client = routers.client()
    async with operator(kube, namespace, reconcilers) as ctx:
        await create(ctx.api, namespace, pipeline("drift", dsl, routers.address))

        async def ready() -> bool:
            return condition(await get(ctx.api, path), "Ready").get("status") == "True"

        await eventually(ready, "EtlPipeline drift to become Ready")
        original = (await router_pipelines(client))["drift-me"].definition

        # Someone deletes it with ctl: it comes back.
        await client.call(
            admin_grpc.PipelineAdminStub,
            "DeletePipeline",
            admin_pb2.DeletePipelineRequest(name="drift-me"),
            write=True,
        )

        async def back() -> bool:
            return "drift-me" in await router_pipelines(client)

        await eventually(back, "the deleted pipeline to be re-applied")

        # Someone changes it with ctl apply from another file: the resource's definition wins again.
        changed = "pipeline drift-me { source orders (batch_size = 7) | sink archive }\n"
        reply = await client.call(
            admin_grpc.PipelineAdminStub,
            "ApplyPipelines",
            admin_pb2.ApplyPipelinesRequest(definition=changed, filename="manual.etl"),
            write=True,
        )
        assert not reply.diagnostics and reply.changes[0].action == admin_pb2.PipelineChange.ACTION_UPDATED

        async def restored() -> bool:
            return (await router_pipelines(client))["drift-me"].definition == original

        await eventually(restored, "the changed pipeline to be restored")
        events = await events_of(ctx.api, namespace, "drift")
        repaired = [e for e in events if e["reason"] == "DriftRepaired"]
        assert repaired and "drift-me" in repaired[0]["message"], events
        await request(ctx.api, "DELETE", path)
        await eventually(lambda: _gone(ctx.api, path), "EtlPipeline drift deleted")
    client.close()


async def _gone(api: ApiClient, path: str) -> bool:
    return await get(api, path) is None


async def test_bad_specs_surface_as_conditions_and_events_and_change_nothing_at_the_router(
    kube: Kube, crds: list[str], namespace: str, routers: World
) -> None:
    client = routers.client()
    before = await router_pipelines(client)
    cases = {
        # A syntax/semantic error: file:line:col of the resource's DSL.
        "bad-dsl": "pipeline p-bad {\n  source orders (batch_size = 0) | sink archive\n}\n",
        # A service nobody registered: waited for, not applied.
        "unknown-svc": "pipeline p-unknown { source orders | sink nosuch }\n",
        # A name another resource (here: ctl) already uses: refused, the other one is untouched.
        "conflict": "pipeline taken { source orders | sink warehouse }\n",
    }
    taken = "pipeline taken { source orders | sink archive }\n"
    await client.call(
        admin_grpc.PipelineAdminStub,
        "ApplyPipelines",
        admin_pb2.ApplyPipelinesRequest(definition=taken, filename="someone-else.etl"),
        write=True,
    )
    before = await router_pipelines(client)
    async with operator(kube, namespace, reconcilers) as ctx:
        for name, dsl in cases.items():
            await create(ctx.api, namespace, pipeline(name, dsl, routers.address))

        async def reported(name: str, type_: str) -> dict[str, Any]:
            obj = await get(ctx.api, f"{BASE}/namespaces/{namespace}/etlpipelines/{name}")
            c = condition(obj, type_)
            return c if c.get("status") == "True" else {}

        bad = await eventually(lambda: reported("bad-dsl", "Degraded"), "bad-dsl Degraded")
        assert bad["reason"] == "InvalidDSL"
        assert bad["message"].startswith(f"{namespace}/bad-dsl.etl:2:31: `batch_size` must be at least 1")
        waiting = await eventually(lambda: reported("unknown-svc", "Progressing"), "unknown-svc Progressing")
        assert waiting["reason"] == "WaitingForServices"
        assert "waiting for service `nosuch`" in waiting["message"]
        assert f"{namespace}/unknown-svc.etl:1:" in waiting["message"]
        conflict = await eventually(lambda: reported("conflict", "Degraded"), "conflict Degraded")
        assert conflict["reason"] == "PipelineConflict" and "taken" in conflict["message"]

        async def warned() -> dict[str, str]:
            found: dict[str, str] = {}
            for name in cases:
                for e in await events_of(ctx.api, namespace, name):
                    found[name] = f"{e['type']} {e['reason']}: {e['message']}"
            return found if len(found) == len(cases) else {}

        events = await eventually(warned, "an event for every bad resource")
        assert (
            events["bad-dsl"].startswith("Warning InvalidDSL: ") and "bad-dsl.etl:2:31" in events["bad-dsl"]
        )
        assert "`nosuch`" in events["unknown-svc"]
        assert events["conflict"].startswith("Warning PipelineConflict")
        after = await router_pipelines(client)
        assert after.keys() == before.keys()
        assert after["taken"].definition == before["taken"].definition
    client.close()
