"""Real `etlrouter operator` processes against a real kube-apiserver: kill -9 mid-reconcile, two replicas."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from etlrouter.operator.kube import resource_of
from tests.conftest import free_port
from tests.k8s.conftest import Kube

BASE = "/apis/etlrouter.io/v1alpha1"
LEASE_S = 2


class OperatorProcess:
    """One `etlrouter operator` subprocess watching one namespace; logs under `workdir`."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        workdir: Path,
        name: str,
        *,
        kubeconfig: str | None = None,
        home: str | None = None,
    ) -> None:
        self.kube, self.namespace, self.workdir, self.name = kube, namespace, workdir, name
        self.kubeconfig = kubeconfig or kube.kubeconfig
        self.home = home or namespace  # where the Lease and the webhook Secret live
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "POD_NAME": self.name,
            "POD_NAMESPACE": self.home,
            "ETLROUTER_OPERATOR__HTTP__PORT": str(self.http_port),
            "ETLROUTER_OPERATOR__WEBHOOK__HOST": "127.0.0.1",
            "ETLROUTER_OPERATOR__WEBHOOK__PORT": str(free_port()),
            "ETLROUTER_OPERATOR__LEASE_DURATION_S": str(LEASE_S),
            "ETLROUTER_OPERATOR__RESYNC_S": "5",
        }
        log = (self.workdir / f"{self.name}.log").open("ab")
        args = ["--log-format", "json", "operator", "--kubeconfig", self.kubeconfig]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "etlrouter", *args, "--namespace", self.namespace],
            stdout=log,
            stderr=log,
            env=env,
        )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def readyz(self) -> dict[str, Any]:
        status, body = self._get("/readyz")
        return json.loads(body) if status in (200, 503) else {}

    def reconciles(self) -> float:
        status, body = self._get("/metrics")
        assert status == 200
        total = 0.0
        for family in text_string_to_metric_families(body.decode()):
            if family.name == "etlrouter_operator_reconciles":
                total += sum(s.value for s in family.samples if s.name.endswith("_total"))
        return total

    def log(self) -> str:
        return (self.workdir / f"{self.name}.log").read_text(errors="replace")


@pytest.fixture
def operators(kube: Kube, crds: list[str], namespace: str, tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    procs = [OperatorProcess(kube, namespace, tmp_path, f"operator-{i}") for i in range(2)]
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def create_cluster(kube: Kube, namespace: str, name: str) -> None:
    cr = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        "metadata": {"name": name},
        "spec": {"replicas": 3},
    }
    status, body = kube.http.request("POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", cr)
    assert status == 201, body


def owned_objects(kube: Kube, namespace: str) -> list[tuple[str, str]]:
    """(kind, name) of every object in the namespace an EtlRouterCluster controls; duplicates kept."""
    out = []
    for kind, path in (
        ("StatefulSet", f"/apis/apps/v1/namespaces/{namespace}/statefulsets"),
        ("Service", f"/api/v1/namespaces/{namespace}/services"),
        ("ConfigMap", f"/api/v1/namespaces/{namespace}/configmaps"),
        ("PodDisruptionBudget", f"/apis/policy/v1beta1/namespaces/{namespace}/poddisruptionbudgets"),
    ):
        for obj in kube.http.get(path)["items"]:
            refs = obj["metadata"].get("ownerReferences") or []
            if any(r["kind"] == "EtlRouterCluster" and r.get("controller") for r in refs):
                assert len(refs) == 1, obj["metadata"]
                out.append((kind, obj["metadata"]["name"]))
    return out


def expected_objects(names: list[str]) -> list[tuple[str, str]]:
    out = []
    for n in names:
        out += [("StatefulSet", n), ("Service", f"{n}-headless"), ("Service", f"{n}-client")]
        out += [("ConfigMap", f"{n}-config"), ("PodDisruptionBudget", n)]
    return sorted(out)


def cluster_statuses(kube: Kube, namespace: str) -> dict[str, dict[str, Any]]:
    items = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters")["items"]
    return {i["metadata"]["name"]: i.get("status") or {} for i in items}


def test_kill_9_mid_reconcile_then_restart_converges_without_duplicates(
    kube: Kube, namespace: str, operators: list[OperatorProcess]
) -> None:
    op = operators[0]
    names = [f"c{i}" for i in range(10)]
    for n in names:
        create_cluster(kube, namespace, n)
    op.start()
    # Kill the moment the first owned object exists: most reconciles are still to run or half done.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not owned_objects(kube, namespace):
        time.sleep(0.01)
    op.kill()
    at_kill = owned_objects(kube, namespace)
    assert at_kill, f"the operator created nothing within 30 s; log:\n{op.log()[-3000:]}"
    statuses = cluster_statuses(kube, namespace)
    assert any(not statuses[n].get("conditions") for n in names), "every cluster was done before the kill"

    op.start()

    def converged() -> bool:
        st = cluster_statuses(kube, namespace)
        done = all(st[n].get("observedGeneration") == 1 for n in names)
        return done and sorted(owned_objects(kube, namespace)) == expected_objects(names)

    kube.wait_for("convergence after the restart", converged, timeout=60)
    objects = owned_objects(kube, namespace)
    assert sorted(objects) == expected_objects(names)
    assert len(set(objects)) == len(objects)


