"""A 3-router cluster comes up with mutual TLS from what the operator wrote.

There is no kubelet here, so the test plays its part: it takes the StatefulSet's container (command,
env), the ConfigMap and the routers' Secrets (certificates, token file) the operator wrote, materializes
the Secrets and ConfigMap as files, resolves `$(POD_NAME)` as the kubelet does, and runs the container's
start script as three real `etlrouter router` processes. The routers elect a leader over mutual TLS, and
the operator (its own `user/etlrouter-operator` certificate) reads the membership from them; a plaintext
client gets nothing.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import ClusterUnreachableError, RouterClient
from etlrouter.core.config import Config, ListenConfig, OperatorConfig
from etlrouter.operator import tls_secrets
from etlrouter.operator.cluster import MEMBER_ADDRESSES, ClusterReconciler
from etlrouter.operator.controller import OperatorContext
from etlrouter.operator.inject import DATA_HOME, ISSUER_AUDIENCE, SIDECAR_NAME, TOKEN_FILE
from etlrouter.operator.webhook import WebhookServer
from etlrouter.security.context import Security, _peer_cert_dict
from etlrouter.security.identity import from_peer_cert
from tests.conftest import free_port
from tests.k8s.conftest import Kube

BASE = "/apis/etlrouter.io/v1alpha1"
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"
NAME = "trio"
CONFIG_DIR, TLS_DIR, TOKENS_DIR = "/etc/etlrouter", "/etc/etlrouter-tls", "/etc/etlrouter-auth"


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's `$(VAR)` expansion of env values and args (only variables defined before)."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


class Pods:
    """The StatefulSet's pods, as processes."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tokens_dir = workdir / "tokens"

    def materialize(self, kube: Kube, namespace: str) -> tuple[Path, Path]:
        config_map = kube.http.get(f"/api/v1/namespaces/{namespace}/configmaps/{NAME}-config")
        secret = kube.http.get(f"/api/v1/namespaces/{namespace}/secrets/{NAME}-router-tls")
        config_dir, tls_dir = self.workdir / "config", self.workdir / "tls"
        config_dir.mkdir()
        tls_dir.mkdir(mode=0o700)
        for key, value in config_map["data"].items():
            (config_dir / key).write_text(value.replace(CONFIG_DIR + "/", f"{config_dir}/"))
        self.project_secret(tls_dir, secret)
        self.tokens_dir.mkdir(mode=0o700)
        tokens = kube.http.get(f"/api/v1/namespaces/{namespace}/secrets/{NAME}-router-tokens")
        self.project_secret(self.tokens_dir, tokens)
        # `etlrouter` on PATH is this checkout's (the image's entry point).
        bin_dir = self.workdir / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "etlrouter"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m etlrouter "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
        return config_dir, tls_dir

    def project_secret(self, tls_dir: Path, secret: dict[str, Any]) -> None:
        """A Secret volume as the kubelet writes it: the files in a fresh timestamped directory, `..data`
        a symlink to it swapped in one rename, each key a symlink through `..data`; so an update
        changes every file at once."""
        version = tls_dir / f"..{time.monotonic_ns()}"
        version.mkdir()
        for key, value in secret["data"].items():
            path = version / key
            path.write_bytes(base64.b64decode(value))
            path.chmod(0o440)  # the volume's defaultMode
            link = tls_dir / key
            if not link.is_symlink():
                link.symlink_to(Path("..data") / key)
        swap = tls_dir / "..data_tmp"
        swap.symlink_to(version.name)
        swap.rename(tls_dir / "..data")

    def start(
        self,
        container: dict[str, Any],
        config_map: dict[str, Any],
        ordinal: int,
        ports: tuple[int, int],
        dirs: tuple[Path, Path],
    ) -> None:
        config_dir, tls_dir = dirs
        env: dict[str, str] = {}
        for var in container["env"]:
            if var["name"] == "POD_NAME":
                env["POD_NAME"] = f"{NAME}-{ordinal}"
            elif "valueFrom" in var:
                ref = var["valueFrom"]["configMapKeyRef"]
                env[var["name"]] = config_map["data"][ref["key"]]
            else:
                value = expand(var["value"], env).replace(TLS_DIR, str(tls_dir))
                env[var["name"]] = value.replace(TOKENS_DIR, str(self.tokens_dir))
        grpc, http = ports
        env.update(
            {
                # What the pod's network namespace would give it: its own ports, its own volume.
                "ETLROUTER_ROUTER__GRPC__HOST": "127.0.0.1",
                "ETLROUTER_ROUTER__GRPC__PORT": str(grpc),
                "ETLROUTER_ROUTER__HTTP__HOST": "127.0.0.1",
                "ETLROUTER_ROUTER__HTTP__PORT": str(http),
                "ETLROUTER_ROUTER__DATA_DIR": str(self.workdir / f"data-{ordinal}"),
                "ETLROUTER_ROUTER__RAFT__TICK_MS": "50",
                "ETLROUTER_ROUTER__RAFT__ELECTION_TICKS": "10",
                "ETLROUTER_ROUTER__RAFT__FSYNC": "false",
            }
        )
        command = [expand(c, env).replace(CONFIG_DIR + "/", f"{config_dir}/") for c in container["command"]]
        log = (self.workdir / f"{NAME}-{ordinal}.log").open("ab")
        self.procs.append(
            subprocess.Popen(
                command,
                env={**os.environ, **env, "PATH": f"{self.workdir / 'bin'}:{os.environ['PATH']}"},
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        )

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
            for p in sorted(self.workdir.glob("*.log"))
        )


