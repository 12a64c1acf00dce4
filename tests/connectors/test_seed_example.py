"""examples/seed.etl end to end: Kafka → filter → S3 and ClickHouse with one shared source and filter stage,
against real servers (Tansu, SeaweedFS, ClickHouse) and the whole system (3 routers, a sidecar per service).

The services are the file's own `# dev: service` lines, with the servers' addresses of this test put in
place of the file's defaults. The cluster's explain shows the merge; every valid order reaches both stores,
every invalid one neither."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaProducer

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import RouterClient
from etlrouter.dev.spec import parse_services
from tests.conftest import ROOT
from tests.connectors import servers
from tests.connectors.servers import S3_ACCESS_KEY, S3_SECRET_KEY
from tests.connectors.test_kafka import create_topic
from tests.connectors.test_kill9 import apply
from tests.e2e.conftest import system
from tests.e2e.processes import Processes, connector, ready, sidecar, wait_until
from tests.integration.cluster import RouterProcesses

__all__ = ["system"]

SEED = ROOT / "examples" / "seed.etl"
TOTAL = 20_000  # orders; every tenth has a negative amount and is filtered out


def test_the_seed_example_fills_s3_and_clickhouse_through_one_shared_source_and_filter(
    kafka_bootstrap: str,
    s3_endpoint: str,
    clickhouse_url: str,
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, _ = system
    text = SEED.read_text()
    defaults = {
        "127.0.0.1:9092": kafka_bootstrap,
        "http://127.0.0.1:8333": s3_endpoint,
        "http://127.0.0.1:8123": clickhouse_url,
    }
    services = parse_services(text, "seed.etl")
    assert [(s.name, s.connector) for s in services] == [
        ("orders", "kafka_source"),
        ("valid-orders", "filter"),
        ("lake", "s3"),
        ("olap", "clickhouse"),
    ]

    def s3_client() -> Any:
        return servers.s3_client(s3_endpoint)

    async def clickhouse(sql: str) -> str:
        return await servers.clickhouse_query(clickhouse_url, sql)

    async def prepare() -> None:
        async with s3_client() as s3:
            await s3.create_bucket(Bucket="seed")
        await clickhouse(
            "CREATE TABLE orders (id UInt64, amount Float64, country String, _batch String, _offset UInt64) "
            "ENGINE = MergeTree ORDER BY id"
        )
        await create_topic(kafka_bootstrap, "orders", 3)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            futures = []
            for i in range(TOTAL):
                order = {"id": i, "amount": -1.0 if i % 10 == 0 else i / 100, "country": "DE"}
                futures.append(
                    await producer.send("orders", msgspec.json.encode(order), key=f"u{i % 97}".encode())
                )
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    asyncio.run(prepare())
    env_keys = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
    ports = {}
    for service in services:
        args = [defaults.get(a, a) for a in service.args]
        if service.connector == "s3":
            args += [
                "--access-key-id",
                env_keys["AWS_ACCESS_KEY_ID"],
                "--secret-access-key",
                env_keys["AWS_SECRET_ACCESS_KEY"],
            ]
        ports[service.name] = connector(procs, service.name, service.connector, *args)
    http = [sidecar(procs, f"sc-{name}", routers, [port]) for name, port in ports.items()]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, text)

    async def explain() -> admin_pb2.ExplainPipelinesResponse:
        client = RouterClient(routers.addresses, timeout=20)
        try:
            return await client.call(  # type: ignore[no-any-return]
                admin_grpc.PipelineAdminStub, "ExplainPipelines", admin_pb2.ExplainPipelinesRequest()
            )
        finally:
            client.close()

    plan = asyncio.run(explain())
    assert "2 pipelines, 4 stages (6 if run separately)" in plan.rendered, plan.rendered
    assert len(plan.dags) == 1
    shared = [s for s in plan.dags[0].stages if len(s.pipelines) == 2]
    assert sorted(s.service for s in shared) == ["orders", "valid-orders"]

    valid = {i for i in range(TOTAL) if i % 10 != 0}

    async def s3_ids() -> list[int]:
        ids: list[int] = []
        async with s3_client() as s3:
            async for page in s3.get_paginator("list_objects_v2").paginate(Bucket="seed", Prefix="orders/"):
                for item in page.get("Contents", []):
                    response = await s3.get_object(Bucket="seed", Key=item["Key"])
                    async with response["Body"] as body:
                        data = gzip.decompress(await body.read())
                    ids += [
                        msgspec.json.decode(msgspec.json.decode(line)["value"])["id"]
                        for line in data.splitlines()
                    ]
        return ids

    def clickhouse_count() -> int:
        return int(asyncio.run(clickhouse("SELECT count() FROM orders")))

    wait_until(lambda: clickhouse_count() >= len(valid), 120, "every valid order in ClickHouse")
    wait_until(lambda: len(set(asyncio.run(s3_ids()))) >= len(valid), 60, "every valid order in S3")
    in_s3 = asyncio.run(s3_ids())
    rows = msgspec.json.decode(
        asyncio.run(clickhouse("SELECT groupArray(id) AS ids, count() AS n FROM orders FORMAT JSON"))
    )["data"][0]
    assert sorted(in_s3) == sorted(valid)
    assert sorted(int(i) for i in rows["ids"]) == sorted(valid) and int(rows["n"]) == len(valid)
    for name in ports:
        assert "Traceback" not in procs.log(f"sc-{name}"), procs.log(f"sc-{name}")[-3000:]
