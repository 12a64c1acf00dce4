"""The EtlRouterCluster controller (in-process Manager) against a real kube-apiserver and real routers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.operator.cluster import (
    MEMBER_ADDRESSES,
    RESTARTED_AT,
    Member,
    Step,
    desired_objects,
    plan_membership,
)
from etlrouter.operator.condition import set_condition
from etlrouter.operator.controller import BACKOFF, Manager, WorkQueue
from tests.conftest import free_port
from tests.integration.cluster import RouterProcesses
from tests.k8s.conftest import Kube

BASE = "/apis/etlrouter.io/v1alpha1"
T = TypeVar("T")


async def eventually(what: str, check: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Poll an async check until it returns something truthy; fail naming `what` after the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


def owned_paths(ns: str, name: str) -> dict[str, str]:
    return {
        "StatefulSet": f"/apis/apps/v1/namespaces/{ns}/statefulsets/{name}",
        "headless Service": f"/api/v1/namespaces/{ns}/services/{name}-headless",
        "client Service": f"/api/v1/namespaces/{ns}/services/{name}-client",
        "ConfigMap": f"/api/v1/namespaces/{ns}/configmaps/{name}-config",
        "PodDisruptionBudget": f"/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets/{name}",
    }


async def test_a_cluster_owns_its_objects_repairs_drift_and_they_go_with_it(
    kube: Kube, manager: Manager, namespace: str
) -> None:
    cr = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        "metadata": {"name": "demo"},
        "spec": {"replicas": 3, "image": "etlrouter:test", "storage": {"size": "2Gi"}},
    }
    status, created = kube.http.request("POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", cr)
    assert status == 201, created
    uid = created["metadata"]["uid"]
    paths = owned_paths(namespace, "demo")

    async def all_owned() -> dict[str, Any] | None:
        objs = {kind: kube.http.get(path) for kind, path in paths.items()}
        return None if any(o is None for o in objs.values()) else objs

    objs = await eventually("the owned objects", all_owned)
    for kind, obj in objs.items():
        refs = obj["metadata"]["ownerReferences"]
        assert refs == [
            {
                "apiVersion": "etlrouter.io/v1alpha1",
                "kind": "EtlRouterCluster",
                "name": "demo",
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], kind
    sts = objs["StatefulSet"]["spec"]
    assert sts["replicas"] == 3
    assert sts["serviceName"] == "demo-headless"
    assert sts["podManagementPolicy"] == "Parallel"
    assert sts["updateStrategy"]["type"] == "RollingUpdate"
    assert sts["template"]["spec"]["containers"][0]["image"] == "etlrouter:test"
    assert sts["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert objs["headless Service"]["spec"]["clusterIP"] == "None"
    assert objs["client Service"]["spec"]["clusterIP"] not in ("", "None")
    assert objs["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    peers = objs["ConfigMap"]["data"]["bootstrap-peers"].split()
    assert peers == [f"demo-{i}=demo-{i}.demo-headless.{namespace}.svc:7400" for i in range(3)]

    # Status: no router answers (no pods run here), so the cluster is not Ready and says why.
    async def status_written() -> dict[str, Any] | None:
        st = (kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/demo") or {}).get("status")
        return st if st and st.get("conditions") else None

    st = await eventually("the status", status_written)
    assert st["endpoint"] == f"demo-client.{namespace}.svc:7400"
    assert st["observedGeneration"] == 1
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "RoutersUnreachable")

    # Drift: a deleted Service and a hand-edited StatefulSet are put back.
    rv_before = objs["ConfigMap"]["metadata"]["resourceVersion"]
    assert kube.http.request("DELETE", paths["client Service"])[0] == 200
    kube.http.request(
        "PATCH",
        paths["StatefulSet"],
        {"spec": {"replicas": 1}},
        content_type="application/merge-patch+json",
    )

    async def repaired() -> bool:
        svc = kube.http.get(paths["client Service"])
        sts_now = kube.http.get(paths["StatefulSet"])
        return svc is not None and sts_now["spec"]["replicas"] == 3

    await eventually("the drift repaired", repaired)
    # Reconciles that change nothing write nothing (server-side apply of the same manifest is a no-op).
    assert kube.http.get(paths["ConfigMap"])["metadata"]["resourceVersion"] == rv_before

    # Deleting the cluster deletes what it owns (the garbage collector of the controller manager).
    assert kube.http.request("DELETE", f"{BASE}/namespaces/{namespace}/etlrouterclusters/demo")[0] == 200

    async def all_gone() -> bool:
        return all(kube.http.get(path) is None for path in paths.values())

    await eventually("garbage collection of the owned objects", all_gone, timeout=60)


async def test_bad_member_address_hook_is_reported_on_the_resource(
    kube: Kube, manager: Manager, namespace: str
) -> None:
    cr = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        "metadata": {"name": "short", "annotations": {MEMBER_ADDRESSES: "127.0.0.1:1"}},
        "spec": {"replicas": 3},
    }
    assert kube.http.request("POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", cr)[0] == 201

    async def invalid() -> dict[str, Any] | None:
        st = (kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/short") or {}).get(
            "status"
        ) or {}
        return next((c for c in st.get("conditions", []) if c["reason"] == "InvalidSpec"), None)

    condition = await eventually("an InvalidSpec condition", invalid)
    assert condition["message"] == f"metadata.annotations[{MEMBER_ADDRESSES}]: 1 addresses for 3 members"
    assert kube.http.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/short") is None


def events(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    items = kube.http.get(f"/api/v1/namespaces/{namespace}/events")["items"]
    return [e for e in items if e["involvedObject"]["name"] == name]


async def set_pods_running(kube: Kube, namespace: str, names: list[str]) -> None:
    """No kubelet here: play its part for the pods the StatefulSet controller created."""

    async def created() -> bool:
        return all(kube.http.get(f"/api/v1/namespaces/{namespace}/pods/{n}") is not None for n in names)

    await eventually(f"pods {names} created by the StatefulSet controller", created)
    for n in names:
        status, body = kube.http.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/pods/{n}/status",
            {"status": {"phase": "Running"}},
            content_type="application/merge-patch+json",
        )
        assert status == 200, body


async def test_scale_3_to_5_to_3_changes_raft_membership_and_moves_leadership_first(
    kube: Kube, manager: Manager, namespace: str, tmp_path: Path
) -> None:
    routers = RouterProcesses(tmp_path / "routers", 3)
    # Two more routers, empty, waiting to be added: they "join" through an address nobody serves, so only
    # the operator's AddMember brings them in.
    nobody = f"127.0.0.1:{free_port()}"
    for node in ("router-3", "router-4"):
        routers.ids.append(node)
        routers.grpc_ports[node], routers.http_ports[node] = free_port(), free_port()
    client = RouterClient(routers.addresses[:3], timeout=20)
    try:
        for node in routers.ids[:3]:
            routers.start(node)
        routers.wait_ready(routers.ids[:3])
        for node in ("router-3", "router-4"):
            routers.start(node, join=[nobody])
        cr = {
            "apiVersion": "etlrouter.io/v1alpha1",
            "kind": "EtlRouterCluster",
            "metadata": {"name": "router", "annotations": {MEMBER_ADDRESSES: ",".join(routers.addresses)}},
            # These routers serve plaintext (RouterProcesses): opt out of the default mutual TLS.
            "spec": {"replicas": 3, "tls": {"enabled": False}},
        }
        path = f"{BASE}/namespaces/{namespace}/etlrouterclusters/router"
        assert kube.http.request("POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", cr)[0] == 201

        async def voters() -> dict[str, bool]:
            st = await client.call(
                admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
            )
            return {m.id: m.voter for m in st.members}

        async def status_members(expected: set[str]) -> bool:
            st = (kube.http.get(path) or {}).get("status") or {}
            return {m["id"] for m in st.get("members", [])} == expected and bool(st.get("leader"))

        await eventually(
            "status listing 3 members", lambda: status_members({"router-0", "router-1", "router-2"})
        )

        # 3 -> 5: the StatefulSet grows; the new members join Raft once their pods run.
        kube.http.request(
            "PATCH", path, {"spec": {"replicas": 5}}, content_type="application/merge-patch+json"
        )
        await set_pods_running(kube, namespace, ["router-3", "router-4"])

        async def five_voters() -> bool:
            v = await voters()
            return len(v) == 5 and all(v.values())

        await eventually("5 voters", five_voters, timeout=60)

        def reasons_about(reason: str) -> set[str]:
            return {
                e["message"].split()[1] for e in events(kube, namespace, "router") if e["reason"] == reason
            }

        async def both_added() -> bool:  # the Event follows the AddMember answer
            return reasons_about("MemberAdded") == {"router-3", "router-4"}

        await eventually("MemberAdded events for router-3 and router-4", both_added)

        # Make a member that is about to go the leader: the operator must move leadership off it first.
        await client.call(
            admin_grpc.PipelineAdminStub,
            "TransferLeadership",
            admin_pb2.TransferLeadershipRequest(node_id="router-4"),
            write=True,
        )

        async def leader_is_4() -> bool:
            st = await client.call(
                admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
            )
            return bool(st.leader_id == "router-4")

        await eventually("router-4 leading", leader_is_4)

        # 5 -> 3: members leave Raft (leadership moved first), then the StatefulSet shrinks.
        kube.http.request(
            "PATCH", path, {"spec": {"replicas": 3}}, content_type="application/merge-patch+json"
        )

        async def three_voters() -> bool:
            v = await voters()
            return set(v) == {"router-0", "router-1", "router-2"} and all(v.values())

        await eventually("3 voters", three_voters, timeout=60)
        st = await client.call(
            admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
        )
        assert st.leader_id in {"router-0", "router-1", "router-2"}
        reasons = [e["reason"] for e in events(kube, namespace, "router")]
        assert "LeadershipTransferred" in reasons
        transferred = next(
            e for e in events(kube, namespace, "router") if e["reason"] == "LeadershipTransferred"
        )
        assert "router-4 is being removed" in transferred["message"]

        async def both_removed() -> bool:
            return reasons_about("MemberRemoved") == {"router-3", "router-4"}

        await eventually("MemberRemoved events for router-3 and router-4", both_removed)

        async def sts_shrunk() -> bool:
            sts = kube.http.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/router")
            return bool(sts["spec"]["replicas"] == 3)

        await eventually("the StatefulSet back at 3", sts_shrunk)
        await eventually(
            "status listing 3 members", lambda: status_members({"router-0", "router-1", "router-2"})
        )
    finally:
        client.close()
        routers.stop_all()


# -- pure parts (no server) --------------------------------------------------------------------------------


def _m(node: str, *, voter: bool = True, leader: bool = False) -> Member:
    return Member(node, f"{node}:7400", voter, leader)


DESIRED3 = {f"r-{i}": f"r-{i}:7400" for i in range(3)}


@pytest.mark.parametrize(
    ("desired", "running", "members", "expected"),
    [
        (DESIRED3, set(), [_m("r-0", leader=True), _m("r-1"), _m("r-2")], None),
        # scale up: a member is added only once its pod runs, and one at a time
        (
            {**DESIRED3, "r-3": "r-3:7400"},
            set(),
            [_m("r-0"), _m("r-1"), _m("r-2")],
            Step("wait", "r-3", "", "waiting for pod r-3 to run"),
        ),
        (
            {**DESIRED3, "r-3": "a:1"},
            {"r-3"},
            [_m("r-0"), _m("r-1"), _m("r-2")],
            Step("add", "r-3", "a:1", "scale up"),
        ),
        (
            {**DESIRED3, "r-3": "a:1"},
            {"r-3"},
            [_m("r-0"), _m("r-1"), _m("r-2"), _m("r-3", voter=False)],
            Step("wait", "r-3", "", "learner r-3 is catching up"),
        ),
        # scale down: highest ordinal first; a leader hands over first
        (
            DESIRED3,
            set(),
            [_m("r-0"), _m("r-1"), _m("r-2"), _m("r-3"), _m("r-4")],
            Step("remove", "r-4", "", "scale down"),
        ),
        (
            DESIRED3,
            set(),
            [_m("r-0"), _m("r-1"), _m("r-2"), _m("r-3"), _m("r-4", leader=True)],
            Step("transfer", "r-0", "", "leader r-4 is being removed"),
        ),
        (
            DESIRED3,
            set(),
            [_m("r-0"), _m("r-1"), _m("r-2"), _m("r-10"), _m("r-9")],
            Step("remove", "r-10", "", "scale down"),
        ),
        # replace: add before removing
        (DESIRED3, {"r-2"}, [_m("r-0"), _m("r-1"), _m("r-5")], Step("add", "r-2", "r-2:7400", "scale up")),
    ],
)
def test_plan_membership(
    desired: dict[str, str], running: set[str], members: list[Member], expected: Step | None
) -> None:
    assert plan_membership(desired, running, members) == expected


def test_set_condition_moves_the_transition_time_only_on_a_status_change() -> None:
    t0, t1, t2 = (datetime(2026, 1, 1, 0, 0, s, tzinfo=UTC) for s in (0, 1, 2))
    c = set_condition([], "Ready", "False", "Waiting", "a", 1, t0)
    c = set_condition(c, "Progressing", "True", "Scaling", "b", 1, t0)
    c = set_condition(c, "Ready", "False", "Still", "c", 2, t1)
    assert c[0] == {
        "type": "Ready",
        "status": "False",
        "reason": "Still",
        "message": "c",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 2,
    }
    c = set_condition(c, "Ready", "True", "Ok", "d", 2, t2)
    assert [x["type"] for x in c] == ["Ready", "Progressing"]
    assert c[0]["lastTransitionTime"] == "2026-01-01T00:00:02Z"


async def test_work_queue_deduplicates_and_never_runs_a_key_twice_at_once() -> None:
    q = WorkQueue()
    a, b = ("p", ("ns", "a")), ("p", ("ns", "b"))
    q.add(a)
    q.add(a)
    q.add(b)
    assert len(q) == 2
    got = await q.get()
    assert got == a
    q.add(a)  # while a runs: marked dirty, not handed out again
    assert await q.get() == b
    assert len(q) == 0
    q.done(a)  # now it is queued again, once
    assert len(q) == 1
    assert await q.get() == a
    q.done(a)
    q.done(b)
    q.add_after(a, 0.05)
    q.add_after(a, 10)  # a later time never postpones an earlier plan
    assert await asyncio.wait_for(q.get(), 2) == a
    q.close()


def test_backoff_doubles_from_half_a_second_to_a_minute() -> None:
    assert [BACKOFF.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert BACKOFF.delay(20) == 60.0


def test_desired_objects_pick_the_pdb_api_and_roll_on_restart_annotation() -> None:
    cr: dict[str, Any] = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        "metadata": {"name": "x", "namespace": "ns", "uid": "u1", "annotations": {}},
        "spec": {},
    }
    objs = desired_objects(cr, bootstrap_peers="x-0=a:1", statefulset_replicas=3, pdb_api_version="policy/v1")
    assert [o["kind"] for o in objs] == [
        "ConfigMap",
        "Service",
        "Service",
        "StatefulSet",
        "PodDisruptionBudget",
    ]
    assert objs[-1]["apiVersion"] == "policy/v1"
    before = objs[3]["spec"]["template"]["metadata"]["annotations"]
    cr["metadata"]["annotations"][RESTARTED_AT] = "2026-01-01T00:00:00Z"
    after = desired_objects(
        cr, bootstrap_peers="x-0=a:1", statefulset_replicas=3, pdb_api_version="policy/v1"
    )
    assert after[3]["spec"]["template"]["metadata"]["annotations"] == {
        **before,
        RESTARTED_AT: "2026-01-01T00:00:00Z",
    }