def probe(port: int) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", timeout=5, context=context) as r:
            return r.status, dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        return e.code, dict(json.loads(e.read()))


async def operator_security(kube: Kube, namespace: str, reconciler: ClusterReconciler) -> Security:
    """The operator's own credentials for the cluster (what its reconciles use)."""
    cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/{NAME}")
    ca = await tls_secrets.load_ca(reconciler.ctx.api, cr, None)
    assert ca is not None
    return reconciler.ctx.credentials.security(cr, ca, dt.datetime.now(dt.UTC))


async def cluster_status(addresses: str, reconciler: ClusterReconciler, security: Security) -> Any:
    client = reconciler.ctx.router_client(addresses, security)
    try:
        return await client.call(
            admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
        )
    finally:
        client.close()


def server_certificate(port: int, security: Security) -> bytes:
    """The certificate a router presents to a new connection (DER)."""
    context = security.client_context()
    assert context is not None
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[Pods]:
    p = Pods(tmp_path)
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
async def reconciler(kube: Kube, crds: list[str], namespace: str) -> AsyncIterator[ClusterReconciler]:
    api = await kube.api_client()
    ctx = OperatorContext(api=api, config=Config(), namespace=namespace)
    try:
        yield ClusterReconciler(ctx)
    finally:
        ctx.credentials.close()
        await api.close()


async def bring_up(
    kube: Kube, namespace: str, reconciler: ClusterReconciler, pods: Pods
) -> tuple[list[tuple[int, int]], str, dict[str, Any]]:
    """The cluster's routers from the operator's objects; (their ports, addresses, the cluster's status
    once the operator sees a leader)."""
    ports = [(free_port(), free_port()) for _ in range(3)]
    addresses = ",".join(f"127.0.0.1:{grpc}" for grpc, _ in ports)
    cr = {
        "apiVersion": "etlrouter.io/v1alpha1",
        "kind": "EtlRouterCluster",
        # The test hook: the routers' addresses on loopback instead of the pods' DNS names.
        "metadata": {"name": NAME, "annotations": {MEMBER_ADDRESSES: addresses}},
        "spec": {"replicas": 3},  # TLS by default
    }
    status, body = kube.http.request("POST", f"{BASE}/namespaces/{namespace}/etlrouterclusters", cr)
    assert status == 201, body
    await reconciler.reconcile((namespace, NAME))

    sts = kube.http.get(f"/apis/apps/v1/namespaces/{namespace}/statefulsets/{NAME}")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    config_map = kube.http.get(f"/api/v1/namespaces/{namespace}/configmaps/{NAME}-config")
    dirs = pods.materialize(kube, namespace)
    for ordinal in range(3):
        pods.start(container, config_map, ordinal, ports[ordinal], dirs)

    # The operator reads membership from the routers over mutual TLS, with its own certificate.
    deadline = time.monotonic() + 60
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        await reconciler.reconcile((namespace, NAME))
        cr_now = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/{NAME}")
        st = cr_now.get("status") or {}
        if st.get("leader") and len(st.get("members") or []) == 3:
            return ports, addresses, st
        await asyncio.sleep(0.5)
    raise AssertionError(f"no leader over mTLS after 60 s; status {st}\n{pods.logs()}")


