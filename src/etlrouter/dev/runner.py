"""`etlrouter dev`: routers, services and sidecars as separate processes on loopback, a pipeline set applied,
a live view, and an orderly stop.

Start order: routers (wait until ready) → services (wait until they listen) → one sidecar per service
(wait until registered) → ApplyPipelines. Stop order on Ctrl-C, SIGTERM, the end of a `--limit` run or an
error: sidecars first (they drain: in-flight batches finish, sources are acknowledged), then services, then
routers; each group gets a deadline, then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import aiohttp

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.connectors.generator import GeneratorConfig
from etlrouter.ctl import contexts
from etlrouter.dev import servers, view
from etlrouter.dev.example import SeedExample
from etlrouter.dev.layout import HOST, Layout, busy_ports, make_layout
from etlrouter.dev.procs import Child, Supervisor
from etlrouter.dev.progress import (
    PathStep,
    SinkFile,
    describe_missing,
    expected_offsets,
    generator_config,
    source_done,
)
from etlrouter.dev.secure import DevPki
from etlrouter.dev.spec import DevSpec, ServiceSpec
from etlrouter.security.context import Security
from etlrouter.security.identity import Kind
from etlrouter.security.pki import CertFiles

MARKER = ".etlrouter-dev"
LOCK_FILE = ".etlrouter-dev.lock"  # flock()ed while a dev runs on the directory; holds its pid
OWNED = ("routers", "sidecars", "services", "sinks", "servers", "logs", "pki", "dev.json")
SIDECAR_DEADLINE_S, SERVICE_DEADLINE_S, ROUTER_DEADLINE_S = 15.0, 10.0, 10.0
FEEDER_DEADLINE_S = 5.0
SINK_MAX_BYTES = 64 << 20  # dev's jsonl sinks rotate at 64 MiB and keep one old file: ≤ 128 MiB a sink
DEFAULT_RATE = 1000.0  # records/s of a generator when no --limit is given (a demo, not a disk filler)
# Sidecars heartbeat every second (default 5 s) so the dashboard shows a stall or a dead sidecar within a few
# seconds (silent after 3 intervals); the routers move a silent sidecar's stages after 5 missed heartbeats.
HEARTBEAT_INTERVAL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 5 * HEARTBEAT_INTERVAL_MS
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SAMPLE = Path(__file__).with_name("sample.etl")
CONTEXT_NAME = "dev"  # the ctl context dev writes (and removes on exit while it is still its own)


class DevError(Exception):
    """Something dev cannot go on with; the message says what and where to look."""


class DevUsageError(DevError):
    """The arguments cannot work (a data dir dev did not make, busy ports): exit code 2."""


class Interrupted(Exception):
    pass


@dataclass
class DevOptions:
    spec: DevSpec
    data_dir: Path
    base_port: int = 17400
    routers: int = 3
    limit: int = 0
    rate: float | None = None
    view: bool = True
    timeout_s: float = 120.0
    startup_timeout_s: float = 60.0
    # Plaintext without authentication (the default is mutual TLS with a throw-away CA: dev/secure.py).
    insecure: bool = False
    # `--example seed`: the servers it needs (started before the cluster, stopped after it) and a feeder.
    example: SeedExample | None = None


@dataclass
class Endpoint:
    name: str
    http_port: int
    scheme: str = "http"

    @property
    def metrics(self) -> str:
        return f"{self.scheme}://{HOST}:{self.http_port}/metrics"


@dataclass
class Dev:
    options: DevOptions
    out: TextIO = field(default_factory=lambda: sys.stdout)
    supervisor: Supervisor = field(init=False)
    layout: Layout = field(init=False)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    signals: int = 0
    started_at: float = field(default_factory=time.monotonic)
    topology: view.Topology = field(default_factory=view.Topology)
    router_ids: list[str] = field(default_factory=list)
    endpoints: list[Endpoint] = field(default_factory=list)
    sink_files: dict[str, Path] = field(default_factory=dict)
    state_files: dict[str, Path] = field(default_factory=dict)
    service_argv: dict[str, list[str]] = field(default_factory=dict)
    context_file: Path | None = None
    capped_sinks: set[str] = field(default_factory=set)
    leaders: list[str] = field(default_factory=list)  # the Raft leader as the last /metrics sample saw it
    pki: DevPki | None = None  # None with --insecure
    _issued: dict[str, CertFiles] = field(default_factory=dict)
    _lock_fd: int | None = None

    def __post_init__(self) -> None:
        self.data_dir = self.options.data_dir.resolve()
        self.supervisor = Supervisor(self.data_dir / "logs")

    # ------------------------------------------------------------------------------------------ output

    def say(self, text: str = "", *, err: bool = False) -> None:
        with contextlib.suppress(OSError):  # a closed pipe (`etlrouter dev | head`) must not stop shutdown
            print(text, file=sys.stderr if err else self.out, flush=True)

    # ---------------------------------------------------------------------------------------- signals

    def on_signal(self, signum: int) -> None:
        self.signals += 1
        if self.signals == 1:
            self.say(
                f"\n{signal.Signals(signum).name}: stopping (sidecars drain first; again to kill at once)"
            )
            self.stop.set()
        else:
            self.supervisor.hurry.set()

    # --------------------------------------------------------------------------------------- data dir

    def lock_data_dir(self) -> None:
        """Take the data dir's lock (held until dev exits) before anything in it is touched: a second dev on
        the same directory stops here, and the first one's logs, Raft logs and sink files stay as they are."""
        d = self.data_dir
        if d.exists() and any(d.iterdir()) and not (d / MARKER).exists():
            raise DevUsageError(
                f"{d} is not empty and was not made by `etlrouter dev` (no {MARKER}); pick another --data-dir"
            )
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DevUsageError(
                f"{d} is in use by another `etlrouter dev` (pid {holder}); nothing was changed. "
                "Stop it first, or give this one another --data-dir (and --base-port)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock_data_dir(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def check_ports(self) -> None:
        busy = busy_ports(self.layout.all_ports())
        if busy:
            raise DevUsageError(
                f"ports already in use: {', '.join(map(str, busy[:8]))} (another `etlrouter dev`?); "
                "nothing was changed; choose another --base-port, or 0 for free ports"
            )

    def remove_stale_namespaces(self) -> None:
        """The network namespaces (SeaweedFS's) an earlier dev on this directory made and, killed with
        SIGKILL, could not delete: with the lock held, that dev is gone."""
        try:
            namespaces = json.loads((self.data_dir / "dev.json").read_text()).get("namespaces", [])
        except (OSError, ValueError, AttributeError):
            return
        for ns in namespaces:
            if isinstance(ns, str) and ns.startswith(servers.NAMESPACE_PREFIX):
                with contextlib.suppress(OSError):  # no `ip`: it could not have made one
                    servers.remove_namespace(ns)

    def prepare_data_dir(self) -> None:
        """Wipe what an earlier run left (only with the lock held and the ports known to be free)."""
        d = self.data_dir
        (d / MARKER).write_text("made by `etlrouter dev`; it wipes its own subdirectories on start\n")
        self.remove_stale_namespaces()
        for name in OWNED:  # a fresh cluster each run: old Raft logs and sink files would confuse it
            path = d / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # ---------------------------------------------------------------------------------------- startup

    def _python(self, *args: str) -> list[str]:
        return [sys.executable, *args]

    @property
    def scheme(self) -> str:
        return "http" if self.pki is None else "https"

    def tls_env(self, kind: Kind, name: str) -> dict[str, str]:
        """The TLS settings of a child that acts as `kind` `name` (nothing with --insecure)."""
        if self.pki is None:
            return {}
        if name not in self._issued:
            self._issued[name] = self.pki.issue(kind, name)
        return self.pki.env(self._issued[name])

    def client_security(self) -> Security | None:
        return self.pki.client() if self.pki else None

    def start_routers(self) -> None:
        n = self.options.routers
        self.router_ids = [f"router-{i}" for i in range(n)]
        peers = [
            arg
            for i, node in enumerate(self.router_ids)
            for arg in ("--peer", f"{node}={HOST}:{self.layout.router_grpc[i]}")
        ]
        env = {
            "ETLROUTER_ROUTER__SIDECAR_HEARTBEAT_TIMEOUT_MS": str(HEARTBEAT_TIMEOUT_MS),
            "ETLROUTER_ROUTER__LEADER_GRACE_MS": str(HEARTBEAT_TIMEOUT_MS),
            # The interval the routers tell registering sidecars (they use the shorter of it and their own).
            "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_INTERVAL_MS),
        }
        for i, node in enumerate(self.router_ids):
            args = [
                "-m", "etlrouter", "--log-format", "json", "router", "--node-id", node, "--host", HOST,
                "--grpc-port", str(self.layout.router_grpc[i]),
                "--http-port", str(self.layout.router_http[i]),
                "--data-dir", str(self.data_dir / "routers" / node), *peers,
            ]  # fmt: skip
            self.supervisor.start(
                node, "router", self._python(*args), {**env, **self.tls_env("router", node)}
            )
            self.endpoints.append(Endpoint(node, self.layout.router_http[i], self.scheme))

    @property
    def router_addresses(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.layout.router_grpc]

    def service_args(self, service: ServiceSpec, j: int) -> list[str]:
        port = self.layout.service[j]
        auto: list[str] = []
        late: list[str] = []
        if service.connector == "generator":
            state = self.data_dir / "services" / f"{service.name}.state"
            state.parent.mkdir(parents=True, exist_ok=True)
            self.state_files[service.name] = state
            auto += ["--state-file", str(state), "--event-time-start-ms", str(int(time.time() * 1000))]
            if self.options.limit:
                late += ["--limit", str(self.options.limit)]
            if self.options.rate is not None:
                late += ["--rate", str(self.options.rate)]
            elif not self.options.limit and service.arg_value("--rate") is None:
                late += ["--rate", str(DEFAULT_RATE)]
        elif service.connector == "jsonl_file_sink":
            path_arg = service.arg_value("--path")
            path = Path(path_arg) if path_arg else self.data_dir / "sinks" / f"{service.name}.jsonl"
            if not path_arg:
                auto += ["--path", str(path)]
            if not self.options.limit and service.arg_value("--max-bytes") is None:
                # An open-ended demo must not fill the disk: rotate, keep one old file (a --limit run is
                # bounded by its limit, and its completion check reads whole files: no rotation there).
                auto += ["--max-bytes", str(SINK_MAX_BYTES), "--keep", "1"]
                self.capped_sinks.add(service.name)
            self.sink_files[service.name] = path
        elif service.connector == "http_ingest" and service.arg_value("--sidecar") is None:
            auto += ["--sidecar", f"{HOST}:{self.layout.sidecar_grpc[j]}"]  # it pushes to its own sidecar
        return [
            "-m", f"etlrouter.connectors.{service.connector}", "--name", service.name, "--host", HOST,
            "--port", str(port), "--log-format", "json", *auto, *service.args, *late,
        ]  # fmt: skip

    def start_services(self) -> None:
        for j, service in enumerate(self.options.spec.services):
            args = self.service_args(service, j)
            self.service_argv[service.name] = args
            # A push source (http-ingest) pushes as its pod, with its sidecar's certificate.
            env = (
                self.tls_env("sidecar", f"sidecar-{service.name}")
                if service.connector == "http_ingest"
                else {}
            )
            self.supervisor.start(service.name, "service", self._python(*args), env)

    def start_sidecars(self) -> None:
        routers = [arg for address in self.router_addresses for arg in ("--router", address)]
        for j, service in enumerate(self.options.spec.services):
            sidecar_id = f"sidecar-{service.name}"
            env = {
                "ETLROUTER_SIDECAR__DATA_DIR": str(self.data_dir / "sidecars" / sidecar_id),
                "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": str(HEARTBEAT_INTERVAL_MS),
                "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
                "ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS": "10000",
            }
            args = [
                "-m", "etlrouter", "--log-format", "json", "sidecar", "--id", sidecar_id, *routers,
                "--scan-ports", str(self.layout.service[j]),
                "--grpc-port", str(self.layout.sidecar_grpc[j]),
                "--http-port", str(self.layout.sidecar_http[j]),
            ]  # fmt: skip
            env.update(self.tls_env("sidecar", sidecar_id))
            self.supervisor.start(sidecar_id, "sidecar", self._python(*args), env)
            self.endpoints.append(Endpoint(sidecar_id, self.layout.sidecar_http[j], self.scheme))

    def check_children(self) -> None:
        example = self.options.example
        server = example.dead() if example else None
        if server is not None:
            raise DevError(
                f"the {server.name} server exited with status {server.process.returncode}; "
                f"its log ({server.log}) ends:\n" + server.tail()
            )
        dead = self.supervisor.dead()
        if dead:
            child = dead[0]
            raise DevError(
                f"{child.name} exited with status {child.proc.returncode}; its log ({child.log_path}) ends:\n"
                + self.supervisor.tail(child)
            )

    async def wait_for(self, what: str, check: Callable[[], object], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.stop.is_set():
                raise Interrupted
            self.check_children()
            if await check():  # type: ignore[misc]
                return
            if time.monotonic() > deadline:
                raise DevError(
                    f"timed out after {timeout:.0f} s waiting for {what}; logs in {self.supervisor.log_dir}"
                )
            await asyncio.sleep(0.1)

    async def _ready(self, session: aiohttp.ClientSession, port: int) -> bool:
        try:
            async with session.get(
                f"{self.scheme}://{HOST}:{port}/readyz", timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                return bool((await r.json(content_type=None)).get("ready"))
        except (TimeoutError, aiohttp.ClientError, ValueError):
            return False

    async def _listening(self, port: int) -> bool:
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            return False
        writer.close()
        return True

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.start_routers()
        self.start_services()

        async def routers_ready() -> bool:
            return all(await asyncio.gather(*(self._ready(session, p) for p in self.layout.router_http)))

        async def services_listening() -> bool:
            return all(await asyncio.gather(*(self._listening(p) for p in self.layout.service)))

        await self.wait_for("the routers to elect a leader", routers_ready, self.options.startup_timeout_s)
        await self.wait_for("the services to listen", services_listening, self.options.startup_timeout_s)
        self.start_sidecars()

        async def sidecars_ready() -> bool:
            return all(await asyncio.gather(*(self._ready(session, p) for p in self.layout.sidecar_http)))

        await self.wait_for("the sidecars to register", sidecars_ready, self.options.startup_timeout_s)
        self.write_record()

    def write_record(self) -> None:
        """dev.json: dev's pid, its children's and its servers' (rewritten when one more starts)."""
        example = self.options.example
        record = {
            "pid": os.getpid(),
            "children": self.supervisor.pids(),
            "servers": self.server_pids(),
            "namespaces": [s.namespace for s in example.started() if s.namespace] if example else [],
        }
        (self.data_dir / "dev.json").write_text(json.dumps(record, indent=2) + "\n")

    # ------------------------------------------------------------------------------------ --example

    def server_pids(self) -> dict[str, int]:
        example = self.options.example
        return {s.name: s.pid for s in example.started()} if example else {}

    async def start_example(self, example: SeedExample) -> None:
        """The example's servers (until each answers), then the topic, bucket and table it needs."""
        self.say("starting the example's servers: " + ", ".join(
            p.title for p in example.parts.values() if p.missing is None
        ))  # fmt: skip
        task = asyncio.ensure_future(example.start_servers(self.data_dir / "servers"))
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if not task.done():  # interrupted: stop_servers (in _run) waits for the starts, then stops them
            task.cancel()
            raise Interrupted
        try:
            task.result()
            await example.prepare()
        except Exception as e:
            raise DevError(
                f"the example's servers: {e}; their files and logs in {self.data_dir / 'servers'}"
            ) from e
        for server in example.started():
            self.say(f"server {server.name:<11} {server.address}  (pid {server.pid}, log {server.log})")

    def start_feeder(self, example: SeedExample) -> None:
        self.supervisor.start("feeder", "feeder", example.feeder_argv(self.options.rate))
        self.write_record()

    # --------------------------------------------------------------------------------- ctl context

    def write_context(self) -> None:
        """Make this cluster the current context of `etlrouter ctl` (and say where), so `etlrouter ctl list`
        in another terminal finds it with no flags."""
        entry = {
            "name": CONTEXT_NAME,
            "routers": self.router_addresses,
            "http": [f"{self.scheme}://{HOST}:{p}" for p in self.layout.router_http],
            "credentials": self.pki.credentials() if self.pki else {},
            "owner": {"pid": os.getpid(), "data_dir": str(self.data_dir)},
        }
        try:
            self.context_file = contexts.put(entry)
        except (OSError, contexts.ContextError) as e:
            self.say(f"etlrouter dev: could not write the ctl context ({e}); use --router", err=True)

    def remove_context(self) -> None:
        if self.context_file is None:
            return
        with contextlib.suppress(OSError, contexts.ContextError):
            contexts.remove_if_owned(CONTEXT_NAME, os.getpid(), self.context_file)

    # ------------------------------------------------------------------------------------- admin API

    @property
    def applied_filename(self) -> str:
        """The built-in sample is applied as `examples/dev.etl` (the same text), so `etlrouter ctl apply -f
        examples/dev.etl` from the repository's root reports it unchanged, as the file dev says it runs."""
        spec = self.options.spec
        if spec.filename == "sample.etl" and spec.pipelines == SAMPLE.read_text(encoding="utf-8"):
            return "examples/dev.etl"
        return spec.filename

    async def apply(self, client: RouterClient) -> None:
        spec = self.options.spec
        reply = await client.call(
            admin_grpc.PipelineAdminStub,
            "ApplyPipelines",
            admin_pb2.ApplyPipelinesRequest(definition=spec.pipelines, filename=self.applied_filename),
            write=True,
        )
        if reply.diagnostics:
            lines = []
            for d in reply.diagnostics:
                lines.append(f"{d.file or spec.filename}:{d.line}:{d.column}: error: {d.message}")
                if d.excerpt:
                    lines.append(d.excerpt)
                if d.hint:
                    lines.append(f"hint: {d.hint}")
            names = ", ".join(s.name for s in spec.services)
            raise DevError("the pipelines were not applied:\n" + "\n".join(lines) + f"\n(dev runs: {names})")
        for change in reply.changes:
            action = admin_pb2.PipelineChange.Action.Name(change.action).removeprefix("ACTION_").lower()
            self.say(f"pipeline {change.name}: {action}")

    async def refresh_topology(self, client: RouterClient) -> None:
        try:
            reply = await client.call(
                admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
            )
        except Exception:  # the view keeps the last topology while the cluster elects a leader
            return
        self.topology = view.topology_from(reply)

    # --------------------------------------------------------------------------------------- metrics

    async def sample(self, session: aiohttp.ClientSession) -> view.Sample:
        sample = view.Sample(at=time.monotonic())

        async def one(endpoint: Endpoint) -> None:
            try:
                async with session.get(endpoint.metrics, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    text = await r.text()
            except (TimeoutError, aiohttp.ClientError):
                sample.unreachable.append(endpoint.name)
                return
            view.parse_metrics(text, sample, endpoint.name)

        await asyncio.gather(*(one(e) for e in self.endpoints))
        return sample

    # -------------------------------------------------------------------------------------- --limit

    def progress(self) -> tuple[bool, list[str]]:
        """Whether the `--limit` run is complete, and what is still missing."""
        missing: list[str] = []
        for name, state in self.state_files.items():
            done, text = source_done(state, self._generator_config(name))
            if not done:
                missing.append(f"source {name}: {text}")
        for sink in self._sinks.values():
            sink.file.refresh()
            if sink.expected is None:
                if sink.file.lines == 0:
                    missing.append(f"sink {sink.name}: no records yet in {sink.file.path}")
                continue
            lacking = sink.expected - sink.file.offsets
            if lacking:
                missing.append(f"sink {sink.name} ({sink.file.path}): {describe_missing(lacking)}")
        return not missing, missing

    def _generator_config(self, name: str) -> GeneratorConfig:
        return generator_config(self.service_argv[name][2:])  # without "-m MODULE"

    def plan_sinks(self) -> None:
        """Which offsets each jsonl-file sink must hold at the end of a --limit run (None: unknown)."""
        self._sinks: dict[str, _Sink] = {}
        spec = self.options.spec
        names = {s.name for s in spec.services}
        for stage in self.topology.sinks():
            if stage.service not in self.sink_files:
                continue
            path = self.topology.path_to(stage)
            source = path[0]
            expected: set[int] | None = None
            if source.service in self.state_files and all(s.service in names for s in path[1:-1]):
                config = self._generator_config(source.service)
                steps = [
                    PathStep(spec.service(s.service).connector, spec.service(s.service), dict(s.options))
                    for s in path[1:-1]
                ]
                expected = expected_offsets(config, steps)
            self._sinks[stage.service] = _Sink(
                stage.service, SinkFile(self.sink_files[stage.service]), expected
            )

    # ---------------------------------------------------------------------------------------- running

    def banner(self) -> list[str]:
        lines = [
            f"etlrouter dev: {self.options.routers} routers, {len(self.options.spec.services)} services, "
            f"{len(self.options.spec.services)} sidecars on {HOST}",
            f"dashboard    {self.scheme}://{HOST}:{self.layout.router_http[0]}/  (any router)",
            f"GraphQL      {self.scheme}://{HOST}:{self.layout.router_http[0]}/graphql  (any router: "
            + ", ".join(str(p) for p in self.layout.router_http)
            + ")",
            f"admin API    {', '.join(self.router_addresses)}"
            + (
                f"  (ctl context {CONTEXT_NAME!r}, current, in {self.context_file}: `etlrouter ctl list`)"
                if self.context_file
                else f"  (etlrouter ctl --router {self.router_addresses[0]})"
            ),
            f"data dir     {self.data_dir}",
            f"logs         {self.supervisor.log_dir}/<process>.log",
        ]
        if self.pki is not None:
            creds = self.pki.credentials()
            lines += [
                f"security     mutual TLS, throw-away CA {creds['ca']} (--insecure: plaintext)",
                "             ctl uses the context's admin certificate; from elsewhere:",
                f"             etlrouter ctl --ca {creds['ca']} --cert {creds['cert']} --key {creds['key']}",
                f"             dashboard/GraphQL token (role admin): {self.pki.token}",
            ]
        else:
            lines.append("security     OFF (--insecure): plaintext, no authentication")
        if self.options.example is not None:
            lines += self.options.example.banner(self.options.rate)
        for name, path in self.sink_files.items():
            cap = " (rotates at 64 MiB to .1; at most 128 MiB)" if name in self.capped_sinks else ""
            lines.append(f"{'sink ' + name:<12} {path}{cap}")
        return lines

    def sink_bytes(self) -> int:
        """Bytes the sink files (with their rotated files and commit logs) take on disk now."""
        total = 0
        for path in self.sink_files.values():
            for p in path.parent.glob(path.name + "*"):
                with contextlib.suppress(OSError):
                    total += p.stat().st_size
        return total

    def growth_line(self, previous: tuple[float, int] | None) -> tuple[str, tuple[float, int]]:
        now = (time.monotonic(), self.sink_bytes())
        if not self.sink_files:
            return "", now
        rate = 0.0
        if previous and now[0] > previous[0]:
            rate = max(0.0, (now[1] - previous[1]) / (now[0] - previous[0]))
        text = f"disk: sinks {now[1] / (1 << 20):.1f} MiB, growing {rate / (1 << 20):.2f} MiB/s"
        text += f" ({rate * 3600 / (1 << 30):.1f} GiB/h)" if rate else ""
        if self.capped_sinks:
            text += "; capped by rotation"
        return text, now

    def metrics_lines(self) -> list[str]:
        return [f"/metrics     {e.name:<24} {e.metrics}" for e in self.endpoints]

    async def run_loop(self, session: aiohttp.ClientSession, client: RouterClient, tty: bool) -> int:
        limit = self.options.limit
        deadline = time.monotonic() + self.options.timeout_s
        before: view.Sample | None = None
        last_summary = 0.0
        planned = False
        run_started = time.monotonic()
        growth: tuple[float, int] | None = None
        growth_text = ""
        if tty:
            self.out.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide the cursor
        try:
            while not self.stop.is_set():
                self.check_children()
                await self.refresh_topology(client)
                now = await self.sample(session)
                if now.leaders:
                    self.leaders = list(now.leaders)
                if growth is None or time.monotonic() - growth[0] >= 5:
                    growth_text, growth = self.growth_line(growth)
                if tty:
                    up = int(time.monotonic() - self.started_at)
                    header = [
                        *self.banner(),
                        f"up {up // 60:02d}:{up % 60:02d}   Ctrl-C stops everything"
                        + (f"   --limit {limit}" if limit else ""),
                        growth_text,
                    ]
                    lines = view.render(self.topology, now, before, header)
                    self.out.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
                    self.out.flush()
                elif time.monotonic() - last_summary >= 5:
                    tail = f"; {growth_text}" if growth_text else ""  # no sink files (--example): no disk
                    self.say(view.summary_line(self.topology, now, before) + tail)
                    last_summary = time.monotonic()
                before = now
                if limit:
                    if not planned and self.topology.sinks():
                        await asyncio.to_thread(self.plan_sinks)  # computes N records: off the loop
                        planned = True
                    if planned:
                        done, missing = await asyncio.to_thread(self.progress)
                        if done:
                            elapsed = time.monotonic() - run_started
                            self._leave_screen(tty)
                            tty = False
                            self.say(f"--limit {limit}: done in {elapsed:.1f} s")
                            for sink in self._sinks.values():
                                self.say(f"  {sink.name}: {sink.file.lines} lines in {sink.file.path}")
                            return EXIT_OK
                        if time.monotonic() > deadline:
                            raise DevError(
                                f"--limit {limit}: not complete after {self.options.timeout_s:.0f} s:\n  "
                                + "\n  ".join(missing)
                            )
                    elif time.monotonic() > deadline:
                        raise DevError(
                            f"--limit {limit}: no pipeline was running after {self.options.timeout_s:.0f} s"
                        )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=1.0)
            return EXIT_OK
        finally:
            self._leave_screen(tty)

    def _leave_screen(self, tty: bool) -> None:
        if tty:
            self.out.write("\x1b[?25h\x1b[?1049l")
            self.out.flush()

    async def main(self) -> int:
        example = self.options.example
        if example is not None:  # 0. an example that cannot run at all: said before anything changes
            why = example.cannot_run()
            if why:
                for line in example.skipped():
                    self.say(line)
                raise DevUsageError(why)
        self.lock_data_dir()  # 1. the lock: a live dev on this directory stops us before anything changes
        services = self.options.spec.services
        self.layout = make_layout(self.options.base_port, self.options.routers, len(services))
        self.check_ports()  # 2. the ports: busy ones stop us before anything changes
        self.prepare_data_dir()  # 3. only now: wipe the previous run's files
        self.pki = None if self.options.insecure else DevPki(self.data_dir / "pki")
        connector = aiohttp.TCPConnector(ssl=self.pki.http_context() if self.pki else False)
        async with aiohttp.ClientSession(connector=connector) as session:
            if example is not None:
                await self.start_example(example)
                if self.options.base_port == 0:  # free ports chosen again now that the servers hold theirs
                    self.layout = make_layout(0, self.options.routers, len(services))
            await self.start(session)
            self.write_context()
            client = RouterClient(self.router_addresses, timeout=20, security=self.client_security())
            try:
                await self.apply(client)
                if example is not None:
                    self.start_feeder(example)
                await self.refresh_topology(client)
                for line in [*self.banner(), *self.metrics_lines()]:
                    self.say(line)
                if self.topology.stages:
                    shared = [s for s in view.shared_stages(self.topology)]
                    for s in shared:
                        self.say(f"shared stage {s.kind} {s.service}: runs once for {', '.join(s.pipelines)}")
                tty = self.options.view and self.out.isatty()
                return await self.run_loop(session, client, tty)
            finally:
                client.close()

    def stop_steps(self) -> list[tuple[list[str], float]]:
        """Sidecars by the depth of their service in the DAGs (sources first: they stop pulling and their
        in-flight batches still find the sidecars below them running), then services, then routers."""
        depth: dict[str, int] = {}
        for stage in self.topology.stages:
            depth[stage.service] = min(depth.get(stage.service, stage.depth), stage.depth)
        levels: dict[int, list[str]] = {}
        for child in self.supervisor.children:
            if child.group == "sidecar":
                service = child.name.removeprefix("sidecar-")
                levels.setdefault(depth.get(service, 1 << 20), []).append(child.name)
        feeder = [c.name for c in self.supervisor.children if c.group == "feeder"]
        steps = [(feeder, FEEDER_DEADLINE_S)]  # nothing new into Kafka while the pipelines drain
        steps += [(levels[d], SIDECAR_DEADLINE_S) for d in sorted(levels)]
        steps.append(([c.name for c in self.supervisor.children if c.group == "service"], SERVICE_DEADLINE_S))
        # Followers before the leader: it then finds no voter listening and skips a hand-over that would
        # only wait out its timeout (the whole cluster stops).
        routers = [c.name for c in self.supervisor.children if c.group == "router"]
        followers = [r for r in routers if r not in self.leaders]
        steps += [
            (group, ROUTER_DEADLINE_S) for group in (followers, [r for r in routers if r in self.leaders])
        ]
        return [step for step in steps if step[0]]

    def shutdown(self) -> list[str]:
        return self.supervisor.stop_all(self.stop_steps())


@dataclass
class _Sink:
    name: str
    file: SinkFile
    expected: set[int] | None


async def _run(options: DevOptions) -> int:
    dev = Dev(options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, dev.on_signal, sig)
    code = EXIT_FAILED
    try:
        code = await dev.main()
    except Interrupted:
        code = EXIT_OK
    except DevError as exc:
        dev.say(f"etlrouter dev: {exc}", err=True)
        code = EXIT_USAGE if isinstance(exc, DevUsageError) else EXIT_FAILED
    finally:
        if dev.supervisor.children:
            first = "the feeder, " if options.example is not None else ""
            dev.say(
                f"stopping: {first}sidecars (sources first), then services, then routers (the leader last) …"
            )
            killed = await asyncio.to_thread(dev.shutdown)
            if killed:
                dev.say(f"killed after their deadline: {', '.join(killed)}")
            dev.say(f"all {len(dev.supervisor.children)} processes stopped; logs in {dev.supervisor.log_dir}")
        if options.example is not None and options.example.starting():
            names = await asyncio.to_thread(options.example.stop_servers)
            dev.say(f"servers stopped: {', '.join(names)}; their files in {dev.data_dir / 'servers'}")
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        dev.remove_context()
        dev.unlock_data_dir()
    return code


def run_dev(options: DevOptions) -> int:
    """Run dev until done (exit code 0), failed (1) or interrupted (0)."""
    return asyncio.run(_run(options))


__all__ = ["Child", "DevError", "DevOptions", "run_dev"]
