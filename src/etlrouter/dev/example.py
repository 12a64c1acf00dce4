"""`etlrouter dev --example seed`: examples/seed.etl with the servers it talks to, started by dev.

The seed example reads orders from Kafka, drops the invalid ones and writes the rest to S3 and ClickHouse
(one shared source and filter stage). dev starts what is installed (etlrouter.dev.servers): a Tansu broker
(Kafka protocol), SeaweedFS (S3) and ClickHouse, on free loopback ports with their files in
DATA/servers/; creates the topic, bucket and table; runs the pipelines whose servers run; and starts a
feeder (etlrouter.dev.feed) producing orders into the topic. A server that is not installed is skipped
with one line saying what is missing and how to install it, with the pipeline that needs it; without a
Kafka broker (or with no sink left) the example cannot run at all (exit 2, nothing started).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import socket
import sys
from concurrent import futures
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from etlrouter.dev import servers
from etlrouter.dev.servers import HOST, S3_ACCESS_KEY, S3_SECRET_KEY, Server
from etlrouter.dev.spec import DevSpec, ServiceSpec, parse_services

EXAMPLES = ("seed",)
FILENAME = "examples/seed.etl"
TOPIC, PARTITIONS = "orders", 3
BUCKET, PREFIX = "seed", "orders/"
TABLE = "orders"
TABLE_DDL = (
    f"CREATE TABLE {TABLE} (id UInt64, amount Float64, country String, _batch String, _offset UInt64) "
    "ENGINE = MergeTree ORDER BY id"
)
DEFAULT_FEED_RATE = 200.0  # orders/s the feeder produces unless --rate says otherwise
# The addresses in the file's `# dev: service` lines, replaced by the servers' own.
KAFKA_DEFAULT, S3_DEFAULT, CLICKHOUSE_DEFAULT = (
    "127.0.0.1:9092",
    "http://127.0.0.1:8333",
    "http://127.0.0.1:8123",
)
CONNECTORS_EXTRA = "pip install 'etlrouter[connectors]'"


def seed_text() -> str:
    return resources.files("etlrouter.dev").joinpath("seed.etl").read_text(encoding="utf-8")


def free_ports(n: int) -> list[int]:
    """n distinct ports the kernel hands out (all bound until every one is chosen)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket())
            s.bind((HOST, 0))
            ports.append(int(s.getsockname()[1]))
    return ports


