"""A cluster with mutual TLS on every part: 3 routers, a generator → filter → jsonl sink pipeline, each
service with its sidecar, all real processes; the PKI and token file from tests/security/pki.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from tests.conftest import free_port
from tests.dashboard.conftest import browser  # noqa: F401 (a fixture: Chromium for the dashboard test)
from tests.e2e.processes import Processes, connector, ready, wait_until
from tests.integration.cluster import RouterProcesses
from tests.security.pki import TestPki

PIPELINE = (
    "pipeline guarded { source orders (batch_size = 500) "
    '| transform clean (config.expr = "true") | sink out }\n'
)


@dataclass
class SecureCluster:
    pki: TestPki
    routers: RouterProcesses
    procs: Processes
    sidecars: dict[str, tuple[int, int]]  # sidecar id -> (grpc port, http port)
    sink_file: Path
    state_file: Path

    def admin_call(self, method: str, request: object, write: bool = False) -> object:
        async def go() -> object:
            client = RouterClient(self.routers.addresses, timeout=20, security=self.pki.security())
            try:
                return await client.call(admin_grpc.PipelineAdminStub, method, request, write=write)
            finally:
                client.close()

        return asyncio.run(go())

    def ctl(self, *args: str, token_role: str = "", cert: bool = False) -> subprocess.CompletedProcess[str]:
        creds: list[str] = ["--ca", str(self.pki.ca.ca_cert_path)]
        if token_role:
            creds += ["--token", self.pki.tokens[token_role]]
        if cert:
            files = self.pki.issue("user", "ctl-admin", ("admin",))
            creds += ["--cert", str(files.cert), "--key", str(files.key)]
        return subprocess.run(
            [sys.executable, "-m", "etlrouter", "ctl", "--router", self.routers.addresses[0], *creds, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={
                **os.environ,
                "XDG_CONFIG_HOME": str(self.pki.directory / "xdg"),  # no context of a dev on this machine
                "ETLROUTER_TLS__TRUST_DOMAIN": "etlrouter.test",
            },
        )


def start_secure_sidecar(
    procs: Processes, pki: TestPki, sidecar_id: str, routers: RouterProcesses, service_port: int
) -> tuple[int, int]:
    grpc_port, http_port = free_port(), free_port()
    env = {
        "ETLROUTER_SIDECAR__DATA_DIR": str(procs.workdir / sidecar_id),
        "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS": "5000",
        "ETLROUTER_LOGGING__FORMAT": "json",
        **pki.env("sidecar", sidecar_id),
    }
    args = ["-m", "etlrouter", "sidecar", "--id", sidecar_id]
    args += [arg for address in routers.addresses for arg in ("--router", address)]
    args += ["--scan-ports", str(service_port), "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    procs.start(sidecar_id, args, env)
    return grpc_port, http_port


def start_secure_cluster(
    tmp: Path, *, records: int, reload_interval_ms: int = 5000, generator_args: tuple[str, ...] = ()
) -> SecureCluster:
    pki = TestPki(tmp / "pki", reload_interval_ms=reload_interval_ms)
    routers = RouterProcesses(
        tmp / "routers", env_for=lambda node: pki.env("router", node), https=pki.https()
    )
    procs = Processes(tmp / "procs")
    state, sink = tmp / "orders.state", tmp / "out.jsonl"
    cluster = SecureCluster(pki, routers, procs, {}, sink, state)
    routers.start_all()
    routers.wait_ready(timeout=60)
    ports = {
        "orders": connector(
            procs, "orders", "generator", "--limit", str(records), "--state-file", str(state)
        ),
        "clean": connector(procs, "clean", "filter"),
        "out": connector(procs, "out", "jsonl_file_sink", "--path", str(sink)),
    }
    for name, port in ports.items():
        cluster.sidecars[f"sidecar-{name}"] = start_secure_sidecar(
            procs, pki, f"sidecar-{name}", routers, port
        )
    https = pki.https()
    for sidecar_id, (_, http_port) in cluster.sidecars.items():
        wait_until(lambda p=http_port: ready(p, https), 60, f"{sidecar_id} ready")
    cluster.admin_call(
        "ApplyPipelines",
        admin_pb2.ApplyPipelinesRequest(definition=PIPELINE, filename="secure.etl"),
        write=True,
    )
    return cluster


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCluster]:
    cluster = start_secure_cluster(tmp_path_factory.mktemp("secure"), records=20_000)
    try:
        yield cluster
    finally:
        cluster.procs.stop_all()
        cluster.routers.stop_all()
