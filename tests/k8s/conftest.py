"""Fixtures for tests against a real kube-apiserver (see tests/k8s/apiserver.py and docs/operator.md).

- `kube` (session): the running apiserver — `.kubeconfig` (path), `.url`, `.token`, `.http` (a small
  synchronous client: `kube.http.request(method, path, body)` / `kube.http.get(path)`), and
  `await kube.api_client()` (a kubernetes-asyncio ApiClient; close it, or use `async with`).
- `crds` (session): the CRDs of k8s/crds installed and Established.
- `namespace` (function): a fresh namespace per test, deleted afterwards.

Without the binaries the tests skip naming `scripts/k8s-apiserver.sh`; with `CI` set they fail instead.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import yaml

from etlrouter.core.config import Config
from etlrouter.operator.cluster import ClusterReconciler
from etlrouter.operator.controller import Manager, OperatorContext
from etlrouter.operator.kube import ApiClient, api_client
from tests.conftest import missing_dependency
from tests.k8s.apiserver import SCRIPT, KubeApiServer, KubeHttp, missing_binaries

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "k8s" / "crds"


class Kube:
    def __init__(self, server: KubeApiServer) -> None:
        self.server = server
        self.kubeconfig = str(server.kubeconfig)
        self.url = server.url
        self.token = server.token
        self.http: KubeHttp = server.http

    async def api_client(self) -> ApiClient:
        return await api_client(self.kubeconfig)

    def wait_for(self, what: str, check: object, timeout: float = 20.0) -> object:
        """Poll `check()` until it returns something truthy; fail naming `what` after the deadline."""
        assert callable(check)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            last = check()
            if last:
                return last
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value: {last!r}")


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    missing = missing_binaries()
    if missing:
        message = (
            f"the test Kubernetes API server is not available (missing {', '.join(missing)}): run {SCRIPT}"
        )
        missing_dependency(message)
    server = KubeApiServer(tmp_path_factory.mktemp("kube"))
    try:
        server.start()
        yield Kube(server)
    finally:
        server.stop()


def install_crds(kube: Kube) -> list[str]:
    names = []
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        names.append(name)
        status, body = kube.http.request(
            "PATCH",
            f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}?fieldManager=tests&force=true",
            crd,
            content_type="application/apply-patch+yaml",
        )
        assert status in (200, 201), f"installing {path.name}: {status} {body}"

    def established() -> bool:
        for name in names:
            crd = kube.http.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = (crd or {}).get("status", {}).get("conditions", [])
            if not any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                return False
        # The first create right after Established may still 404 for a moment: wait for discovery.
        status, _ = kube.http.request("GET", "/apis/etlrouter.io/v1alpha1/etlrouterclusters")
        return status == 200

    kube.wait_for("CRDs Established", established)
    return names


@pytest.fixture(scope="session")
def crds(kube: Kube) -> list[str]:
    return install_crds(kube)


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    status, body = kube.http.request(
        "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    )
    assert status == 201, f"creating namespace {name}: {status} {body}"
    yield name
    kube.http.request("DELETE", f"/api/v1/namespaces/{name}")


@pytest.fixture
async def manager(kube: Kube, crds: list[str], namespace: str) -> AsyncIterator[Manager]:
    """An in-process Manager running the cluster controller alone, resyncing every 5 s."""
    api = await kube.api_client()
    ctx = OperatorContext(api=api, config=Config(), namespace=namespace)
    m = Manager(ctx, [ClusterReconciler(ctx)], resync_s=5.0)
    await m.start()
    try:
        yield m
    finally:
        await m.stop()
        await api.close()
