"""Raft-aware rolling restart of an EtlRouterCluster: a real kube-apiserver + StatefulSet controller, and
three real routers on loopback that the test restarts when "its" pod is replaced (the test plays kubelet).
"""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.operator.cluster import MEMBER_ADDRESSES, REVISION_LABEL
from etlrouter.operator.controller import Manager
from tests.integration.cluster import RouterProcesses
from tests.k8s.conftest import Kube
from tests.k8s.test_cluster_controller import events, eventually

BASE = "/apis/etlrouter.io/v1alpha1"
NAME = "router"  # the cluster's name: members router-0..2, like RouterProcesses' node ids


READY = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}


def mark_ready(kube: Kube, namespace: str, pod: str) -> None:
    status, body = kube.http.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/pods/{pod}/status",
        {"status": READY},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body


def restart_router(routers: RouterProcesses, node: str) -> None:
    """What a pod replacement does to the process: SIGTERM (the router drains), then start on its data."""
    proc = routers.procs.pop(node)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    routers.start(node)
    routers.wait_ready([node])


def is_ready(pod: dict[str, Any]) -> bool:
    st = pod.get("status") or {}
    return st.get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions") or []
    )


@dataclass
class Observed:
    partitions: list[int] = field(default_factory=list)  # consecutive duplicates dropped
    violations: list[str] = field(default_factory=list)
    progressing: set[str] = field(default_factory=set)  # reasons of the Progressing condition
    replaced: list[str] = field(default_factory=list)  # pods recreated, in order
    leader_when_replaced: dict[str, str] = field(default_factory=dict)


