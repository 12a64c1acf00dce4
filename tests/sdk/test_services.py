"""SDK services over real gRPC on loopback: behaviour, capabilities, error mapping, health, reflection."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import msgspec
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import records_pb2, services_grpc, services_pb2
from etlrouter.sdk import (
    Capabilities,
    ErrorClass,
    Lookup,
    LookupResult,
    OptionsError,
    PermanentError,
    Processed,
    Pulled,
    Record,
    RecordError,
    RecordTransform,
    RejectedError,
    RetryableError,
    Sink,
    Source,
    Transform,
    Written,
    WrittenBatches,
    serving,
)
from tests.sdk.grpc_helpers import ack, channel_to, health_status, list_services, process, pull, write


class CountingSource(Source):
    """Partition p yields offsets 0..limit-1 with event time 1000 + offset."""

    capabilities = Capabilities(name="counting", version="1.2", partitions=2, max_batch_records=50)

    def __init__(self, limit: int = 10) -> None:
        self.limit = limit
        self.next_offset = {0: 0, 1: 0}
        self.acked: dict[int, int] = {}

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        partition = partitions[0] if partitions else 0
        start = self.next_offset[partition]
        if start >= self.limit:
            return Pulled(partition=partition, end_of_stream=True)
        end = min(self.limit, start + max_records)
        self.next_offset[partition] = end
        records = [Record(b"k", b"v%d" % o, {}, 1000 + o, o) for o in range(start, end)]
        return Pulled(records, partition)

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        self.acked[partition] = up_to_offset


async def test_source_fills_the_batch_header_and_receives_acks() -> None:
    source = CountingSource(limit=10)
    async with serving(source) as host, channel_to(host.address) as channel:
        first = await pull(channel, 4, partitions=[1])
        header = first.batch.header
        assert (header.partition, header.first_offset, header.last_offset) == (1, 0, 3)
        assert (header.min_event_time_ms, header.max_event_time_ms) == (1000, 1003)
        assert header.record_count == len(first.batch.records.records) == 4
        assert header.byte_size == first.batch.records.ByteSize()
        assert not first.end_of_stream
        rest = await pull(channel, 0, partitions=[1])  # 0 = no limit: the source's max_batch_records
        assert rest.batch.header.first_offset == 4 and rest.batch.header.last_offset == 9
        done = await pull(channel, 5, partitions=[1])
        assert done.end_of_stream and done.batch.header.record_count == 0
        await ack(channel, 1, 9)
        assert source.acked == {1: 9}


async def test_source_returning_more_than_max_records_is_an_internal_error() -> None:
    class Greedy(CountingSource):
        async def pull(
            self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
        ) -> Pulled:
            return Pulled([Record(offset=o) for o in range(max_records + 1)])

    async with serving(Greedy()) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as err:
            await pull(channel, 3)
    assert err.value.status == Status.INTERNAL
    assert "returned 4 records, more than max_records=3" in str(err.value.message)


class Doubler(RecordTransform):
    """value -> value * 2; value b"bad" is a permanent error, b"drop" is dropped, b"two" is split."""

    capabilities = Capabilities(name="doubler", one_to_one=False)

    def transform(self, record: Record, options: Mapping[str, str]) -> Record | list[Record] | None:
        if record.value == b"bad":
            raise PermanentError(f"cannot double {record.value!r}")
        if record.value == b"drop":
            return None
        if record.value == b"two":
            return [record, record]
        suffix = options.get("suffix", "").encode()
        return msgspec.structs.replace(record, value=record.value * 2 + suffix)


async def test_record_transform_outputs_drops_splits_and_reports_errors_by_index() -> None:
    inputs = [Record(b"a", b"x", offset=0), Record(value=b"bad", offset=1), Record(value=b"drop", offset=2)]
    inputs += [Record(value=b"two", headers={"h": "v"}, offset=3)]
    async with serving(Doubler()) as host, channel_to(host.address) as channel:
        output, errors = await process(channel, inputs, {"suffix": "!"})
    assert output == [Record(b"a", b"xx!", offset=0), inputs[3], inputs[3]]
    assert [(e.index, e.error_class, e.message) for e in errors] == [
        (1, records_pb2.ERROR_CLASS_PERMANENT, "cannot double b'bad'")
    ]


class Raising(Transform):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "status", "message"),
    [
        (RetryableError("database is down"), Status.UNAVAILABLE, "ProcessBatch: database is down"),
        (OptionsError("options.expr: bad"), Status.INVALID_ARGUMENT, "ProcessBatch: options.expr: bad"),
        (KeyError("amount"), Status.INTERNAL, "ProcessBatch: KeyError: 'amount'"),
        (GRPCError(Status.RESOURCE_EXHAUSTED, "slow down"), Status.RESOURCE_EXHAUSTED, "slow down"),
    ],
)
async def test_exceptions_map_to_grpc_statuses(exc: Exception, status: Status, message: str) -> None:
    async with serving(Raising(exc)) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as err:
            await process(channel, [Record(value=b"x")])
    assert err.value.status == status
    assert err.value.message == message


async def test_batch_level_permanent_error_fails_every_record() -> None:
    async with (
        serving(Raising(RejectedError("schema v3 expected"))) as host,
        channel_to(host.address) as channel,
    ):
        output, errors = await process(channel, [Record(offset=0), Record(offset=1)])
    assert output == []
    assert [(e.index, e.error_class, e.message) for e in errors] == [
        (0, records_pb2.ERROR_CLASS_REJECTED, "schema v3 expected"),
        (1, records_pb2.ERROR_CLASS_REJECTED, "schema v3 expected"),
    ]


async def test_error_index_outside_the_batch_is_internal() -> None:
    class WrongIndex(Transform):
        async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
            return Processed([], [RecordError(len(records), ErrorClass.PERMANENT, "x")])

    async with serving(WrongIndex()) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as err:
            await process(channel, [Record()])
    assert err.value.status == Status.INTERNAL
    assert "record index 1, but the batch has 1 records" in str(err.value.message)


class Keeping(Transform):
    """Passes records on by index (Processed.kept); first changes one in place, which must not show."""

    def __init__(self, kept: list[int], records: list[Record] | None = None) -> None:
        self.kept = kept
        self.records = records or []

    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        records[0].value = b"changed in place"
        return Processed(self.records, [RecordError(1, ErrorClass.PERMANENT, "no")], kept=self.kept)


@pytest.mark.parametrize("kept", [[0, 2, 3], [3, 0, 0]])
async def test_kept_records_go_on_as_they_came_in_the_order_given(kept: list[int]) -> None:
    inputs = [Record(b"k%d" % i, b"v%d" % i, {"h": str(i)}, 1000 + i, i) for i in range(4)]
    async with serving(Keeping(kept)) as host, channel_to(host.address) as channel:
        output, errors = await process(channel, inputs)
    assert output == [inputs[i] for i in kept]  # grpc_helpers checks record_count too
    assert [e.index for e in errors] == [1]


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (Keeping([0, 4]), "kept record index 4, but the batch has 4 records"),
        (Keeping([-1]), "kept record index -1, but the batch has 4 records"),
        (Keeping([0], [Record()]), "returned 1 records and 1 kept indexes"),
    ],
)
async def test_kept_indexes_that_cannot_be_right_are_internal(transform: Transform, message: str) -> None:
    async with serving(transform) as host, channel_to(host.address) as channel:
        with pytest.raises(GRPCError) as err:
            await process(channel, [Record(offset=i) for i in range(4)])
    assert err.value.status == Status.INTERNAL
    assert message in str(err.value.message)


class MemorySink(Sink):
    capabilities = Capabilities(name="memory", idempotent_writes=True, requires_flush=True)

    def __init__(self) -> None:
        self.rows: list[bytes] = []
        self.written = WrittenBatches()
        self.flushes = 0
        self.closed = False

    async def write(self, batch_id: str, records: list[Record], options: Mapping[str, str]) -> Written | None:
        if batch_id in self.written:
            return Written(len(records))
        errors = [
            RecordError(i, ErrorClass.REJECTED, "empty value") for i, r in enumerate(records) if not r.value
        ]
        self.rows += [r.value for r in records if r.value]
        self.written.add(batch_id)
        return Written(len(records) - len(errors), errors)

    async def flush(self) -> None:
        self.flushes += 1

    async def close(self) -> None:
        self.closed = True


async def test_sink_write_is_idempotent_by_batch_id_and_reports_rejects() -> None:
    sink = MemorySink()
    records = [Record(value=b"a"), Record(value=b""), Record(value=b"c")]
    async with serving(sink) as host, channel_to(host.address) as channel:
        first = await write(channel, "batch-1", records)
        retry = await write(channel, "batch-1", records)
        await services_grpc.SinkServiceStub(channel).Flush(services_pb2.FlushRequest())
        caps = await services_grpc.SinkServiceStub(channel).GetCapabilities(
            records_pb2.GetCapabilitiesRequest()
        )
    assert first.written == 2
    assert [(e.index, e.error_class) for e in first.errors] == [(1, records_pb2.ERROR_CLASS_REJECTED)]
    assert retry.written == 3 and not retry.errors
    assert sink.rows == [b"a", b"c"]
    assert sink.flushes == 1
    assert sink.closed  # the host closes its services on stop
    assert caps.capabilities.requires_flush and caps.capabilities.idempotent_writes
    assert caps.capabilities.name == "memory"


class Table(Lookup):
    capabilities = Capabilities(name="table", labels={"backend": "dict"})

    async def lookup(self, key: bytes) -> LookupResult | None:
        if key == b"boom":
            raise RetryableError("backend timeout")
        if key.startswith(b"k"):
            return LookupResult(b"v-" + key, {"len": str(len(key))})
        return None


async def test_lookup_hits_misses_and_batch_order() -> None:
    async with serving(Table()) as host, channel_to(host.address) as channel:
        stub = services_grpc.LookupServiceStub(channel)
        hit = await stub.Lookup(services_pb2.LookupRequest(key=b"k1"))
        miss = await stub.Lookup(services_pb2.LookupRequest(key=b"x"))
        many = await stub.BatchLookup(services_pb2.BatchLookupRequest(keys=[b"x", b"k22", b"k1"]))
        with pytest.raises(GRPCError) as err:
            await stub.Lookup(services_pb2.LookupRequest(key=b"boom"))
        caps = await stub.GetCapabilities(records_pb2.GetCapabilitiesRequest())
    assert (hit.result.found, hit.result.value, dict(hit.result.fields)) == (True, b"v-k1", {"len": "2"})
    assert not miss.result.found
    assert [(r.found, r.value) for r in many.results] == [(False, b""), (True, b"v-k22"), (True, b"v-k1")]
    assert err.value.status == Status.UNAVAILABLE and err.value.message == "Lookup: backend timeout"
    assert dict(caps.capabilities.labels) == {"backend": "dict"}


async def test_source_capabilities_and_permanent_error_without_records() -> None:
    class Broken(CountingSource):
        async def pull(
            self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
        ) -> Pulled:
            raise PermanentError("file /data/x.jsonl was deleted")

    async with serving(Broken()) as host, channel_to(host.address) as channel:
        caps = await services_grpc.SourceServiceStub(channel).GetCapabilities(
            records_pb2.GetCapabilitiesRequest()
        )
        with pytest.raises(GRPCError) as err:
            await pull(channel)
    assert (caps.capabilities.name, caps.capabilities.version, caps.capabilities.partitions) == (
        "counting",
        "1.2",
        2,
    )
    assert err.value.status == Status.FAILED_PRECONDITION
    assert "file /data/x.jsonl was deleted" in str(err.value.message)


async def test_host_serves_health_and_reflection_for_several_services() -> None:
    async with serving(CountingSource(), Doubler()) as host, channel_to(host.address) as channel:
        names = await list_services(channel)
        overall = await health_status(channel)
        source_health = await health_status(channel, "etlrouter.v1.SourceService")
    assert {"etlrouter.v1.SourceService", "etlrouter.v1.TransformService", "grpc.health.v1.Health"} <= set(
        names
    )
    assert overall == source_health == 1  # SERVING


def test_an_object_that_is_no_service_is_refused() -> None:
    from etlrouter.sdk import ServiceHost

    with pytest.raises(TypeError, match="str is not a Source, PushSource, Transform, Sink or Lookup"):
        ServiceHost("not a service")  # type: ignore[arg-type]


class Slow(Transform):
    """Holds every batch until released, to observe a drain with a call in flight."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def process(self, records: list[Record], options: Mapping[str, str]) -> Processed:
        self.started.set()
        await self.release.wait()
        return Processed(records)