async def test_a_three_router_cluster_comes_up_with_mutual_tls(
    kube: Kube, namespace: str, reconciler: ClusterReconciler, pods: Pods
) -> None:
    ports, addresses, st = await bring_up(kube, namespace, reconciler, pods)
    assert {m["id"] for m in st["members"]} == {f"{NAME}-{i}" for i in range(3)}
    assert sum(m["role"] == "leader" for m in st["members"]) == 1
    assert all(p.poll() is None for p in pods.procs), pods.logs()
    for ordinal in range(3):
        log = (pods.workdir / f"{NAME}-{ordinal}.log").read_text(errors="replace")
        assert "listens in plaintext" not in log

    # Rotation without downtime: the routers' pairs are issued again (removed from the Secret here, which
    # takes the renewal's path), the kubelet swaps the volume's files, every router loads the new pair
    # for new connections, and no election happens.
    security = await operator_security(kube, namespace, reconciler)
    before = await cluster_status(addresses, reconciler, security)
    secret_path = f"/api/v1/namespaces/{namespace}/secrets/{NAME}-router-tls"
    old = kube.http.get(secret_path)["data"]
    removed = {f"{NAME}-{i}.{ext}": None for i in range(3) for ext in ("crt", "key")}
    status, body = kube.http.request(
        "PATCH", secret_path, {"data": removed}, content_type="application/merge-patch+json"
    )
    assert status == 200, body
    await reconciler.reconcile((namespace, NAME))
    secret = kube.http.get(secret_path)
    assert all(secret["data"][key] != old[key] for key in removed)
    assert secret["data"]["ca.crt"] == old["ca.crt"]
    pods.project_secret(pods.workdir / "tls", secret)

    def reloaded() -> bool:
        return all(
            "TLS certificate reloaded" in (pods.workdir / f"{NAME}-{i}.log").read_text(errors="replace")
            for i in range(3)
        )

    deadline = time.monotonic() + 30  # tls.reload_interval_ms is 5 s
    while not reloaded():
        assert time.monotonic() < deadline, f"the routers did not reload their pairs\n{pods.logs()}"
        await asyncio.sleep(0.2)
    new_cert = base64.b64decode(secret["data"][f"{NAME}-0.crt"])
    presented = await asyncio.to_thread(server_certificate, ports[0][0], security)
    assert presented == ssl.PEM_cert_to_DER_cert(new_cert.decode())
    after = await cluster_status(addresses, reconciler, security)
    assert (after.term, after.leader_id) == (before.term, before.leader_id)

    # The kubelet's probes: HTTPS without a client certificate (and without verifying the server).
    for _, http in ports:
        status_code, ready = await asyncio.to_thread(probe, http)
        assert status_code == 200 and ready["ready"] is True, ready

    # Without a certificate nothing answers: the routers end the plaintext connection.
    plain = RouterClient(addresses.split(","), timeout=3, fail_fast_refused=True)
    try:
        with pytest.raises(ClusterUnreachableError, match="cannot reach the router cluster"):
            await plain.call(
                admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
            )
    finally:
        plain.close()


