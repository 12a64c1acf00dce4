"""The new connectors in the whole system (3 routers, a sidecar per role, every service its own process),
each service killed with SIGKILL mid-run and restarted on the same port: nothing is lost.

- kafka-source → filter → jsonl-file sink: the source is killed; every produced record reaches the file and
  the group's committed offsets end at the end of every partition.
- nats-source → filter → jsonl-file sink: the same for a JetStream durable consumer.
- generator → filter → s3, clickhouse, nats-sink, kafka-sink (one merged DAG): the four sinks are killed
  together; afterwards every store holds every record, and no retried batch was written twice: one S3
  object per batch id (a retry overwrote its own object), one ClickHouse row per (batch id, offset)
  (batch-id column), one JetStream message per message id. (Batches cut anew under new ids, when the
  control plane restarts the source's stage while the sinks are gone, are at-least-once by design.)
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from aiokafka import AIOKafkaConsumer, TopicPartition
from nats.js.api import AckPolicy, ConsumerConfig

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from tests.connectors import servers
from tests.connectors.servers import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.connectors.test_kafka import create_topic, produce
from tests.e2e.conftest import system
from tests.e2e.processes import Processes, connector, ready, sidecar, wait_until
from tests.integration.cluster import RouterProcesses

__all__ = ["system"]

TOTAL = 100_000  # records per test
System = tuple[RouterProcesses, Processes, Path]


def jsonl_ids(path: Path) -> list[int]:
    """The `id` of every record value the jsonl-file sink wrote (complete lines only)."""
    if not path.exists():
        return []
    complete = path.read_text().split("\n")[:-1]
    return [msgspec.json.decode(json.loads(line)["value"])["id"] for line in complete if line.strip()]


def line_count(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def apply(routers: RouterProcesses, text: str, timeout_s: float = 30) -> None:
    """Apply pipelines once every service they name is registered (a connector importing a big client
    library, botocore say, may be discovered a scan or two after its sidecar is ready)."""

    async def go() -> list[str]:
        client = RouterClient(routers.addresses, timeout=20)
        try:
            reply = await client.call(
                admin_grpc.PipelineAdminStub,
                "ApplyPipelines",
                admin_pb2.ApplyPipelinesRequest(definition=text, filename="kill9.etl"),
                write=True,
            )
            return [d.message for d in reply.diagnostics]
        finally:
            client.close()

    deadline = time.monotonic() + timeout_s
    while problems := asyncio.run(go()):
        if time.monotonic() > deadline or not all(p.startswith("unknown ") for p in problems):
            raise AssertionError(problems)
        time.sleep(0.5)


def start_linear(routers: RouterProcesses, procs: Processes, tmp: Path, kind: str, *source_args: str) -> Path:
    """`source orders | transform clean | sink archive` with the given source connector; returns the file."""
    out = tmp / "out.jsonl"
    src = connector(procs, "orders", kind, *source_args)
    mid = connector(procs, "clean", "filter")
    sink = connector(procs, "archive", "jsonl_file_sink", "--path", str(out))
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [sink]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(
        routers, 'pipeline linear { source orders | transform clean (config.expr = "true") | sink archive }'
    )
    return out


def kill_and_restart(procs: Processes, *names: str, pause_s: float = 1.0) -> None:
    for name in names:
        procs.kill(name)
    time.sleep(pause_s)
    for name in names:
        procs.restart(name)


def assert_clean_logs(procs: Processes, *names: str) -> None:
    """No traceback in any log, but grpclib's report of a call its client gave up on (the sidecar's timeout
    on a slow machine): the service's answer then finds the stream reset."""
    for name in names:
        lines = [line for line in procs.log(name).splitlines() if "Failed to handle cancellation" not in line]
        assert not [line for line in lines if "Traceback" in line], procs.log(name)[-3000:]