async def watch_rollout(kube: Kube, namespace: str, seen: Observed, stop: asyncio.Event) -> None:
    """Sample the StatefulSet, its pods and the cluster's status every 50 ms. The StatefulSet is read
    before the pods, and a pod once replaced and Ready stays so: whatever the partition admits must
    already be done when it is seen."""
    while not stop.is_set():
        sts = kube.http.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{NAME}")
        pods = {
            p["metadata"]["name"]: p
            for p in kube.http.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
            if not p["metadata"].get("deletionTimestamp")
        }
        cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/{NAME}") or {}
        for c in (cr.get("status") or {}).get("conditions") or []:
            if c["type"] == "Progressing" and c["status"] == "True":
                seen.progressing.add(c["reason"])
        partition = int(sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"])
        if not seen.partitions or seen.partitions[-1] != partition:
            seen.partitions.append(partition)
        update = sts["status"].get("updateRevision")
        down = [
            f"{NAME}-{i}" for i in range(3) if f"{NAME}-{i}" not in pods or not is_ready(pods[f"{NAME}-{i}"])
        ]
        if len(down) > 1:
            seen.violations.append(f"two members down at once: {down}")
        for i in range(partition + 1, 3):
            pod = pods.get(f"{NAME}-{i}")
            if pod is None or pod["metadata"]["labels"].get(REVISION_LABEL) != update or not is_ready(pod):
                seen.violations.append(f"partition {partition} while {NAME}-{i} is not replaced and Ready")
        await asyncio.sleep(0.05)


async def play_kubelet(
    kube: Kube,
    namespace: str,
    routers: RouterProcesses,
    client: RouterClient,
    known: dict[str, str],
    seen: Observed,
    stop: asyncio.Event,
) -> None:
    """A pod with a new uid is a replacement: note who leads (the old process still runs), restart that
    router, then mark the pod Running and Ready."""
    while not stop.is_set():
        for pod in kube.http.get(f"/api/v1/namespaces/{namespace}/pods")["items"]:
            name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
            if known.get(name) == uid or pod["metadata"].get("deletionTimestamp"):
                continue
            known[name] = uid
            st = await client.call(
                admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
            )
            seen.replaced.append(name)
            seen.leader_when_replaced[name] = str(st.leader_id)
            await asyncio.to_thread(restart_router, routers, name)
            mark_ready(kube, namespace, name)
        await asyncio.sleep(0.05)


async def test_image_change_restarts_members_one_at_a_time_moving_leadership_first(
    kube: Kube, manager: Manager, namespace: str, tmp_path: Path
) -> None:
    routers = RouterProcesses(tmp_path / "routers", 3, fsync=False)
    client = RouterClient(routers.addresses, timeout=20)
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    try:
        routers.start_all()
        routers.wait_ready()
        # router-0 leads: it must restart last, after handing leadership to an updated member.
        await client.call(
            admin_grpc.PipelineAdminStub,
            "TransferLeadership",
            admin_pb2.TransferLeadershipRequest(node_id="router-0"),
            write=True,
        )

        async def leader() -> str:
            st = await client.call(
                admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
            )
            return str(st.leader_id)

        assert await leader() == "router-0"
        cr = {
            "apiVersion": "etlrouter.io/v1alpha1",
            "kind": "EtlRouterCluster",
            "metadata": {"name": NAME, "annotations": {MEMBER_ADDRESSES: ",".join(routers.addresses)}},
            # These routers serve plaintext (RouterProcesses): opt out of the default mutual TLS.
            "spec": {"replicas": 3, "image": "etlrouter:v1", "tls": {"enabled": False}},
        }
        path = f"{BASE}/namespaces/{namespace}/etlrouterclusters/{NAME}"
        sts_path = f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{NAME}"
        assert kube.http.request("POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", cr)[0] == 201

        async def pods_created() -> dict[str, str] | None:
            items = kube.http.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
            return {p["metadata"]["name"]: p["metadata"]["uid"] for p in items} if len(items) == 3 else None

        known = await eventually("3 pods created by the StatefulSet controller", pods_created)
        assert known is not None  # eventually returns only truthy values
        for pod_name in known:
            mark_ready(kube, namespace, pod_name)

        async def settled_on_one_revision() -> str | None:
            sts = kube.http.get(sts_path)
            st = sts["status"]
            ok = (
                st.get("readyReplicas") == 3
                and st.get("updateRevision") == st.get("currentRevision")
                and sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 0
            )
            return str(st["updateRevision"]) if ok else None

        first_revision = await eventually("the cluster settled and Ready", settled_on_one_revision)

        seen = Observed()
        tasks = [
            asyncio.create_task(watch_rollout(kube, namespace, seen, stop)),
            asyncio.create_task(play_kubelet(kube, namespace, routers, client, known, seen, stop)),
        ]
        status, body = kube.http.request(
            "PATCH", path, {"spec": {"image": "etlrouter:v2"}}, content_type="application/merge-patch+json"
        )
        assert status == 200, body

        async def rolled_out() -> str | None:
            sts = kube.http.get(sts_path)
            st = sts["status"]
            pods = kube.http.get(f"/api/v1/namespaces/{namespace}/pods")["items"]
            conditions = ((kube.http.get(path) or {}).get("status") or {}).get("conditions") or []
            progressing: dict[str, Any] = next((c for c in conditions if c["type"] == "Progressing"), {})
            done = (
                st.get("updateRevision") not in (None, first_revision)
                and st.get("currentRevision") == st.get("updateRevision")
                and sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"] == 0
                and len(pods) == 3
                and all(p["metadata"]["labels"][REVISION_LABEL] == st["updateRevision"] for p in pods)
                and all(is_ready(p) for p in pods)
                and progressing.get("status") == "False"
            )
            return str(st["updateRevision"]) if done else None

        try:
            await eventually("every pod on the new revision, partition 0, Progressing=False", rolled_out, 60)
        except AssertionError as e:
            status_now = (kube.http.get(path) or {}).get("status")
            raise AssertionError(f"{e}\nobserved: {seen}\ncluster status: {status_now}") from None
        for task in tasks:  # a failure inside a helper task surfaces here
            assert not task.done(), task.exception()

        # Highest ordinal first; the leader (router-0) last.
        assert seen.replaced == ["router-2", "router-1", "router-0"]
        # No member was leading when its pod was replaced: leadership moved off router-0 first.
        assert seen.leader_when_replaced["router-0"] != "router-0"
        assert all(seen.leader_when_replaced[n] != n for n in seen.replaced), seen.leader_when_replaced
        # The partition closed, then dropped one member at a time, back to 0.
        assert seen.partitions in ([0, 3, 2, 1, 0], [0, 2, 1, 0]), seen.partitions
        assert seen.violations == []
        assert "RollingRestart" in seen.progressing
        messages = {(e["reason"], e["message"]) for e in events(kube, namespace, NAME)}
        for n, k in (("router-2", 1), ("router-1", 2), ("router-0", 3)):
            assert ("RestartingMember", f"restarting {n} ({k} of 3)") in messages
        moved = [m for r, m in messages if r == "LeadershipTransferred"]
        assert len(moved) == 1 and moved[0].startswith("moved leadership from router-0 to router-"), moved
        assert ("RollingRestartFinished", "all 3 routers restarted") in messages
        assert await leader() in {"router-1", "router-2"}
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client.close()
        routers.stop_all()