async def test_an_injected_pods_sidecar_gets_its_certificate_and_registers_over_mutual_tls(
    kube: Kube, namespace: str, reconciler: ClusterReconciler, pods: Pods
) -> None:
    _, addresses, _ = await bring_up(kube, namespace, reconciler, pods)
    status, body = kube.http.request(
        "PATCH",
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {"etlrouter.io/test": namespace}}},
        content_type="application/merge-patch+json",
    )
    assert status == 200, body
    port = free_port()
    config = Config(operator=OperatorConfig(webhook=ListenConfig(host="127.0.0.1", port=port)))
    webhook = WebhookServer(
        OperatorContext(api=reconciler.ctx.api, config=config, namespace=namespace),
        url=f"https://127.0.0.1:{port}/inject",
        namespace=namespace,
        namespace_selector={"matchLabels": {"etlrouter.io/test": namespace}},
        configuration_name=f"etlrouter-inject-{namespace}",
    )
    await webhook.start()
    try:
        status, body = kube.http.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "app"}},
        )
        assert status == 201, body
        # generateName: the pod's name (the sidecar's id) exists only after admission.
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": "web-",
                "annotations": {
                    "etlrouter.io/inject": "true",
                    "etlrouter.io/router": f"{NAME}-client.{namespace}.svc:7400",
                    "etlrouter.io/ports": "50051",
                },
            },
            "spec": {"serviceAccountName": "app", "containers": [{"name": "app", "image": "svc:1"}]},
        }
        # From a thread: the apiserver calls the webhook, which serves in this event loop.
        status, pod = await asyncio.to_thread(
            kube.http.request, "POST", f"/api/v1/namespaces/{namespace}/pods", manifest
        )
        assert status == 201, pod
        pod_name = pod["metadata"]["name"]
        # The kubelet's part: the projected token, the pod's IP, its own ports, kube-dns.
        status, answer = kube.http.request(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/app/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {
                    "audiences": [ISSUER_AUDIENCE],
                    "expirationSeconds": 600,
                    "boundObjectRef": {
                        "kind": "Pod",
                        "apiVersion": "v1",
                        "name": pod_name,
                        "uid": pod["metadata"]["uid"],
                    },
                },
            },
        )
        assert status == 201, answer
        token = pods.workdir / "token"
        token.write_text(answer["status"]["token"])
        data_home = pods.workdir / "sidecar-home"
        container = next(c for c in pod["spec"]["containers"] if c["name"] == SIDECAR_NAME)
        env: dict[str, str] = {}
        for var in container["env"]:
            field = (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
            if field == "metadata.name":
                env[var["name"]] = pod_name
            elif field == "status.podIP":
                env[var["name"]] = "127.0.0.1"
            else:
                value = expand(var["value"], env).replace(TOKEN_FILE, str(token))
                env[var["name"]] = value.replace(DATA_HOME, str(data_home))
        args = [expand(a, env) for a in container["args"]]
        routers = [i + 1 for i, a in enumerate(args) if a == "--router"]
        assert [args[i] for i in routers] == [f"{NAME}-client.{namespace}.svc:7400"]
        at = routers[0] - 1
        args[at : at + 2] = [arg for address in addresses.split(",") for arg in ("--router", address)]
        http_port = free_port()
        args[args.index("--grpc-port") + 1] = str(free_port())
        args[args.index("--http-port") + 1] = str(http_port)
        sidecar_proc = pods.spawn(
            "sidecar",
            [sys.executable, "-m", "etlrouter", "--log-format", "json", *args],
            {**env, "HOME": str(data_home), "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500"},
        )

        # Registered with the routers: over mutual TLS, as the identity the issuer gave it.
        deadline = time.monotonic() + 60
        ready: dict[str, Any] = {}
        while time.monotonic() < deadline and sidecar_proc.poll() is None:
            try:
                _, ready = await asyncio.to_thread(probe, http_port)
            except (OSError, ValueError):
                ready = {}
            if ready.get("ready"):
                break
            await asyncio.sleep(0.3)
        else:
            raise AssertionError(f"sidecar not ready: {ready}\n{pods.logs()}")
        cert = data_home / "sidecar" / "tls" / "tls.crt"
        identity = from_peer_cert(_peer_cert_dict(cert.read_bytes()), f"{NAME}.{namespace}.etlrouter")
        assert identity is not None
        assert identity.uri == f"spiffe://{NAME}.{namespace}.etlrouter/ns/{namespace}/sidecar/{pod_name}"
        cr = kube.http.get(f"{BASE}/namespaces/{namespace}/etlrouterclusters/{NAME}")
        ca = await tls_secrets.load_ca(reconciler.ctx.api, cr, None)
        assert ca is not None
        client = reconciler.ctx.router_client(
            addresses, reconciler.ctx.credentials.security(cr, ca, dt.datetime.now(dt.UTC))
        )
        try:
            listed = await client.call(
                admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest()
            )
        finally:
            client.close()
        assert pod_name in [s.sidecar_id for s in listed.sidecars]
    finally:
        await webhook.stop()
        kube.http.request("DELETE", f"{MWC}/etlrouter-inject-{namespace}")
