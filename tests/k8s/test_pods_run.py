"""The operator's pods run for real (issue #17): what the operator writes is started from the built image by
the test pod runner (tests/k8s/podrunner.py, a stand-in kubelet), on a kube-apiserver of this module's own
whose controller manager also runs the Deployment and ReplicaSet controllers.

`etlrouter operator` itself runs from the image too, beside the apiserver (host network, the runner's
/etc/hosts, the admin kubeconfig): it serves its webhook and certificate issuer at
`https://etlrouter-webhook.NS.svc:PORT` (OperatorConfig.webhook_url, as for an operator outside the cluster);
the apiserver (in a mount namespace with the same /etc/hosts) and the pods reach it at the runner's host
address. Then:

- an EtlRouterCluster of 3 routers (mutual TLS, the default): the StatefulSet's pods run the operator's start
  script, elect a leader over mTLS through the headless Service names, pass their readiness probes (HTTPS);
  the cluster is Ready;
- an annotated Deployment (a generator) gets its sidecar from the webhook, an EtlSink (a jsonl-file sink)
  gets its Deployment from the workload controller; both sidecars get certificates from the issuer with the
  projected token; an EtlPipeline `source orders | sink out` moves records from one pod to the other;
- a rolling restart (`etlrouter.io/restartedAt`) replaces the routers one at a time: a leader answers
  throughout (sampled at each router's pod address with the operator's client certificate), and every
  record reaches the sink.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.core.config import Config
from etlrouter.operator import tls_secrets
from etlrouter.operator.cluster import RESTARTED_AT
from etlrouter.operator.controller import OperatorContext
from etlrouter.operator.inject import SIDECAR_NAME
from etlrouter.security.context import Security
from tests.conftest import free_port, missing_dependency
from tests.e2e.processes import jsonl_offsets
from tests.image.runtime import (
    Image,
    ImageProcesses,
    Mount,
    image_of_this_tree,
    open_image,
    require_image_tools,
)
from tests.k8s.apiserver import CONTROLLERS, KubeApiServer, missing_binaries
from tests.k8s.conftest import Kube, install_crds
from tests.k8s.podrunner import PodRunner, missing_capability

BASE = "/apis/etlrouter.io/v1alpha1"
NAME = "etlrouter"
IMAGE = "etlrouter:0.1.0"  # what the operator and the samples name; the runner runs this tree's build
TOTAL = 2400
RATE = 40  # records/s: the flow lasts about a minute, across the rolling restart


@dataclass
class World:
    kube: Kube
    namespace: str
    runner: PodRunner
    operator: ImageProcesses
    workdir: Path

    def logs(self) -> str:
        items = self.kube.http.get(f"/api/v1/namespaces/{self.namespace}/pods")["items"]
        states = [
            (p["metadata"]["name"], p.get("status", {}).get("phase"), c["name"], c["ready"], c["state"])
            for p in items
            for c in p.get("status", {}).get("containerStatuses") or []
        ]
        operator = "\n".join(self.operator.log("operator").splitlines()[-30:])
        return f"{self.runner.logs()}\n--- operator\n{operator}\n--- pods\n" + "\n".join(map(str, states))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_image_tools()
    missing = missing_binaries()
    if missing:
        missing_dependency(f"the test Kubernetes API server is not available (missing {', '.join(missing)})")
    why = missing_capability()
    if why:
        missing_dependency(why)
    workdir = tmp_path_factory.mktemp("podrun")
    hosts = workdir / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    server = KubeApiServer(
        workdir / "kube",
        controllers=f"{CONTROLLERS},deployment,replicaset",
        hosts=hosts,
        service_accounts=True,
    )
    operator: ImageProcesses | None = None
    runner: PodRunner | None = None
    try:
        server.start()
        kube = Kube(server)
        install_crds(kube)
        namespace = f"t-{uuid.uuid4().hex[:10]}"
        status, body = kube.http.request(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
        )
        assert status == 201, body
        with open_image(image_of_this_tree()) as image:
            runner = PodRunner(kube.http, {IMAGE: image}, workdir / "runner", {namespace}, hosts=hosts)
            runner.extra_hosts[f"etlrouter-webhook.{namespace}.svc"] = runner.host_ip
            runner.start()
            operator = start_operator(image, workdir, kube, namespace, hosts)
            yield World(kube, namespace, runner, operator, workdir)
    finally:
        if operator is not None:
            operator.stop_all()
        if runner is not None:
            runner.stop()
        server.stop()


def start_operator(image: Image, workdir: Path, kube: Kube, namespace: str, hosts: Path) -> ImageProcesses:
    etc = workdir / "operator-etc"
    etc.mkdir()
    (etc / "kubeconfig").write_text(Path(kube.kubeconfig).read_text())
    (etc / "kubeconfig").chmod(0o644)
    port = free_port()
    procs = ImageProcesses(image, workdir / "operator")
    (workdir / "operator").mkdir()
    env = {
        "POD_NAME": "etlrouter-operator-0",
        "POD_NAMESPACE": namespace,
        "ETLROUTER_OPERATOR__WEBHOOK__HOST": "0.0.0.0",
        "ETLROUTER_OPERATOR__WEBHOOK__PORT": str(port),
        "ETLROUTER_OPERATOR__WEBHOOK_URL": f"https://etlrouter-webhook.{namespace}.svc:{port}/inject",
        "ETLROUTER_OPERATOR__HTTP__HOST": "127.0.0.1",
        "ETLROUTER_OPERATOR__HTTP__PORT": str(free_port()),
        "ETLROUTER_OPERATOR__RESYNC_S": "5",
    }
    args = [
        "--log-format",
        "json",
        "operator",
        "--kubeconfig",
        "/etc/kube/kubeconfig",
        "--namespace",
        namespace,
    ]
    mounts = [Mount(hosts, "/etc/hosts", read_only=True), Mount(etc, "/etc/kube", read_only=True)]
    procs.start("operator", args, env, mounts=mounts)
    return procs


def wait_for(what: str, check: Any, timeout: float, world: World) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        assert not world.runner.errors, world.runner.errors
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}\n{world.logs()}")


def post(world: World, path: str, body: dict[str, Any]) -> None:
    status, reply = world.kube.http.request("POST", path, body)
    assert status == 201, reply


def pods(world: World) -> list[dict[str, Any]]:
    items = world.kube.http.get(f"/api/v1/namespaces/{world.namespace}/pods")["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def router_pods(world: World) -> list[dict[str, Any]]:
    return sorted(
        (p for p in pods(world) if p["metadata"]["name"].startswith(f"{NAME}-")),
        key=lambda p: p["metadata"]["name"],
    )


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return {}


def cluster(world: World) -> dict[str, Any]:
    return dict(world.kube.http.get(f"{BASE}/namespaces/{world.namespace}/etlrouterclusters/{NAME}") or {})


def sink_offsets(world: World) -> list[int]:
    sink = next((p for p in pods(world) if p["metadata"]["name"].startswith("out-")), None)
    if sink is None:
        return []
    try:
        layer = world.runner.pod_dir(world.namespace, sink["metadata"]["name"]) / ".layer-service" / "upper"
    except KeyError:
        return []
    return jsonl_offsets(layer / "var/lib/etlrouter/out.jsonl")


def generator() -> dict[str, Any]:
    """A user's Deployment asking for a sidecar by annotations; the webhook injects it into each pod."""
    labels = {"app": "orders"}
    service = {
        "name": "service",
        "image": IMAGE,
        "args": [
            "connector",
            "generator",
            "--name",
            "orders",
            "--port",
            "50051",
            "--seed",
            "5",
            "--rate",
            str(RATE),
            "--limit",
            str(TOTAL),
            "--state-file",
            "/var/lib/etlrouter/generator.state",
        ],
        "ports": [{"name": "grpc", "containerPort": 50051}],
        "volumeMounts": [{"name": "work", "mountPath": "/var/lib/etlrouter"}],
        "securityContext": {"readOnlyRootFilesystem": True, "runAsNonRoot": True},
    }
    annotations = {
        "etlrouter.io/inject": "true",
        "etlrouter.io/router": f"{NAME}-client.NAMESPACE.svc:7400",
        "etlrouter.io/ports": "50051",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "orders"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {"containers": [service], "volumes": [{"name": "work", "emptyDir": {}}]},
            },
        },
    }


