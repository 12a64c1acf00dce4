"""The generator source: determinism, offsets, headers, limits, rate, redelivery; and one run as a process."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import msgspec
import pytest

from etlrouter._proto.v1 import records_pb2, services_grpc
from etlrouter.connectors.generator import GeneratorConfig, GeneratorCore, GeneratorSource, make_record
from etlrouter.sdk import Record, records_from_proto, serving
from tests.conftest import free_port
from tests.sdk.grpc_helpers import ack, channel_to, health_status, list_services, pull


async def pull_all(address: str, max_records: int = 7) -> list[tuple[int, list[Record]]]:
    """Every batch until end of stream, as (partition, records)."""
    batches: list[tuple[int, list[Record]]] = []
    async with channel_to(address) as channel:
        for _ in range(1000):
            response = await pull(channel, max_records)
            if response.end_of_stream:
                return batches
            batches.append((response.batch.header.partition, records_from_proto(response.batch.records)))
    raise AssertionError("no end of stream")


async def test_same_seed_same_records_other_seed_other_records() -> None:
    config = GeneratorConfig(seed=42, partitions=3, limit=50, record_size=120)
    async with serving(GeneratorSource(config)) as a, serving(GeneratorSource(config)) as b:
        first, second = await pull_all(a.address, 7), await pull_all(b.address, 11)  # other batch sizes
    async with serving(GeneratorSource(msgspec.structs.replace(config, seed=43))) as c:
        other = await pull_all(c.address, 7)

    def by_partition(batches: list[tuple[int, list[Record]]]) -> dict[int, list[Record]]:
        out: dict[int, list[Record]] = {}
        for partition, records in batches:
            out.setdefault(partition, []).extend(records)
        return out

    assert by_partition(first) == by_partition(second)
    assert by_partition(first) != by_partition(other)
    # The limit is split over the partitions; offsets count from 0 without gaps.
    assert {p: [r.offset for r in rs] for p, rs in by_partition(first).items()} == {
        0: list(range(17)),
        1: list(range(17)),
        2: list(range(16)),
    }


async def test_batch_headers_and_record_contents() -> None:
    config = GeneratorConfig(seed=1, partitions=2, key_space=5, record_size=150, event_time_skew_ms=0)
    async with serving(GeneratorSource(config)) as host, channel_to(host.address) as channel:
        response = await pull(channel, 10, partitions=[1])
    header = response.batch.header
    records = records_from_proto(response.batch.records)
    assert (header.partition, header.first_offset, header.last_offset, header.record_count) == (1, 0, 9, 10)
    assert header.byte_size == response.batch.records.ByteSize()
    times = [r.event_time_ms for r in records]
    assert (header.min_event_time_ms, header.max_event_time_ms) == (min(times), max(times))
    # Global sequence offset * partitions + partition, one ms apart.
    assert times == [config.event_time_start_ms + 2 * n + 1 for n in range(10)]
    for record in records:
        assert len(record.value) == 150
        assert record.key in {b"key-%08d" % k for k in range(5)}
        assert record.headers == {"content-type": "application/json"}
        value = msgspec.json.decode(record.value)
        assert value["partition"] == 1 and value["id"] == 2 * record.offset + 1
        assert value["country"] in {"DE", "FR", "US", "JP", "BR", "IN", "GB", "ES"}


def test_event_time_skew_stays_within_bounds_and_varies() -> None:
    config = GeneratorConfig(seed=3, event_time_skew_ms=50, event_time_step_ms=10)
    skews = [
        config.event_time_start_ms + 10 * n - make_record(config, 0, n).event_time_ms for n in range(200)
    ]
    assert all(0 <= s <= 50 for s in skews)
    assert len(set(skews)) > 10


async def test_max_bytes_limits_the_batch_but_never_below_one_record() -> None:
    config = GeneratorConfig(record_size=1000)
    async with serving(GeneratorSource(config)) as host, channel_to(host.address) as channel:
        small = await pull(channel, 100, max_bytes=3500)
        tiny = await pull(channel, 100, max_bytes=10)
    assert small.batch.header.record_count == 3
    assert tiny.batch.header.record_count == 1
    assert tiny.batch.header.first_offset == 3


def test_rate_limits_records_handed_out() -> None:
    core = GeneratorCore(GeneratorConfig(rate=100), now=0.0)
    assert core.take([], 1000, 0, now=0.0)[1] == []
    _, records = core.take([], 1000, 0, now=0.5)
    assert len(records) == 50
    assert core.seconds_until_token(0.5) == pytest.approx(0.01)
    # An idle period allows at most one second of burst.
    _, burst = core.take([], 1000, 0, now=60.0)
    assert len(burst) == 100


async def test_rate_limited_pull_waits_for_records() -> None:
    async with (
        serving(GeneratorSource(GeneratorConfig(rate=200))) as host,
        channel_to(host.address) as channel,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = 0
        while got < 30:
            got += (await pull(channel, 1000, wait_ms=500)).batch.header.record_count
        elapsed = loop.time() - started
    assert 0.1 <= elapsed < 1.0  # 30 records at 200/s with up to 1 s of initial burst budget ~0.15 s


def test_redelivery_rewinds_to_the_first_unacknowledged_offset() -> None:
    core = GeneratorCore(GeneratorConfig(redeliver_after_ms=1000), now=0.0)
    core.take([], 10, 0, now=0.0)  # offsets 0..9
    assert core.acknowledge(0, 3, now=0.5)
    assert not core.acknowledge(0, 2, now=0.6)  # older acks change nothing
    assert [r.offset for r in core.take([], 5, 0, now=1.2)[1]] == [10, 11, 12, 13, 14]  # ack 0.7 s ago
    assert [r.offset for r in core.take([], 3, 0, now=1.6)[1]] == [4, 5, 6]  # stalled 1.1 s: rewound
    # A late acknowledgement of what was delivered before the rewind is accepted and skips ahead.
    assert core.acknowledge(0, 12, now=1.7)
    assert [r.offset for r in core.take([], 2, 0, now=1.8)[1]] == [13, 14]


def test_acknowledging_what_was_not_delivered_is_refused() -> None:
    from etlrouter.sdk import PermanentError

    core = GeneratorCore(GeneratorConfig(partitions=2))
    core.take([0], 5, 0, now=0.0)
    with pytest.raises(PermanentError, match="up to offset 5 of partition 0, but only offsets below 5"):
        core.acknowledge(0, 5, now=0.0)
    with pytest.raises(PermanentError, match="partition 7 does not exist"):
        core.acknowledge(7, 0, now=0.0)


async def test_state_file_resumes_after_the_last_ack(tmp_path: Path) -> None:
    config = GeneratorConfig(seed=9, limit=30)
    state = tmp_path / "gen.state"
    async with (
        serving(GeneratorSource(config, state_file=state)) as host,
        channel_to(host.address) as channel,
    ):
        first = records_from_proto((await pull(channel, 20)).batch.records)
        await ack(channel, 0, 11)
    async with (
        serving(GeneratorSource(config, state_file=state)) as host,
        channel_to(host.address) as channel,
    ):
        again = records_from_proto((await pull(channel, 5)).batch.records)
    assert [r.offset for r in again] == [12, 13, 14, 15, 16]
    assert again == first[12:17]


async def test_generator_as_a_process_serves_health_reflection_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    command = ["-m", "etlrouter.connectors.generator", "--port", str(port), "--seed", "5", "--limit", "4"]
    log_path = tmp_path / "generator.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(sys.executable, *command, stdout=log, stderr=log)
    try:
        async with channel_to(f"127.0.0.1:{port}") as channel:
            for _ in range(200):  # wait until it listens (importing takes a moment)
                try:
                    assert await health_status(channel) == 1
                    break
                except (ConnectionError, OSError):
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"generator did not start: {log_path.read_text()}")
            names = await list_services(channel)
            stub = services_grpc.SourceServiceStub(channel)
            caps = await stub.GetCapabilities(records_pb2.GetCapabilitiesRequest())
            batch = await pull(channel, 10)
            done = await pull(channel, 10)
        expected = [make_record(GeneratorConfig(seed=5, limit=4), 0, n) for n in range(4)]
        assert records_from_proto(batch.batch.records) == expected
        assert done.end_of_stream
        assert "etlrouter.v1.SourceService" in names
        assert (caps.capabilities.name, caps.capabilities.labels["seed"]) == ("generator", "5")
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0, log_path.read_text()
        assert "draining" in log_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