async def test_drain_refuses_new_calls_and_lets_running_ones_finish() -> None:
    slow = Slow()
    async with serving(slow) as host, channel_to(host.address) as channel:
        running = asyncio.ensure_future(process(channel, [Record(value=b"in flight")]))
        await slow.started.wait()
        draining = asyncio.ensure_future(host.drain())
        await asyncio.sleep(0)  # the drain task runs up to waiting for the running call
        with pytest.raises(GRPCError) as refused:
            await process(channel, [Record(value=b"late")])
        health_while_draining = await health_status(channel)
        still_draining = not draining.done()
        slow.release.set()
        output, _ = await running
        await asyncio.wait_for(draining, 5)
    assert refused.value.status == Status.UNAVAILABLE
    assert refused.value.message == "ProcessBatch: the service is shutting down"
    assert health_while_draining == 2  # NOT_SERVING
    assert still_draining
    assert output == [Record(value=b"in flight")]


async def test_a_failing_open_closes_what_was_opened_and_propagates() -> None:
    class BrokenOpen(Table):
        async def open(self) -> None:
            raise RetryableError("cannot reach the backend")

    first = MemorySink()
    with pytest.raises(RetryableError, match="cannot reach the backend"):
        async with serving(first, BrokenOpen()):
            raise AssertionError("must not serve")
    assert first.closed