async def operator_security(world: World) -> tuple[OperatorContext, Security]:
    """The operator's kind of client certificate for the cluster (made from the CA Secret it wrote)."""
    api = await world.kube.api_client()
    ctx = OperatorContext(api=api, config=Config(), namespace=world.namespace)
    cr = cluster(world)
    ca = await tls_secrets.load_ca(api, cr, None)
    assert ca is not None
    return ctx, ctx.credentials.security(cr, ca, dt.datetime.now(dt.UTC))


async def leader_seen(addresses: list[str], security: Security) -> str:
    """The leader some router at `addresses` names ("" when none answers with one)."""

    async def ask(address: str) -> str:
        client = RouterClient([address], timeout=2.0, security=security)
        try:
            st = await client.call(
                admin_grpc.PipelineAdminStub,
                "GetClusterStatus",
                admin_pb2.GetClusterStatusRequest(),
                any_node=True,
                timeout=2.0,
            )
            return str(st.leader_id)
        except Exception:
            return ""
        finally:
            client.close()

    answers = await asyncio.gather(*(ask(a) for a in addresses))
    return next((a for a in answers if a), "")


async def test_the_operators_pods_run_move_records_and_survive_a_rolling_restart(world: World) -> None:
    ns, http = world.namespace, world.kube.http
    t0 = time.monotonic()
    wait_for(
        "the operator's webhook configuration",
        lambda: http.get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations")["items"],
        60,
        world,
    )

    # 1. The cluster: three router pods run from the image, elect a leader over mTLS, and are Ready.
    cr = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        "metadata": {"name": NAME},
        "spec": {"replicas": 3},
    }
    post(world, f"{BASE}/namespaces/{ns}/etlrouterclusters", cr)
    wait_for(
        "3 router pods Ready", lambda: len([p for p in router_pods(world) if is_ready(p)]) == 3, 120, world
    )
    wait_for(
        "EtlRouterCluster Ready",
        lambda: condition(cluster(world), "Ready").get("status") == "True",
        60,
        world,
    )
    cluster_up = time.monotonic() - t0

    # 2. Records: a generator whose sidecar the webhook injects, a sink the workload controller deploys.
    deployment = generator()
    deployment["spec"]["template"]["metadata"]["annotations"]["etlrouter.io/router"] = (
        f"{NAME}-client.{ns}.svc:7400"
    )
    post(world, f"/apis/apps/v1/namespaces/{ns}/deployments", deployment)
    sink = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlSink",
        "metadata": {"name": "out"},
        "spec": {
            "cluster": NAME,
            "image": IMAGE,
            "port": 50051,
            "args": [
                "connector",
                "jsonl-file-sink",
                "--name",
                "out",
                "--port",
                "50051",
                "--path",
                "/var/lib/etlrouter/out.jsonl",
            ],
        },
    }
    post(world, f"{BASE}/namespaces/{ns}/etlsinks", sink)
    pipeline = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlPipeline",
        "metadata": {"name": "flow"},
        "spec": {
            "cluster": NAME,
            "dsl": "pipeline flow { source orders (batch_size = 20) | sink out (flush = true) }\n",
        },
    }
    post(world, f"{BASE}/namespaces/{ns}/etlpipelines", pipeline)

    def workload_pods_ready() -> bool:
        mine = [p for p in pods(world) if p["metadata"]["name"].startswith(("orders-", "out-"))]
        return len(mine) == 2 and all(is_ready(p) for p in mine)

    wait_for(
        "the generator's and the sink's pods Ready (sidecars registered)", workload_pods_ready, 120, world
    )
    orders = next(p for p in pods(world) if p["metadata"]["name"].startswith("orders-"))
    assert [c["name"] for c in orders["spec"]["containers"]] == ["service", SIDECAR_NAME]  # the webhook's
    assert orders["metadata"]["annotations"]["etlrouter.io/injected"] == "true"
    wait_for("records in the sink", lambda: len(set(sink_offsets(world))) >= 100, 90, world)
    flowing = time.monotonic() - t0

    # 3. A rolling restart driven by the operator: a leader answers throughout, no record is lost.
    ctx, security = await operator_security(world)
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in router_pods(world)}
    status, body = http.request(
        "PATCH",
        f"{BASE}/namespaces/{ns}/etlrouterclusters/{NAME}",
        {"metadata": {"annotations": {RESTARTED_AT: dt.datetime.now(dt.UTC).isoformat()}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    samples: list[tuple[float, str]] = []

    def rolled() -> bool:
        now = router_pods(world)
        return (
            len(now) == 3
            and all(before.get(p["metadata"]["name"]) != p["metadata"]["uid"] for p in now)
            and all(is_ready(p) for p in now)
            and condition(cluster(world), "Progressing").get("status") == "False"
        )

    deadline = time.monotonic() + 150
    try:
        while not rolled():
            assert time.monotonic() < deadline, f"the rolling restart did not finish\n{world.logs()}"
            assert not world.runner.errors, world.runner.errors
            addresses = [
                f"{p['status']['podIP']}:7400"
                for p in router_pods(world)
                if (p.get("status") or {}).get("podIP")
            ]
            samples.append((time.monotonic(), await leader_seen(addresses, security)))
            await asyncio.sleep(0.25)
    finally:
        ctx.credentials.close()
        await ctx.api.close()
    restarted = time.monotonic() - t0
    gaps, start = [], None
    for at, leader in samples:
        if not leader and start is None:
            start = at
        elif leader and start is not None:
            gaps.append(at - start)
            start = None
    assert start is None, f"no leader at the end of the rollout: {samples[-5:]}"
    assert max(gaps, default=0.0) < 3.0, f"no leader answered for {max(gaps):.1f} s: {gaps}"
    leaders = [leader for _, leader in samples if leader]
    assert len(set(leaders)) >= 2, leaders  # leadership moved off the member that restarted last
    events = http.get(f"/api/v1/namespaces/{ns}/events")["items"]
    reasons = {e["reason"] for e in events if e["involvedObject"]["name"] == NAME}
    assert {"RollingRestartStarted", "RestartingMember", "RollingRestartFinished"} <= reasons, reasons

    wait_for(
        f"all {TOTAL} records in the sink", lambda: set(sink_offsets(world)) == set(range(TOTAL)), 120, world
    )
    print(
        json.dumps(
            {
                "cluster_ready_s": round(cluster_up, 1),
                "records_flowing_s": round(flowing, 1),
                "rollout_done_s": round(restarted, 1),
                "all_records_s": round(time.monotonic() - t0, 1),
                "leaderless_gaps_s": [round(g, 2) for g in gaps],
                "samples": len(samples),
                "pid": os.getpid(),
            }
        )
    )