def lease_holder(kube: Kube, namespace: str) -> str:
    lease = kube.http.get(f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/etlrouter-operator")
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def test_two_replicas_only_the_lease_holder_acts_and_the_other_takes_over(
    kube: Kube, namespace: str, operators: list[OperatorProcess]
) -> None:
    first, second = operators
    first.start()
    kube.wait_for(
        "the first replica to lead", lambda: str(first.readyz().get("reason", "")).startswith("leader")
    )
    second.start()
    kube.wait_for(
        "the second replica to stand by", lambda: str(second.readyz().get("reason", "")).startswith("standby")
    )
    assert lease_holder(kube, namespace).startswith("operator-0-")

    create_cluster(kube, namespace, "one")
    kube.wait_for(
        "the leader to reconcile", lambda: sorted(owned_objects(kube, namespace)) == expected_objects(["one"])
    )
    assert first.reconciles() > 0
    assert second.reconciles() == 0  # the standby watches nothing and reconciles nothing

    first.kill()
    t0 = time.monotonic()
    kube.wait_for(
        "the standby to take over",
        lambda: str(second.readyz().get("reason", "")).startswith("leader"),
        timeout=20,
    )
    takeover_s = time.monotonic() - t0
    assert lease_holder(kube, namespace).startswith("operator-1-")
    assert takeover_s < LEASE_S * 3, f"takeover took {takeover_s:.1f} s with a {LEASE_S} s lease"
    create_cluster(kube, namespace, "two")
    kube.wait_for(
        "the new leader to reconcile",
        lambda: sorted(owned_objects(kube, namespace)) == expected_objects(["one", "two"]),
    )
    assert second.reconciles() > 0

    # A clean stop releases the Lease: a restarted replica leads at once instead of waiting it out.
    second.stop()
    kube.wait_for("the Lease released", lambda: lease_holder(kube, namespace) == "", timeout=10)


K8S = Path(__file__).resolve().parents[2] / "k8s"


def apply_file(kube: Kube, path: Path, *, namespace: str | None = None, dry_run: bool = False) -> list[Any]:
    """Server-side apply every document of a manifest file; fails naming the file and object."""
    out = []
    for doc in yaml.safe_load_all(path.read_text()):
        res = resource_of(doc["apiVersion"], doc["kind"])
        ns = doc["metadata"].get("namespace") or namespace or ""
        query = "?fieldManager=tests&force=true" + ("&dryRun=All" if dry_run else "")
        url = res.path(ns if res.namespaced else "", doc["metadata"]["name"]) + query
        status, body = kube.http.request("PATCH", url, doc, content_type="application/apply-patch+yaml")
        assert status in (200, 201), f"{path.name}: {doc['kind']} {doc['metadata']['name']}: {status} {body}"
        out.append(body)
    return out


def test_install_manifests_apply_and_the_operator_runs_with_its_least_privilege_role(
    kube: Kube, crds: list[str], namespace: str, tmp_path: Path
) -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [K8S / f for f in kustomization["resources"]]
    assert sorted(p.name for p in files if p.parent.name == "crds") == sorted(
        p.name for p in (K8S / "crds").glob("*.yaml")
    )
    for path in files:
        # The webhook configuration is cluster-wide and the running operators keep their own: dry run only.
        apply_file(kube, path, dry_run=path.name == "webhook.yaml")
    samples = [
        apply_file(kube, p, namespace=namespace, dry_run=True)
        for p in sorted((K8S / "samples").glob("*.yaml"))
    ]
    pipeline = next(o for docs in samples for o in docs if o["kind"] == "EtlPipeline")
    sample_dsl = (Path(__file__).resolve().parents[2] / "src/etlrouter/dev/sample.etl").read_text()
    assert pipeline["spec"]["dsl"].strip() in sample_dsl  # the dev sample, verbatim

    # The operator with the ServiceAccount's own token: the ClusterRole and Role are enough to work.
    def sa_token() -> str | None:
        sa = kube.http.get("/api/v1/namespaces/etlrouter-system/serviceaccounts/etlrouter-operator")
        for ref in (sa or {}).get("secrets") or []:
            secret = kube.http.get(f"/api/v1/namespaces/etlrouter-system/secrets/{ref['name']}")
            if secret and "token" in secret.get("data", {}):
                return base64.b64decode(secret["data"]["token"]).decode()
        return None

    token = kube.wait_for("the ServiceAccount token", sa_token)
    config = json.loads(Path(kube.kubeconfig).read_text())
    config["users"] = [{"name": "admin", "user": {"token": token}}]
    sa_kubeconfig = tmp_path / "sa-kubeconfig"
    sa_kubeconfig.write_text(json.dumps(config))
    op = OperatorProcess(
        kube, namespace, tmp_path, "operator-sa", kubeconfig=str(sa_kubeconfig), home="etlrouter-system"
    )
    op.start()
    try:
        kube.wait_for("the operator ready", lambda: op.readyz().get("ready") is True, timeout=30)
        create_cluster(kube, namespace, "rbac")
        kube.wait_for(
            "the owned objects", lambda: sorted(owned_objects(kube, namespace)) == expected_objects(["rbac"])
        )
        kube.wait_for(
            "the status written",
            lambda: cluster_statuses(kube, namespace)["rbac"].get("observedGeneration") == 1,
        )
        assert "forbidden" not in op.log().lower(), op.log()[-3000:]
    finally:
        op.stop()
