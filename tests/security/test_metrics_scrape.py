"""A router run as the operator runs it (its pod's env, config, certificate and token file) answers
Prometheus' scrape: /metrics over HTTPS verified as `serverName: etlrouter-metrics` with the CA of the
Secret <cluster>-metrics, to its viewer token, and refuses it without one; its gRPC port still wants a
client certificate at the handshake (the token file is for HTTP only). A real router process."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etlrouter.operator import cluster_tls, monitoring
from etlrouter.operator.cluster import desired_objects, router_config
from tests.conftest import free_port

CLUSTER = {
    "apiVersion": "etlrouter.io/v1alpha1",
    "kind": "EtlRouterCluster",
    "metadata": {"name": "scraped", "namespace": "etl", "uid": "u-1"},
    "spec": {"replicas": 1},
}


def scrape(
    port: int, ca: bytes, token: str | None, server_name: str = monitoring.SERVER_NAME
) -> tuple[int, str]:
    """GET /metrics as Prometheus does: TLS verified against `ca` for `server_name` (not the address it
    connects to: pods are scraped by IP), the token as `Authorization: Bearer`. (status, body)."""
    context = ssl.create_default_context(cadata=ca.decode())
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        head = f"GET /metrics HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        tls.sendall((head + "\r\n").encode())
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2].decode(errors="replace")


@dataclass(frozen=True)
class RunningRouter:
    http_port: int
    grpc_port: int
    files: dict[str, Path]  # mount path -> where its files are


@contextlib.contextmanager
def router_as_in_its_pod(
    workdir: Path,
    node_id: str,
    env: Sequence[Mapping[str, Any]],
    router_yaml: str,
    mounts: Mapping[str, Mapping[str, bytes]],
) -> Iterator[RunningRouter]:
    """Start a router with the container's `env` (the StatefulSet's), the ConfigMap's router.yaml and the
    Secrets' files at `mounts` (mount path -> file name -> content), paths moved under `workdir`; once it
    listens."""
    moved: dict[str, Path] = {}
    for mount, files in mounts.items():
        directory = workdir / mount.strip("/").replace("/", "_")
        directory.mkdir(parents=True)
        for file_name, content in files.items():
            (directory / file_name).write_bytes(content)
        moved[mount] = directory
    values = {"POD_NAME": node_id}
    for item in env:
        if "value" not in item:
            continue
        value = str(item["value"]).replace("$(POD_NAME)", node_id)
        for mount, directory in moved.items():
            value = value.replace(mount, str(directory))
        values[item["name"]] = value
    config = workdir / "router.yaml"
    config.write_text(router_yaml)
    grpc_port, http_port = free_port(), free_port()
    args = ["--config", str(config), "router", "--node-id", node_id, "--host", "127.0.0.1"]
    args += [
        "--grpc-port",
        str(grpc_port),
        "--http-port",
        str(http_port),
        "--data-dir",
        str(workdir / "data"),
    ]
    args += ["--peer", f"{node_id}=127.0.0.1:{grpc_port}"]
    log = (workdir / "router.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "etlrouter", *args],
        stdout=log,
        stderr=log,
        env={**_base_env(), **values},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the router exited {proc.returncode}: {(workdir / 'router.log').read_text()}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", http_port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"the router did not listen: {(workdir / 'router.log').read_text()}")
            time.sleep(0.1)
        yield RunningRouter(http_port, grpc_port, moved)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ETLROUTER_")}


def assert_scrapes(port: int, ca: bytes, token: str) -> None:
    """The viewer token gets the metrics; no token, or a wrong one, does not; another name does not verify."""
    status, body = scrape(port, ca, token)
    assert status == 200, body
    assert "etlrouter_" in body
    assert scrape(port, ca, None)[0] == 401
    assert scrape(port, ca, "x" * 40)[0] == 401
    with pytest.raises(ssl.SSLCertVerificationError):
        scrape(port, ca, token, server_name="not-etlrouter-metrics")


def grpc_handshake(port: int, ca: bytes, client_pair: tuple[Path, Path] | None) -> bytes:
    """A TLS connection to the gRPC port (ALPN h2), with or without a client certificate: what the server
    sends first (an HTTP/2 server's SETTINGS), or b"" / an SSLError when it refused the handshake."""
    context = ssl.create_default_context(cadata=ca.decode())
    context.check_hostname = False
    context.set_alpn_protocols(["h2"])
    if client_pair is not None:
        context.load_cert_chain(*client_pair)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        return tls.recv(65536)


def assert_grpc_wants_a_certificate(router: RunningRouter, ca: bytes, node: str) -> None:
    tls_dir = router.files[cluster_tls.TLS_DIR]
    assert grpc_handshake(router.grpc_port, ca, (tls_dir / f"{node}.crt", tls_dir / f"{node}.key"))
    try:
        answer = grpc_handshake(router.grpc_port, ca, None)
    except (ssl.SSLError, ConnectionError):
        return
    assert answer == b"", "the gRPC port accepted a handshake without a client certificate"


def test_a_router_with_the_operators_material_answers_the_scrape_and_refuses_without_the_token(
    tmp_path: Path,
) -> None:
    now = dt.datetime.now(dt.UTC)
    name, namespace = "scraped", "etl"
    ca = cluster_tls.carry_out_ca(cluster_tls.plan_ca(None, now), None, now, name)
    node = "scraped-0"
    plan = cluster_tls.plan_routers(ca, {}, [node], name, namespace, now)
    routers = cluster_tls.carry_out_routers(plan, ca, {}, name, namespace, now)
    token = secrets.token_urlsafe(monitoring.MIN_TOKEN_CHARS)
    objects = desired_objects(
        CLUSTER, bootstrap_peers="", statefulset_replicas=1, pdb_api_version="policy/v1"
    )
    sts = next(o for o in objects if o["kind"] == "StatefulSet")
    container = sts["spec"]["template"]["spec"]["containers"][0]
    mounts = {
        cluster_tls.TLS_DIR: routers,
        monitoring.TOKENS_DIR: {monitoring.TOKENS_KEY: monitoring.tokens_csv(token).encode()},
    }
    with router_as_in_its_pod(tmp_path, node, container["env"], router_config(CLUSTER), mounts) as router:
        assert_scrapes(router.http_port, ca.bundle, token)
        assert_grpc_wants_a_certificate(router, ca.bundle, node)
