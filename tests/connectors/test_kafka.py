"""kafka-source and kafka-sink against a real Kafka-protocol broker (Tansu): mapping, commits of acknowledged
offsets only, a group of replicas splitting the partitions and rebalancing when a third joins."""

from __future__ import annotations

import asyncio
import itertools
import ssl
from pathlib import Path

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter.connectors._kafka import KafkaClientOptions
from etlrouter.connectors.kafka_sink import KafkaSink
from etlrouter.connectors.kafka_source import KafkaSource
from etlrouter.sdk import Record, records_from_proto, serving
from tests.sdk.grpc_helpers import ack, channel_to, pull, write

_topics = itertools.count()


@pytest.fixture
def topic() -> str:
    return f"orders-{next(_topics)}"


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()


async def produce(bootstrap: str, topic: str, n: int, partitions: int, *, one_by_one: bool = False) -> None:
    """n records, record i to partition i % partitions, value {"id": i}; `one_by_one` waits for each
    (Tansu 0.6 answers ListOffsets(latest) with the last batch's base offset + 1, so a test of
    --start latest needs one-record batches)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        futures = []
        for i in range(n):
            future = await producer.send(
                topic,
                msgspec.json.encode({"id": i}),
                key=f"k{i}".encode(),
                partition=i % partitions,
                headers=[("n", str(i).encode()), ("bin", b"\xff")],
                timestamp_ms=1_700_000_000_000 + i,
            )
            if one_by_one:
                await future
            futures.append(future)
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def committed(bootstrap: str, topic: str, group: str, partitions: int) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


def source(bootstrap: str, topic: str, group: str = "", **kw: object) -> KafkaSource:
    """A source in the group `group` of this topic (a group of its own per test)."""
    return KafkaSource(
        KafkaClientOptions(bootstrap), topic, f"{topic}-{group}", session_timeout_ms=3000, **kw
    )  # type: ignore[arg-type]


async def pull_until(channel: Channel, want: int, timeout: float = 20) -> list[tuple[int, Record]]:
    got: list[tuple[int, Record]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while len(got) < want:
        assert asyncio.get_running_loop().time() < deadline, f"only {len(got)} of {want} records arrived"
        reply = await pull(channel, 100, wait_ms=200)
        got += [(reply.batch.header.partition, r) for r in records_from_proto(reply.batch.records)]
    return got


async def test_records_map_key_headers_timestamp_and_only_acknowledged_offsets_are_committed(
    kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, 2)
    await produce(kafka_bootstrap, topic, 10, 2)
    async with serving(source(kafka_bootstrap, topic)) as host, channel_to(host.address) as channel:
        got = await pull_until(channel, 10)
        by_id = {msgspec.json.decode(r.value)["id"]: (p, r) for p, r in got}
        assert sorted(by_id) == list(range(10))
        partition, record = by_id[7]
        assert partition == 1 and record.offset == 3  # 1, 3, 5, 7 went to partition 1
        assert record.key == b"k7"
        assert record.headers == {"n": "7", "bin": "\\xff"}
        assert record.event_time_ms == 1_700_000_000_007
        with pytest.raises(GRPCError) as refused:
            await ack(channel, 0, 5)  # partition 0 holds offsets 0..4 only
        await ack(channel, 0, 2)
        await ack(channel, 1, 4)
        await ack(channel, 1, 1)  # an older cumulative ack does not move the commit back
    assert refused.value.status == Status.FAILED_PRECONDITION
    assert "handed out only up to 4" in str(refused.value.message)
    assert await committed(kafka_bootstrap, topic, f"{topic}-", 2) == {0: 3, 1: 5}


async def test_a_restarted_source_resumes_after_the_last_acknowledged_offset(
    kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, 1)
    await produce(kafka_bootstrap, topic, 6, 1)
    async with serving(source(kafka_bootstrap, topic)) as host, channel_to(host.address) as channel:
        first = await pull_until(channel, 6)
        await ack(channel, 0, 2)
    async with serving(source(kafka_bootstrap, topic)) as host, channel_to(host.address) as channel:
        again = await pull_until(channel, 3)
    assert [r.offset for _, r in first] == list(range(6))
    assert [r.offset for _, r in again] == [3, 4, 5]


async def test_rewind_hands_out_again_everything_after_the_committed_offset(
    kafka_bootstrap: str, topic: str
) -> None:
    from etlrouter._proto.v1 import services_grpc, services_pb2

    await create_topic(kafka_bootstrap, topic, 1)
    await produce(kafka_bootstrap, topic, 5, 1)
    async with serving(source(kafka_bootstrap, topic)) as host, channel_to(host.address) as channel:
        await pull_until(channel, 5)
        await ack(channel, 0, 1)
        request = services_pb2.PullRecordsRequest(max_records=10, wait_ms=2000, rewind=True)
        reply = await services_grpc.SourceServiceStub(channel).PullRecords(request)
    assert [r.offset for r in records_from_proto(reply.batch.records)] == [2, 3, 4]


async def test_latest_skips_what_is_there_and_committed_refuses_a_partition_without_a_commit(
    kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, 1)
    await produce(kafka_bootstrap, topic, 3, 1, one_by_one=True)
    async with (
        serving(source(kafka_bootstrap, topic, "new-latest", start="latest")) as host,
        channel_to(host.address) as channel,
    ):
        service = host.services[0]
        empty = await pull(channel, 100, wait_ms=1000)
        while not service.owned:  # type: ignore[attr-defined]
            await pull(channel, 100, wait_ms=200)
        assert service.consumer is not None  # type: ignore[attr-defined]
        assert await service.consumer.position(TopicPartition(topic, 0)) == 3  # type: ignore[attr-defined]
        await produce(kafka_bootstrap, topic, 2, 1)
        later = await pull_until(channel, 2)
    assert empty.batch.header.record_count == 0
    assert [r.offset for _, r in later] == [3, 4]
    async with (
        serving(source(kafka_bootstrap, topic, "never-committed", start="committed")) as host,
        channel_to(host.address) as channel,
    ):
        with pytest.raises(GRPCError) as refused:
            for _ in range(20):
                await pull(channel, 100, wait_ms=300)
    assert refused.value.status == Status.FAILED_PRECONDITION
    assert "no committed offset" in str(refused.value.message)


class Replica:
    """One source replica pulling and acknowledging everything it gets, as its sidecar would."""

    def __init__(self, name: str, channel: Channel) -> None:
        self.name, self.channel = name, channel
        self.seen: list[tuple[int, int, int]] = []  # (partition, offset, id)
        self.partitions: set[int] = set()

    async def step(self) -> None:
        reply = await pull(self.channel, 200, wait_ms=100)
        records = records_from_proto(reply.batch.records)
        if not records:
            return
        partition = reply.batch.header.partition
        self.partitions.add(partition)
        self.seen += [(partition, r.offset, msgspec.json.decode(r.value)["id"]) for r in records]
        await ack(self.channel, partition, records[-1].offset)


async def run(replicas: list[Replica], until: object, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not until():  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.gather(*(r.step() for r in replicas))


async def test_two_replicas_split_the_partitions_and_a_third_joining_rebalances_without_loss(
    kafka_bootstrap: str, topic: str
) -> None:
    partitions, total = 6, 30_000
    await create_topic(kafka_bootstrap, topic, partitions)
    await produce(kafka_bootstrap, topic, total, partitions)
    async with (
        serving(source(kafka_bootstrap, topic, "pair")) as a_host,
        serving(source(kafka_bootstrap, topic, "pair")) as b_host,
        channel_to(a_host.address) as a_channel,
        channel_to(b_host.address) as b_channel,
    ):
        a, b = Replica("a", a_channel), Replica("b", b_channel)
        sources = (a_host.services[0], b_host.services[0])
        # Until the group settled with both members, each owning some partitions.
        await run([a, b], lambda: all(s.owned for s in sources) and len(a.seen) + len(b.seen) > 6000)  # type: ignore[attr-defined]
        owned_a, owned_b = set(sources[0].owned), set(sources[1].owned)  # type: ignore[attr-defined]
        assert owned_a.isdisjoint(owned_b) and owned_a | owned_b == set(range(partitions))
        before = len(a.seen) + len(b.seen)
        async with (
            serving(source(kafka_bootstrap, topic, "pair")) as c_host,
            channel_to(c_host.address) as c_channel,
        ):
            c = Replica("c", c_channel)
            everyone = (*sources, c_host.services[0])

            def settled_and_done() -> bool:
                ids = {i for r in (a, b, c) for _, _, i in r.seen}
                return bool(c.seen) and len(ids) == total

            await run([a, b, c], settled_and_done)
            owned = [set(s.owned) for s in everyone]  # type: ignore[attr-defined]
    assert before < total, "the third replica joined only after everything was read"
    assert all(owned), owned  # three members, each with its share of six partitions
    assert set().union(*owned) == set(range(partitions)) and sum(map(len, owned)) == partitions
    seen = a.seen + b.seen + c.seen
    assert {i for _, _, i in seen} == set(range(total))  # nothing lost
    # Each (partition, offset) is the same record wherever it was read (duplicates only across a move).
    assert len({(p, o) for p, o, _ in seen}) == total
    final = await committed(kafka_bootstrap, topic, f"{topic}-pair", partitions)
    assert final == {p: total // partitions for p in range(partitions)}


async def test_sink_writes_records_back_with_the_same_mapping_after_the_broker_acknowledged(
    kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, 3)
    sink = KafkaSink(KafkaClientOptions(kafka_bootstrap), topic, idempotent=False)  # Tansu: no InitProducerId
    records = [
        Record(b"k1", b'{"id":1}', {"h": "x"}, 1_700_000_000_001, 10),
        Record(b"", b"keyless", {}, 0, 11),
    ]
    async with serving(sink) as host, channel_to(host.address) as channel:
        reply = await write(channel, "b-1", records)
        # Answered after the broker acknowledged: a consumer sees them at once.
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
        await consumer.start()
        try:
            got = []
            while len(got) < 2:
                batches = await consumer.getmany(timeout_ms=2000)
                assert batches, "the records were not in the topic"
                got += [m for ms in batches.values() for m in ms]
        finally:
            await consumer.stop()
    assert reply.written == 2 and not reply.errors
    by_value = {m.value: m for m in got}
    first, keyless = by_value[b'{"id":1}'], by_value[b"keyless"]
    assert (first.key, list(first.headers), first.timestamp) == (b"k1", [("h", b"x")], 1_700_000_000_001)
    assert keyless.key is None and keyless.headers == ()
    assert keyless.timestamp > 1_700_000_000_001  # the broker's (producer's) clock, not 0


async def test_sink_rejects_a_record_the_broker_refuses_and_writes_the_rest(
    kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, 1)
    sink = KafkaSink(KafkaClientOptions(kafka_bootstrap), topic, idempotent=False, max_request_size=4096)
    records = [Record(b"a", b"small", {}, 0, 1), Record(b"b", b"x" * 10_000, {}, 0, 2)]
    async with serving(sink) as host, channel_to(host.address) as channel:
        reply = await write(channel, "b-2", records)
    assert reply.written == 1
    assert [(e.index, e.error_class) for e in reply.errors] == [(1, 3)]  # ERROR_CLASS_REJECTED
    assert "MessageSizeTooLarge" in reply.errors[0].message


async def test_an_unreachable_broker_fails_pulls_as_retryable_naming_the_servers() -> None:
    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    down = KafkaSource(KafkaClientOptions(address), "t", "g")
    async with serving(down) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as failed:
            for _ in range(20):
                await pull(channel, 10, wait_ms=500)
    assert failed.value.status == Status.UNAVAILABLE
    assert address in str(failed.value.message)


async def test_acks_for_a_partition_that_moved_away_are_abandoned_and_its_new_owner_reads_them_again(
    kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, 2)
    await produce(kafka_bootstrap, topic, 20, 2)
    group = f"{topic}-move"
    async with (
        serving(source(kafka_bootstrap, topic, "move")) as a_host,
        channel_to(a_host.address) as a_channel,
    ):
        a_source = a_host.services[0]
        got = await pull_until(a_channel, 20)  # A owns both partitions and hands out everything, acks nothing
        last = {p: max(r.offset for q, r in got if q == p) for p in (0, 1)}
        async with (
            serving(source(kafka_bootstrap, topic, "move")) as b_host,
            channel_to(b_host.address) as b_channel,
        ):
            b_source = b_host.services[0]
            again: list[tuple[int, Record]] = []
            while not (len(a_source.owned) == 1 and len(b_source.owned) == 1):  # type: ignore[attr-defined]
                _, b_reply = await asyncio.gather(
                    pull(a_channel, 10, wait_ms=200), pull(b_channel, 10, wait_ms=200)
                )
                again += [
                    (b_reply.batch.header.partition, r) for r in records_from_proto(b_reply.batch.records)
                ]
            kept = next(iter(a_source.owned))  # type: ignore[attr-defined]
            moved = 1 - kept
            for p in (0, 1):
                await ack(a_channel, p, last[p])  # the moved partition's ack is abandoned, not committed
            offsets = await committed(kafka_bootstrap, topic, group, 2)
            again += await pull_until(b_channel, 10 - len(again))
    assert offsets == {kept: last[kept] + 1, moved: None}
    assert sorted(r.offset for p, r in again if p == moved) == list(range(10))  # the new owner reads them


def test_sasl_and_tls_options_pass_through_and_bad_combinations_name_the_option(tmp_path: Path) -> None:
    sasl = KafkaClientOptions(
        "b:9093",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="etl",
        sasl_password="secret",
    ).kwargs()
    assert sasl["security_protocol"] == "SASL_PLAINTEXT"
    assert (sasl["sasl_mechanism"], sasl["sasl_plain_username"], sasl["sasl_plain_password"]) == (
        "SCRAM-SHA-512",
        "etl",
        "secret",
    )
    tls = KafkaClientOptions("b:9093", security_protocol="SSL").kwargs()
    assert isinstance(tls["ssl_context"], ssl.SSLContext)
    for kwargs, option in [
        ({"security_protocol": "SASL_SSL"}, "--sasl-username"),
        ({"sasl_username": "u"}, "--sasl-mechanism/--sasl-username"),
        ({"security_protocol": "SSL", "tls_cert_file": str(tmp_path / "c.pem")}, "--tls-key-file"),
        ({"tls_ca_file": str(tmp_path / "ca.pem")}, "--tls-"),
    ]:
        with pytest.raises(ValueError, match=option):
            KafkaClientOptions("b:9093", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--bootstrap-servers"):
        KafkaClientOptions(" ")