def test_kafka_source_killed_mid_run_loses_nothing(kafka_bootstrap: str, system: System) -> None:
    routers, procs, tmp = system
    topic, group, partitions = "kill9-orders", "kill9", 4
    asyncio.run(create_topic(kafka_bootstrap, topic, partitions))
    asyncio.run(produce(kafka_bootstrap, topic, TOTAL, partitions))
    args = ("--bootstrap-servers", kafka_bootstrap, "--topic", topic, "--group", group)
    out = start_linear(routers, procs, tmp, "kafka_source", *args, "--session-timeout-ms", "6000")

    async def committed() -> int:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        try:
            return sum([await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)])
        finally:
            await consumer.stop()

    wait_until(lambda: line_count(out) > TOTAL // 10, 90, "records arriving")
    at_kill = line_count(out)
    kill_and_restart(procs, "orders")
    wait_until(lambda: asyncio.run(committed()) == TOTAL, 180, "every offset committed")
    ids = jsonl_ids(out)
    print(f"kafka source: lines at kill {at_kill}, lines {len(ids)}, distinct {len(set(ids))}")
    assert at_kill < TOTAL, "killed only after everything was written: not mid-run"
    assert set(ids) == set(range(TOTAL))
    assert_clean_logs(procs, "sc-src", "sc-mid", "sc-sink", "orders")


def test_nats_source_killed_mid_run_loses_nothing(nats_url: str, system: System) -> None:
    routers, procs, tmp = system
    stream = "KILL9"

    async def fill() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream(publish_async_max_pending=10_000)
        await js.add_stream(name=stream, subjects=["kill9.>"])
        for start in range(0, TOTAL, 5000):
            futures = [
                await js.publish_async("kill9.orders", msgspec.json.encode({"id": i}))
                for i in range(start, min(TOTAL, start + 5000))
            ]
            await asyncio.gather(*futures)
        await nc.close()

    async def ack_floor() -> int:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().consumer_info(stream, "etl")
            return int(info.ack_floor.stream_seq)
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    asyncio.run(fill())
    out = start_linear(
        routers, procs, tmp, "nats_source", "--url", nats_url, "--stream", stream, "--durable", "etl"
    )
    wait_until(lambda: line_count(out) > TOTAL // 10, 90, "records arriving")
    at_kill = line_count(out)
    kill_and_restart(procs, "orders")
    wait_until(lambda: asyncio.run(ack_floor()) == TOTAL, 180, "every message acknowledged")
    ids = jsonl_ids(out)
    print(f"nats source: lines at kill {at_kill}, lines {len(ids)}, distinct {len(set(ids))}")
    assert at_kill < TOTAL, "killed only after everything was written: not mid-run"
    assert set(ids) == set(range(TOTAL))
    assert_clean_logs(procs, "sc-src", "sc-mid", "sc-sink", "orders")


SINK_PIPELINES = "\n".join(
    f'pipeline to-{sink} {{ source orders | transform clean (config.expr = "true") | sink {sink} }}'
    for sink in ("lake", "olap", "bus", "topic")
)


def test_sinks_killed_mid_run_lose_nothing_and_the_idempotent_ones_duplicate_nothing(
    kafka_bootstrap: str, nats_url: str, clickhouse_url: str, s3_endpoint: str, system: System
) -> None:
    routers, procs, tmp = system
    bucket, table, stream, topic = "kill9", "kill9_orders", "KILL9OUT", "kill9-out"

    def s3_client() -> Any:
        return servers.s3_client(s3_endpoint)

    async def clickhouse(sql: str) -> str:
        return await servers.clickhouse_query(clickhouse_url, sql)

    async def prepare() -> None:
        async with s3_client() as s3:
            await s3.create_bucket(Bucket=bucket)
        await clickhouse(
            f"CREATE TABLE {table} (id UInt64, partition UInt32, amount Float64, country String, pad String, "
            "_batch String, _offset UInt64) ENGINE = MergeTree ORDER BY id"
        )
        nc = await nats.connect(nats_url)
        await nc.jetstream().add_stream(name=stream, subjects=["kill9out.>"])
        await nc.close()
        await create_topic(kafka_bootstrap, topic, 2)

    asyncio.run(prepare())
    state = tmp / "generator.state"
    src = connector(
        procs, "orders", "generator", "--limit", str(TOTAL), "--rate", "8000", "--state-file", str(state)
    )
    mid = connector(procs, "clean", "filter")
    s3_args = ("--bucket", bucket, "--endpoint-url", s3_endpoint, "--path-style", "--gzip")
    s3_args += ("--access-key-id", S3_ACCESS_KEY, "--secret-access-key", S3_SECRET_KEY)
    sinks = [
        connector(procs, "lake", "s3", *s3_args),
        connector(
            procs,
            "olap",
            "clickhouse",
            "--url",
            clickhouse_url,
            "--table",
            table,
            "--batch-id-column",
            "_batch",
            "--offset-column",
            "_offset",
        ),
        connector(
            procs, "bus", "nats_sink", "--url", nats_url, "--subject", "kill9out.orders", "--stream", stream
        ),
        connector(
            procs,
            "topic",
            "kafka_sink",
            "--bootstrap-servers",
            kafka_bootstrap,
            "--topic",
            topic,
            "--no-idempotent",
        ),
    ]
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, sinks),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, SINK_PIPELINES)

    def acked() -> int:
        try:
            return int(json.loads(state.read_text()).get("0", -1))
        except (OSError, ValueError):
            return -1

    started = time.monotonic()
    wait_until(lambda: acked() > TOTAL // 10, 90, "records acknowledged")
    at_kill = acked()
    killed = time.monotonic()
    kill_and_restart(procs, "lake", "olap", "bus", "topic")
    wait_until(lambda: acked() == TOTAL - 1, 240, "the source acknowledged every record")
    done = time.monotonic()

    async def s3_lines() -> list[tuple[str, str, int]]:
        """(object key, batch id, offset) of every line of every object."""
        import gzip

        lines: list[tuple[str, str, int]] = []
        async with s3_client() as s3:
            paginator = s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=bucket):
                for item in page.get("Contents", []):
                    response = await s3.get_object(Bucket=bucket, Key=item["Key"])
                    async with response["Body"] as body:
                        data = gzip.decompress(await body.read())
                    for line in data.splitlines():
                        record = msgspec.json.decode(line)
                        lines.append((item["Key"], record["batch_id"], record["offset"]))
        return lines

    async def nats_ids() -> tuple[int, set[int], set[str]]:
        """Messages stored, the record ids among them, their distinct Nats-Msg-Id headers."""
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        messages = (await js.stream_info(stream)).state.messages
        config = ConsumerConfig(ack_policy=AckPolicy.NONE)  # read only: nothing to acknowledge
        sub = await js.pull_subscribe("kill9out.>", stream=stream, config=config)
        ids: set[int] = set()
        msg_ids: set[str] = set()
        read = 0
        while read < messages:
            try:
                batch = await sub.fetch(5000, timeout=5)
            except nats.errors.TimeoutError:
                break
            read += len(batch)
            for msg in batch:
                ids.add(msgspec.json.decode(msg.data)["id"])
                msg_ids.add((msg.headers or {}).get("Nats-Msg-Id", ""))
        await nc.close()
        return messages, ids, msg_ids

    async def kafka_ids() -> set[int]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        ids: set[int] = set()
        try:
            while len(ids) < TOTAL:
                batches = await consumer.getmany(timeout_ms=5000, max_records=10_000)
                if not batches:
                    break  # the topic holds no more: the assertion below names what is missing
                ids.update(msgspec.json.decode(m.value)["id"] for ms in batches.values() for m in ms)
        finally:
            await consumer.stop()
        return ids

    print(f"sinks: {killed - started:.1f} s to the kill, {done - killed:.1f} s from the kill to the last ack")
    lines = asyncio.run(s3_lines())
    rows = msgspec.json.decode(
        asyncio.run(
            clickhouse(
                f"SELECT count() AS n, uniqExact(_offset) AS offsets, uniqExact(_batch, _offset) AS pairs "
                f"FROM {table} FORMAT JSON"
            )
        )
    )["data"][0]
    stored, bus_ids, msg_ids = asyncio.run(nats_ids())
    topic_ids = asyncio.run(kafka_ids())
    objects_of_batch: dict[str, set[str]] = {}
    for key, batch_id, _ in lines:
        objects_of_batch.setdefault(batch_id, set()).add(key)
    offsets = [offset for _, _, offset in lines]
    # A sink retry repeats a batch id, which the idempotent sinks absorb. A source rewound by a new session
    # of its stage (the control plane re-placing the DAG while the sinks were gone) cuts its batches anew,
    # under new ids: those copies are at-least-once by design and only counted here.
    print(
        f"sinks: acked at kill {at_kill}; s3 {len(objects_of_batch)} objects, {len(lines)} lines, "
        f"{len(set(offsets))} offsets; clickhouse {rows}; nats {stored} stored, {len(msg_ids)} message ids, "
        f"{len(bus_ids)} records; kafka {len(topic_ids)} records"
    )
    assert at_kill < TOTAL - 1, "killed only after everything was acknowledged: not mid-run"
    # Nothing lost anywhere.
    assert set(offsets) == set(range(TOTAL))
    assert int(rows["offsets"]) == TOTAL
    assert bus_ids == set(range(TOTAL))
    assert topic_ids == set(range(TOTAL))
    # No retried batch written twice: one S3 object per batch id, each line once in it; one ClickHouse row
    # per (batch id, offset); one JetStream message per message id.
    assert all(len(keys) == 1 for keys in objects_of_batch.values())
    assert len(lines) == len({(batch_id, offset) for _, batch_id, offset in lines})
    assert int(rows["n"]) == int(rows["pairs"])
    assert stored == len(msg_ids)
    assert_clean_logs(procs, "sc-src", "sc-mid", "sc-sink", "lake", "olap", "bus", "topic")
