#!/usr/bin/env python3
"""End-to-end records/s and latency through the real processes `etlrouter dev` starts (3 routers, one
process per service, one sidecar per service), for a filter and a map transform.

    python benchmarks/e2e.py [--records 200000] [--latency-rate 1000] [--latency-seconds 10]

Throughput: `etlrouter dev --limit N` runs generator → TRANSFORM → jsonl-file sink as fast as it goes;
this script tails the sink file and reports N / (time the last record appeared - the time dev
had every sidecar registered, just before it applied the pipeline), so process start-up is not counted
but placement and the first batches' way through are (use enough records to make that small).

Latency: the generator cannot say when it handed a record out (its event times are computed, and its first
pull comes seconds after dev started it), so latency runs feed the same transform from a jsonl-file source
in follow mode: this script appends lines at a fixed rate, each carrying the wall-clock time it was written
as its event time (`--event-time-field ts`), tails the sink file and reports, per record, the time it
appeared in the sink minus its event time: write → source → sidecars → transform → sink → file. The tail
wakes by inotify on the sink's directory (so it sees a line well under a millisecond after its write);
`--tail-poll` (and any system without inotify) checks every 5 ms instead, adding 2.5 ms on average, as
the numbers before issue #20 did. `--no-throughput` runs only the latency rows.

PostgreSQL rows (skipped, saying why, without Debian's postgresql binaries): a throw-away server (trust
auth, fsync off; started as the `postgres` user when run as root) and the `postgres` sink in insert mode
into a table whose `written_ms` column defaults to the commit's clock: throughput is N rows counted in the
table, latency is `written_ms - event_time_ms` per row (event time → sink write), with the same source
set-ups as above.

Connector rows (issue #15): kafka -> filter -> s3 and kafka -> filter -> clickhouse against the servers
`etlrouter dev --example seed` starts (Tansu, SeaweedFS, ClickHouse; skipped, saying what is missing,
without them): the topic is filled with the generator's N records first (not timed), then throughput is
N / (time the store held all N, polled every 0.2 s - the time dev had every sidecar registered).
`--no-connectors` skips them.

The Bytewax row (issue #20: a Python stream processor a user would pick instead): the same generator →
filter → JSON-lines file work in one Bytewax dataflow in a process of its own, one worker, with our
generator's `make_record`, a JSON decode of the value for the filter and the jsonl sink's `record_line`;
records/s and CPU seconds per 100k records, and the share of it the routed filter pipeline reaches. Skipped,
saying how to install it, without `bytewax` (`make bench` installs the pinned version). `--insecure` runs
dev without mutual TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from etlrouter.connectors._follow import IN_CLOSE_WRITE, IN_CREATE, IN_MODIFY, IN_MOVED_TO, open_watch
from etlrouter.testing.postgres import PostgresUnavailableError, throwaway_postgres

POLL_S = 0.005
PG_TABLE = "bench"
PG_DDL = (
    f"CREATE TABLE {PG_TABLE} (key bytea NOT NULL, value bytea, headers jsonb NOT NULL, "
    "event_time_ms bigint NOT NULL, source_offset bigint NOT NULL, batch_id text NOT NULL, "
    "written_ms bigint NOT NULL DEFAULT (extract(epoch from clock_timestamp()) * 1000)::bigint)"
)
TRANSFORMS = {
    "filter": ("filter", "config.expr", "value.amount >= 0"),
    "map": ("map", "config.program", "value.twice = value.amount * 2"),
}


class Tail:
    """Lines of a growing file, each with the time this process first saw it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.partial = b""

    def poll(self) -> list[tuple[float, bytes]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return []
        now = time.time()
        self.pos += len(data)
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        return [(now, line) for line in lines if line.strip()]


class Wake:
    """Sleeps until something in `directory` changed or `seconds` passed (inotify where it can; a sleep)."""

    def __init__(self, directory: Path, use_inotify: bool) -> None:
        self.fd = -1
        if use_inotify:
            with contextlib.suppress(OSError):
                self.fd = open_watch(directory, IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO)

    def sleep(self, seconds: float) -> None:
        if self.fd < 0:
            time.sleep(seconds)
            return
        ready, _, _ = select.select([self.fd], [], [], seconds)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 64 * 1024):
                    pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def dev(data: Path, pipeline_file: Path, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "etlrouter", "dev", str(pipeline_file), "--no-view"]
    cmd += ["--data-dir", str(data), "--base-port", "0", *args]
    if INSECURE:
        cmd.append("--insecure")
    return subprocess.Popen(cmd, stdout=(data.parent / "dev.out").open("wb"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pipeline_text(source_line: str, transform: str) -> str:
    connector, option, expr = TRANSFORMS[transform]
    return (
        f"{source_line}\n"
        f"# dev: service step {connector}\n"
        "# dev: service out jsonl_file_sink\n"
        f'pipeline bench {{ source src | transform step ({option} = "{expr}") | sink out }}\n'
    )


def throughput(transform: str, records: int, workdir: Path) -> tuple[float, float]:
    """(records/s, seconds) from just before the pipeline was applied to the last record in the sink."""
    file = workdir / f"tp-{transform}.etl"
    file.write_text(pipeline_text("# dev: service src generator --seed 1 --record-size 200", transform))
    data = workdir / f"tp-{transform}"
    proc = dev(data, file, "--limit", str(records), "--timeout", "300")
    tail = Tail(data / "sinks" / "out.jsonl")
    seen: set[int] = set()
    last = 0.0
    try:
        while len(seen) < records:
            exited = proc.poll() is not None
            lines = tail.poll()
            for at, line in lines:
                seen.add(json.loads(line)["offset"])
                last = at
            if exited and not lines and len(seen) < records:
                raise SystemExit(f"dev exited with {proc.returncode}: see {workdir / 'dev.out'}")
            time.sleep(POLL_S)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise SystemExit(f"dev --limit failed ({proc.returncode}): see {data / 'logs'}")
    seconds = last - (data / "dev.json").stat().st_mtime
    return records / seconds, seconds


INSECURE = False  # --insecure: dev without mutual TLS (its default is mTLS with a throw-away CA)
BYTEWAX_VERSION = "0.21.1"  # `make bench` installs it; without it the row says how


def bytewax_worker(records: int, out: Path) -> None:
    """`e2e.py bytewax-worker N OUT` (a process of its own): generator -> filter -> JSON-lines file in one
    Bytewax dataflow, one worker, as a user would write it; prints {"seconds", "cpu_s"} of the run.

    The per-record work is ours: the generator connector's `make_record` (1000-record batches), a JSON
    decode of the value and `amount >= 0` (what `filter` with `value.amount >= 0` does) and the jsonl
    sink's `record_line`, encoded with msgspec, one line per record."""
    import resource

    import msgspec
    from bytewax import operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.inputs import DynamicSource, StatelessSourcePartition
    from bytewax.outputs import DynamicSink, StatelessSinkPartition
    from bytewax.testing import run_main

    from etlrouter.connectors.generator import GeneratorConfig, make_record
    from etlrouter.connectors.jsonl_file_sink import record_line

    config = GeneratorConfig(seed=1, record_size=200)
    decode, encode = msgspec.json.decode, msgspec.json.Encoder().encode

    class Generated(StatelessSourcePartition[Any]):
        def __init__(self) -> None:
            self.offset = 0

        def next_batch(self) -> list[Any]:
            if self.offset >= records:
                raise StopIteration
            end = min(records, self.offset + 1000)
            batch = [make_record(config, 0, offset) for offset in range(self.offset, end)]
            self.offset = end
            return batch

    class Generator(DynamicSource[Any]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> Generated:
            return Generated()

    class Lines(StatelessSinkPartition[Any]):
        def __init__(self) -> None:
            self.file = out.open("wb")

        def write_batch(self, items: list[Any]) -> None:
            self.file.write(b"".join(encode(record_line("bytewax", r)) + b"\n" for r in items))
            self.file.flush()

        def close(self) -> None:
            self.file.close()

    class LinesSink(DynamicSink[Any]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> Lines:
            return Lines()

    flow = Dataflow("bench")
    kept = op.filter("step", op.input("src", flow, Generator()), lambda r: decode(r.value)["amount"] >= 0)
    op.output("out", kept, LinesSink())
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    run_main(flow)
    seconds, after = time.monotonic() - started, resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    print(json.dumps({"seconds": seconds, "cpu_s": cpu}))


def bytewax_row(records: int, workdir: Path) -> tuple[float, float, float] | str:
    """(records/s, seconds, CPU s per 100k records) of the Bytewax peer, or why it did not run."""
    try:
        import bytewax  # noqa: F401
    except ImportError:
        return f"skipped: pip install bytewax=={BYTEWAX_VERSION} (make bench does)"
    out = workdir / "bytewax.jsonl"
    done = subprocess.run(
        [sys.executable, __file__, "bytewax-worker", str(records), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"failed: {done.stderr.strip().splitlines()[-1:]}"
    with out.open("rb") as f:
        written = sum(1 for _ in f)
    if written != records:
        return f"failed: {written} of {records} records in {out}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return records / result["seconds"], result["seconds"], result["cpu_s"] / records * 100_000


KAFKA_TOPIC, KAFKA_PARTITIONS, S3_BUCKET = "bench", 3, "bench"
CH_TABLE_DDL = (
    "CREATE TABLE bench (id UInt64, amount Float64, country String, _batch String, _offset UInt64) "
    "ENGINE = MergeTree ORDER BY id"
)


async def fill_topic(bootstrap: str, records: int) -> None:
    """`records` generator records (seed 1, 200 B values) in the topic, round-robin over its partitions."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    from etlrouter.connectors.generator import GeneratorConfig, make_record

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(KAFKA_TOPIC, KAFKA_PARTITIONS, 1)])
    finally:
        await admin.close()
    config = GeneratorConfig(seed=1, record_size=200)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for start in range(0, records, 1000):
            sent = [
                await producer.send(
                    KAFKA_TOPIC,
                    make_record(config, 0, i).value,
                    key=b"%d" % i,
                    partition=i % KAFKA_PARTITIONS,
                )
                for i in range(start, min(records, start + 1000))
            ]
            await asyncio.gather(*sent)
    finally:
        await producer.stop()


def s3_lines_counter(endpoint: str) -> Any:
    """A function counting the lines of the objects under bench/ (each object read once, when it appears)."""
    from etlrouter.dev import servers

    counted: dict[str, int] = {}

    async def count() -> int:
        async with servers.s3_client(endpoint) as s3:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=S3_BUCKET, Prefix="bench/"):
                for item in page.get("Contents", []):
                    if item["Key"] not in counted:
                        body = await (await s3.get_object(Bucket=S3_BUCKET, Key=item["Key"]))["Body"].read()
                        counted[item["Key"]] = body.count(b"\n")
        return sum(counted.values())

    return lambda: asyncio.run(count())


def connector_throughput(
    name: str, sink_line: str, count: Any, bootstrap: str, records: int, workdir: Path
) -> tuple[float, float]:
    """(records/s, seconds) from just before the pipeline was applied until `count()` says every record of
    the topic is in the store (polled every 0.2 s)."""
    file = workdir / f"tp-{name}.etl"
    file.write_text(
        f"# dev: service src kafka_source --bootstrap-servers {bootstrap} --topic {KAFKA_TOPIC}"
        f" --group g-{name}\n"
        "# dev: service step filter\n"
        f"# dev: service out {sink_line}\n"
        'pipeline bench { source src | transform step (config.expr = "value.amount >= 0") '
        '| sink out (config.prefix = "bench/") }\n'
    )
    data = workdir / f"tp-{name}"
    proc = dev(data, file, "--timeout", "300")
    try:
        deadline = time.monotonic() + 300
        while (n := count() if (data / "dev.json").exists() else 0) < records:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name}: {n} of {records} records arrived; see {data / 'logs'}")
            time.sleep(0.2)
        last = time.time()
    finally:
        stop(proc)
    seconds = last - (data / "dev.json").stat().st_mtime
    return records / seconds, seconds


def connector_rows(records: int, workdir: Path) -> list[tuple[str, tuple[float, float] | str]]:
    """kafka -> filter -> s3 and -> clickhouse, against the servers `dev --example seed` starts."""
    from etlrouter.dev import servers

    name_s3, name_ch = "kafka -> filter -> s3", "kafka -> filter -> clickhouse"
    # Each *_binary() is the binary's path, or a sentence saying what is missing and how to install it.
    missing = [
        binary
        for binary in (servers.tansu_binary(), servers.weed_binary(), servers.clickhouse_binary())
        if not servers.found(binary)
    ]
    why_s3 = servers.seaweedfs_unsupported()
    if missing:
        return [(name_s3, "skipped: " + "; ".join(missing)), (name_ch, "skipped (see above)")]
    rows: list[tuple[str, tuple[float, float] | str]] = []
    kafka = servers.start_tansu(servers.tansu_binary(), servers.free_port(), workdir / "servers" / "kafka")
    try:
        asyncio.run(fill_topic(kafka.address, records))
        if why_s3:
            rows.append((name_s3, f"skipped: {why_s3}"))
        else:
            s3 = servers.start_seaweedfs(
                servers.weed_binary(), servers.free_port(), workdir / "servers" / "s3"
            )
            try:

                async def bucket() -> None:
                    async with servers.s3_client(s3.address) as client:
                        await client.create_bucket(Bucket=S3_BUCKET)

                asyncio.run(bucket())
                sink = (
                    f"s3 --bucket {S3_BUCKET} --endpoint-url {s3.address} --path-style "
                    f"--access-key-id {servers.S3_ACCESS_KEY} --secret-access-key {servers.S3_SECRET_KEY}"
                )
                rows.append(
                    (
                        name_s3,
                        connector_throughput(
                            "s3", sink, s3_lines_counter(s3.address), kafka.address, records, workdir
                        ),
                    )
                )
            finally:
                s3.stop()
        ch = servers.start_clickhouse(
            servers.clickhouse_binary(), servers.free_port(), servers.free_port(), workdir / "servers" / "ch"
        )
        try:
            asyncio.run(servers.clickhouse_query(ch.address, CH_TABLE_DDL))
            sink = (
                f"clickhouse --url {ch.address} --table bench --batch-id-column _batch"
                " --offset-column _offset --skip-unknown-fields"
            )

            def count() -> int:
                return int(asyncio.run(servers.clickhouse_query(ch.address, "SELECT count() FROM bench")))

            rows.append(
                (name_ch, connector_throughput("clickhouse", sink, count, kafka.address, records, workdir))
            )
        finally:
            ch.stop()
    finally:
        kafka.stop()
    return rows


def percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def latency(
    transform: str, rate: float, seconds: float, workdir: Path, tail_poll: bool = False
) -> tuple[int, list[float]]:
    """Latencies (ms) of records written at `rate`/s for `seconds`, after a 2 s warm-up."""
    source = workdir / f"lat-{transform}.jsonl"
    source.write_text("")
    file = workdir / f"lat-{transform}.etl"
    file.write_text(
        pipeline_text(
            f"# dev: service src jsonl_file_source --path {source} --follow --event-time-field ts", transform
        )
    )
    data = workdir / f"lat-{transform}"
    proc = dev(data, file)
    tail = Tail(data / "sinks" / "out.jsonl")
    latencies: list[float] = []
    written = seen = 0
    wake: Wake | None = None

    def collect() -> None:
        nonlocal seen
        for at, line in tail.poll():
            seen += 1
            event_ms = json.loads(line)["event_time_ms"]
            if event_ms / 1000 >= warmup_end:
                latencies.append(at * 1000 - event_ms)

    try:
        deadline = time.monotonic() + 60
        while not (data / "dev.json").exists():  # written once every sidecar is registered
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dev did not start: see {workdir / 'dev.out'}")
            time.sleep(0.05)
        warmup_end = time.time() + 2
        start = time.monotonic()
        end = start + 2 + seconds
        (data / "sinks").mkdir(parents=True, exist_ok=True)
        wake = Wake(data / "sinks", use_inotify=not tail_poll)
        next_write = start
        with source.open("a") as out:
            while time.monotonic() < end:
                if time.monotonic() >= next_write:  # every 5 ms, the lines due by then
                    due = int((time.monotonic() - start) * rate)
                    while written < due:
                        now_ms = int(time.time() * 1000)
                        out.write(json.dumps({"ts": now_ms, "n": written, "amount": written % 1000}) + "\n")
                        written += 1
                    out.flush()
                    next_write = time.monotonic() + POLL_S
                collect()
                # Until the next write, or until the sink file changed: then the tail reads it at once.
                wake.sleep(max(0.0, next_write - time.monotonic()))
        drain_end = time.monotonic() + 15
        while seen < written and time.monotonic() < drain_end:
            collect()
            wake.sleep(POLL_S)
    finally:
        if wake is not None:
            wake.close()
        stop(proc)
    return written, latencies


@contextlib.contextmanager
def postgres_server() -> Iterator[str | None]:
    """A throw-away PostgreSQL server (etlrouter.testing.postgres); None, saying why, when impossible."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with contextlib.ExitStack() as stack:
        dsn: str | None = None
        try:
            dsn = stack.enter_context(throwaway_postgres(port))
        except PostgresUnavailableError as e:
            print(f"# PostgreSQL rows skipped: {e}")
        yield dsn


def pg(dsn: str, query: str) -> Any:
    """Rows of a query; a query without result rows may hold several statements."""
    import asyncpg  # type: ignore[import-untyped]

    async def run() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            if not query.lstrip().upper().startswith("SELECT"):
                return await conn.execute(query)  # the simple protocol: several statements allowed
            return await conn.fetch(query)
        finally:
            await conn.close()

    return asyncio.run(run())


def pg_pipeline(source_line: str, dsn: str) -> str:
    connector, option, expr = TRANSFORMS["filter"]
    return (
        f"{source_line}\n"
        f"# dev: service step {connector}\n"
        f"# dev: service out postgres --dsn {dsn} --table {PG_TABLE} --mode insert\n"
        f'pipeline bench {{ source src | transform step ({option} = "{expr}") | sink out }}\n'
    )


def pg_throughput(records: int, workdir: Path, dsn: str) -> tuple[float, float, list[float]]:
    """(records/s, seconds, latencies in ms) of generator -> filter -> postgres; the generator's event
    times start when dev starts it, so its latencies include start-up: reported as the max only."""
    pg(dsn, f"DROP TABLE IF EXISTS {PG_TABLE}; DROP TABLE IF EXISTS etlrouter_batches; {PG_DDL}")
    file = workdir / "tp-pg.etl"
    file.write_text(pg_pipeline("# dev: service src generator --seed 1 --record-size 200", dsn))
    data = workdir / "tp-pg"
    proc = dev(data, file, "--limit", str(records), "--timeout", "300")
    try:
        deadline = time.monotonic() + 300
        count, last = 0, 0.0
        while count < records:
            if proc.poll() is not None and proc.returncode != 0:
                raise SystemExit(f"dev exited with {proc.returncode}: see {workdir / 'dev.out'}")
            if time.monotonic() > deadline:
                raise SystemExit(f"only {count} of {records} rows after 300 s")
            count = pg(dsn, f"SELECT count(DISTINCT source_offset) AS n FROM {PG_TABLE}")[0]["n"]
            last = time.time()
            time.sleep(0.05)
        proc.wait(timeout=120)
    finally:
        stop(proc)
    seconds = last - (data / "dev.json").stat().st_mtime
    return records / seconds, seconds, []


def pg_latency(rate: float, seconds: float, workdir: Path, dsn: str) -> list[float]:
    """Latencies (ms, event time -> row committed) of records written at `rate`/s after a 2 s warm-up."""
    pg(dsn, f"DROP TABLE IF EXISTS {PG_TABLE}; DROP TABLE IF EXISTS etlrouter_batches; {PG_DDL}")
    source = workdir / "lat-pg.jsonl"
    source.write_text("")
    file = workdir / "lat-pg.etl"
    follow = f"# dev: service src jsonl_file_source --path {source} --follow --event-time-field ts"
    file.write_text(pg_pipeline(follow, dsn))
    data = workdir / "lat-pg"
    proc = dev(data, file)
    written = 0
    try:
        deadline = time.monotonic() + 60
        while not (data / "dev.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dev did not start: see {workdir / 'dev.out'}")
            time.sleep(0.05)
        warmup_end_ms = int((time.time() + 2) * 1000)
        start = time.monotonic()
        with source.open("a") as out:
            while time.monotonic() < start + 2 + seconds:
                due = int((time.monotonic() - start) * rate)
                while written < due:
                    out.write(json.dumps({"ts": int(time.time() * 1000), "amount": written % 1000}) + "\n")
                    written += 1
                out.flush()
                time.sleep(POLL_S)
        drain_end = time.monotonic() + 15
        while time.monotonic() < drain_end:
            if pg(dsn, f"SELECT count(*) AS n FROM {PG_TABLE}")[0]["n"] >= written:
                break
            time.sleep(0.1)
        rows = pg(
            dsn,
            f"SELECT written_ms - event_time_ms AS ms FROM {PG_TABLE} WHERE event_time_ms >= {warmup_end_ms}",
        )
    finally:
        stop(proc)
    return sorted(float(r["ms"]) for r in rows)


def main() -> None:
    if sys.argv[1:2] == ["bytewax-worker"]:
        bytewax_worker(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000, help="records per throughput run")
    parser.add_argument(
        "--latency-rate", type=float, default=1000.0, help="records/s written in latency runs"
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=10.0, help="measured seconds per latency run"
    )
    parser.add_argument("--transforms", default="filter,map")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL sink rows")
    parser.add_argument("--no-throughput", action="store_true", help="only the latency rows")
    parser.add_argument(
        "--tail-poll", action="store_true", help="tail the sink with 5 ms polls, not inotify (the old way)"
    )
    parser.add_argument("--no-bytewax", action="store_true", help="skip the Bytewax peer row")
    parser.add_argument(
        "--no-connectors", action="store_true", help="skip the kafka -> filter -> s3 / clickhouse rows"
    )
    parser.add_argument("--insecure", action="store_true", help="dev without mutual TLS (plaintext)")
    args = parser.parse_args()
    global INSECURE
    INSECURE = args.insecure
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    print(
        f"# e2e through `etlrouter dev` processes (3 routers, 3 services, 3 sidecars; "
        f"{'plaintext' if INSECURE else 'mutual TLS'}); {cores} cores ({usable} usable); 200 B values"
    )
    head = f"{'pipeline':<44} {'records':>8} {'seconds':>8} {'records/s':>10}"
    print(f"{head} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}")
    with tempfile.TemporaryDirectory(prefix="etlrouter-e2e-") as tmp:
        workdir = Path(tmp)
        rates: dict[str, float] = {}
        for transform in [] if args.no_throughput else args.transforms.split(","):
            rate, seconds = throughput(transform, args.records, workdir)
            rates[transform] = rate
            name = f"generator -> {transform} -> jsonl sink"
            print(
                f"{name:<44} {args.records:>8} {seconds:>8.2f} {rate:>10.0f} {'-':>7} {'-':>7} {'-':>7}",
                flush=True,
            )
        if not args.no_throughput and not args.no_connectors:
            for name, row in connector_rows(args.records, workdir):
                if isinstance(row, str):
                    print(f"{name:<44} {row}", flush=True)
                else:
                    rate, seconds = row
                    dashes = f"{'-':>7} {'-':>7} {'-':>7}"
                    print(f"{name:<44} {args.records:>8} {seconds:>8.2f} {rate:>10.0f} {dashes}", flush=True)
        if not args.no_throughput and not args.no_bytewax:
            peer = bytewax_row(args.records, workdir)
            name = "Bytewax: generator -> filter -> file"
            if isinstance(peer, str):
                print(f"{name:<44} {peer}", flush=True)
            else:
                rate, seconds, cpu = peer
                print(
                    f"{name:<44} {args.records:>8} {seconds:>8.2f} {rate:>10.0f} {'-':>7} {'-':>7} {'-':>7}"
                )
                ours = (
                    f"; ours (filter) reach {rates['filter'] / rate:.0%} of it" if "filter" in rates else ""
                )
                print(f"#   one process, one worker: {cpu:.2f} CPU s per 100k records{ours}", flush=True)
        for transform in args.transforms.split(","):
            _, lat = latency(transform, args.latency_rate, args.latency_seconds, workdir, args.tail_poll)
            lat.sort()
            name = f"jsonl(follow) -> {transform} -> jsonl @ {args.latency_rate:.0f}/s"
            if not lat:
                print(f"{name:<44} no records measured (see {workdir})")
                continue
            per_s = len(lat) / args.latency_seconds
            print(
                f"{name:<44} {len(lat):>8} {args.latency_seconds:>8.2f} {per_s:>10.0f} "
                f"{percentile(lat, 0.5):>7.1f} {percentile(lat, 0.99):>7.1f} {lat[-1]:>7.1f}",
                flush=True,
            )
        if args.no_postgres:
            return
        with postgres_server() as dsn:
            if dsn is None:
                return
            if not args.no_throughput:
                rate, seconds, _ = pg_throughput(args.records, workdir, dsn)
                name = "generator -> filter -> postgres sink"
                print(
                    f"{name:<44} {args.records:>8} {seconds:>8.2f} {rate:>10.0f} {'-':>7} {'-':>7} {'-':>7}",
                    flush=True,
                )
            lat = pg_latency(args.latency_rate, args.latency_seconds, workdir, dsn)
            name = f"jsonl(follow) -> filter -> postgres @ {args.latency_rate:.0f}/s"
            if not lat:
                print(f"{name:<44} no rows measured")
                return
            print(
                f"{name:<44} {len(lat):>8} {args.latency_seconds:>8.2f} "
                f"{len(lat) / args.latency_seconds:>10.0f} "
                f"{percentile(lat, 0.5):>7.1f} {percentile(lat, 0.99):>7.1f} {lat[-1]:>7.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