def _client_missing(module: str, what: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{what} needs the Python package {module}: {CONNECTORS_EXTRA}"
    return None


def drop_pipelines(text: str, names: set[str]) -> str:
    """`text` without the `pipeline NAME { … }` blocks of `names` (a block ends at a line that is `}`)."""
    if not names:
        return text
    pattern = re.compile(r"^pipeline\s+([A-Za-z0-9_-]+)\s*\{.*?^\}[ \t]*\n?", re.MULTILINE | re.DOTALL)
    return pattern.sub(lambda m: "" if m.group(1) in names else m.group(0), text)


@dataclass
class Part:
    """One server of the example and what depends on it."""

    key: str  # kafka, s3, clickhouse
    title: str
    binary: str  # the executable, or why it is missing
    missing: str | None  # why it cannot run here (None: it runs)
    ports: tuple[int, ...]
    service: str | None = None  # the sink service that needs it (None: everything needs it)
    pipeline: str | None = None
    server: Server | None = None


@dataclass
class SeedExample:
    parts: dict[str, Part]
    text: str = field(default_factory=seed_text)
    _pool: futures.ThreadPoolExecutor | None = None
    _starting: list[futures.Future[Server]] = field(default_factory=list)

    @classmethod
    def find(cls) -> SeedExample:
        """Which servers are installed here (nothing is started)."""
        kafka, s3, clickhouse = servers.tansu_binary(), servers.weed_binary(), servers.clickhouse_binary()
        ports = free_ports(4)

        def why(binary: str, *others: str | None) -> str | None:
            if not servers.found(binary):
                return binary
            return next((o for o in others if o), None)

        parts = {
            "kafka": Part(
                "kafka",
                "Kafka-protocol broker (Tansu)",
                kafka,
                why(kafka, _client_missing("aiokafka", "the Kafka source")),
                (ports[0],),
            ),
            "s3": Part(
                "s3",
                "S3 (SeaweedFS)",
                s3,
                why(s3, servers.seaweedfs_unsupported(), _client_missing("aiobotocore", "the S3 sink")),
                (ports[1],),
                "lake",
                "orders-to-s3",
            ),
            "clickhouse": Part(
                "clickhouse",
                "ClickHouse",
                clickhouse,
                why(clickhouse),
                (ports[2], ports[3]),
                "olap",
                "orders-to-clickhouse",
            ),
        }
        return cls(parts)

    # ------------------------------------------------------------------------------------ what runs

    def running(self, key: str) -> bool:
        return self.parts[key].missing is None

    def skipped(self) -> list[str]:
        """One line per part that cannot run: what is missing, how to install it, what it leaves out."""
        lines = []
        for part in self.parts.values():
            if part.missing is None:
                continue
            leaves = f"pipeline {part.pipeline} not run" if part.pipeline else "the example cannot run"
            lines.append(f"skipped      {part.title} ({leaves}): {part.missing}")
        return lines

    def cannot_run(self) -> str | None:
        """Why the example cannot run at all (exit 2), or None."""
        kafka = self.parts["kafka"]
        if kafka.missing:
            return f"--example seed needs a {kafka.title}: {kafka.missing}; nothing was started"
        if not any(self.running(k) for k in ("s3", "clickhouse")):
            return "--example seed: neither S3 nor ClickHouse can run here (see above); nothing was started"
        return None

    def address(self, key: str) -> str:
        part = self.parts[key]
        if key == "kafka":
            return f"{HOST}:{part.ports[0]}"
        return f"http://{HOST}:{part.ports[0]}"

    def spec(self) -> DevSpec:
        """The example's pipelines and services with this run's addresses, without the skipped sinks."""
        replace = {
            KAFKA_DEFAULT: self.address("kafka"),
            S3_DEFAULT: self.address("s3"),
            CLICKHOUSE_DEFAULT: self.address("clickhouse"),
        }
        skipped = [p for p in self.parts.values() if p.missing and p.service]
        services = []
        for service in parse_services(self.text, FILENAME):
            if any(service.name == p.service for p in skipped):
                continue
            args = [replace.get(a, a) for a in service.args]
            if service.connector == "s3":
                args += ["--access-key-id", S3_ACCESS_KEY, "--secret-access-key", S3_SECRET_KEY]
            services.append(ServiceSpec(service.name, service.connector, tuple(args)))
        text = drop_pipelines(self.text, {p.pipeline for p in skipped if p.pipeline})
        return DevSpec(text, FILENAME, tuple(services))

    # ------------------------------------------------------------------------------------- servers

    def _start(self, part: Part, workdir: Path) -> Server:
        if part.key == "kafka":
            server = servers.start_tansu(part.binary, part.ports[0], workdir)
        elif part.key == "s3":
            server = servers.start_seaweedfs(part.binary, part.ports[0], workdir)
        else:
            server = servers.start_clickhouse(part.binary, part.ports[0], part.ports[1], workdir)
        part.server = server
        return server

    async def start_servers(self, root: Path) -> None:
        """Start every part that can run, at the same time, and wait until each answers. The threads that
        start them live until `stop_servers` (a server gets SIGKILL when its starting thread ends)."""
        parts = [p for p in self.parts.values() if p.missing is None]
        self._pool = futures.ThreadPoolExecutor(len(parts), thread_name_prefix="dev-server")
        self._starting = [self._pool.submit(self._start, p, root / p.key) for p in parts]
        errors = []
        for part, future in zip(parts, self._starting, strict=True):
            try:
                await asyncio.wrap_future(future)
            except Exception as e:  # reported with the part's name
                errors.append(f"{part.title} did not start: {e}")
        if errors:
            raise RuntimeError("\n".join(errors))

    async def prepare(self) -> None:
        """The topic, bucket and table the pipelines need."""
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=self.address("kafka"))
        await admin.start()
        try:
            await admin.create_topics([NewTopic(TOPIC, PARTITIONS, 1)])
        finally:
            await admin.close()
        if self.running("s3"):
            async with servers.s3_client(self.address("s3")) as s3:
                # Already there: a rerun on the same data dir, or botocore retried a create that succeeded.
                with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
                    await s3.create_bucket(Bucket=BUCKET)
        if self.running("clickhouse"):
            await servers.clickhouse_query(self.address("clickhouse"), TABLE_DDL)

    def starting(self) -> bool:
        """Whether any server was started (or is still starting)."""
        return bool(self._starting)

    def started(self) -> list[Server]:
        return [p.server for p in self.parts.values() if p.server is not None]

    def dead(self) -> Server | None:
        return next((s for s in self.started() if not s.stopped and not s.alive()), None)

    def stop_servers(self) -> list[str]:
        """Stop every server that started (waiting for any still starting); their names."""
        futures.wait(self._starting)
        names = []
        for server in self.started():
            server.stop()
            names.append(server.name)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return names

    # ------------------------------------------------------------------------------------- output

    def feeder_argv(self, rate: float | None) -> list[str]:
        rate = DEFAULT_FEED_RATE if rate is None else rate
        return [
            sys.executable, "-m", "etlrouter.dev.feed", "--bootstrap-servers", self.address("kafka"),
            "--topic", TOPIC, "--rate", str(rate),
        ]  # fmt: skip

    def banner(self, rate: float | None) -> list[str]:
        rate = DEFAULT_FEED_RATE if rate is None else rate
        kafka = self.address("kafka")
        lines = [
            f"example      seed ({FILENAME}): Kafka → valid-orders → "
            + " and ".join(n for k, n in (("s3", "S3"), ("clickhouse", "ClickHouse")) if self.running(k)),
            f"kafka        {kafka}  topic {TOPIC} ({PARTITIONS} partitions); the feeder produces "
            + (f"{rate:g} orders/s" if rate else "orders as fast as it can")
            + " (every tenth invalid)",
        ]
        if self.running("s3"):
            s3 = self.address("s3")
            lines += [
                f"s3           {s3}  bucket {BUCKET}, keys under {PREFIX} (access key {S3_ACCESS_KEY}, "
                f"secret {S3_SECRET_KEY}, path-style)",
                f"             AWS_ACCESS_KEY_ID={S3_ACCESS_KEY} AWS_SECRET_ACCESS_KEY={S3_SECRET_KEY} "
                f"aws --endpoint-url {s3} s3 ls s3://{BUCKET}/{PREFIX}",
            ]
        if self.running("clickhouse"):
            ch = self.address("clickhouse")
            lines.append(f"clickhouse   {ch}  table {TABLE}: curl '{ch}/?query=SELECT+count()+FROM+{TABLE}'")
        lines += self.skipped()
        pipeline = next(p.pipeline for p in self.parts.values() if p.pipeline and self.running(p.key))
        lines.append(
            f"ctl          etlrouter ctl list · etlrouter ctl describe {pipeline} · "
            f"etlrouter ctl explain {FILENAME} (from the repository)"
        )
        return lines
