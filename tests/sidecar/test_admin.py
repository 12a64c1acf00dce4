"""SidecarAdmin over a real grpclib server and client: DLQ listing, redrive, taps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import dataplane_grpc, dataplane_pb2, records_pb2
from etlrouter.core.grpc import GrpcServer, open_channel
from etlrouter.core.metrics import REGISTRY
from etlrouter.sidecar import admin as admin_module
from etlrouter.sidecar.admin import SidecarAdminService, TapHub
from etlrouter.sidecar.dlq import DeadLetterStore
from etlrouter.sidecar.model import Redriver

PERMANENT = records_pb2.ERROR_CLASS_PERMANENT
REJECTED = records_pb2.ERROR_CLASS_REJECTED


def letter(
    n: int,
    *,
    pipeline: str = "orders",
    dag: str = "dag-1",
    stage: str = "parse",
    error_class: int = PERMANENT,
) -> dataplane_pb2.DeadLetter:
    return dataplane_pb2.DeadLetter(
        pipeline=pipeline,
        dag_id=dag,
        stage_id=stage,
        error_class=error_class,  # type: ignore[arg-type]
        error=f"bad record {n}",
        record=records_pb2.Record(key=f"k{n}".encode(), value=f"value {n}".encode(), offset=n),
    )


@dataclass
class RecordingRedriver:
    """Stands for the engine: records what it was asked to redrive; can fail or accept only a prefix."""

    calls: list[tuple[str, str, list[str]]] = field(default_factory=list)
    fail_stages: set[str] = field(default_factory=set)
    accept_at_most: int | None = None

    async def redrive(self, dag_id: str, stage_id: str, letters: Sequence[dataplane_pb2.DeadLetter]) -> int:
        self.calls.append((dag_id, stage_id, [x.id for x in letters]))
        assert all(x.record.value for x in letters), "letters reach the engine with their records"
        if stage_id in self.fail_stages:
            raise ConnectionError(f"stage {stage_id} is not running here")
        return len(letters) if self.accept_at_most is None else min(self.accept_at_most, len(letters))


@dataclass
class Harness:
    store: DeadLetterStore
    hub: TapHub
    redriver: RecordingRedriver
    stub: dataplane_grpc.SidecarAdminStub
    channel: Channel


async def start(
    tmp_path: Path, redriver: Redriver | None, hub: TapHub
) -> tuple[GrpcServer, DeadLetterStore, Channel]:
    store = await DeadLetterStore.open(tmp_path / "dlq", fsync=False)
    server = GrpcServer([SidecarAdminService(store, redriver, hub)], host="127.0.0.1", port=0)
    await server.start()
    return server, store, open_channel(server.address)


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[Harness]:
    redriver = RecordingRedriver()
    hub = TapHub(max_taps=2, queue_size=4)
    server, store, channel = await start(tmp_path, redriver, hub)
    try:
        yield Harness(store, hub, redriver, dataplane_grpc.SidecarAdminStub(channel), channel)
    finally:
        channel.close()
        hub.close()
        await server.stop()
        await store.close()


async def test_list_pages_through_filtered_letters_without_records(admin: Harness) -> None:
    letters = [
        letter(i, pipeline="orders" if i % 2 else "users", error_class=PERMANENT if i % 3 else REJECTED)
        for i in range(30)
    ]
    await admin.store.put(letters)
    request = dataplane_pb2.ListDeadLettersRequest(pipeline="orders", limit=4)
    seen: list[str] = []
    while True:
        page = await admin.stub.ListDeadLetters(request, timeout=5)
        assert page.total == 15
        assert len(page.dead_letters) <= 4
        assert all(not x.HasField("record") and x.error for x in page.dead_letters)
        seen += [x.id for x in page.dead_letters]
        if not page.next_page_token:
            break
        request.page_token = page.next_page_token
    assert seen == [x.id for x in letters if x.pipeline == "orders"]

    rejected = await admin.stub.ListDeadLetters(
        dataplane_pb2.ListDeadLettersRequest(error_class=REJECTED), timeout=5
    )
    assert [x.id for x in rejected.dead_letters] == [x.id for x in letters if x.error_class == REJECTED]
    everything = await admin.stub.ListDeadLetters(dataplane_pb2.ListDeadLettersRequest(), timeout=5)
    assert everything.total == 30 and len(everything.dead_letters) == 30 and not everything.next_page_token
    huge = await admin.stub.ListDeadLetters(dataplane_pb2.ListDeadLettersRequest(limit=4_000_000), timeout=5)
    assert len(huge.dead_letters) == 30, "an over-large limit is capped, not refused"

    with pytest.raises(GRPCError) as info:
        await admin.stub.ListDeadLetters(dataplane_pb2.ListDeadLettersRequest(page_token="nope"), timeout=5)
    assert info.value.status == Status.INVALID_ARGUMENT
    assert "page token" in str(info.value.message)


async def test_get_returns_the_whole_letter_or_not_found_naming_the_id(admin: Harness) -> None:
    stored = letter(7)
    await admin.store.put([stored])
    got = await admin.stub.GetDeadLetter(dataplane_pb2.GetDeadLetterRequest(id=stored.id), timeout=5)
    assert got == stored and got.record.value == b"value 7"
    with pytest.raises(GRPCError) as info:
        await admin.stub.GetDeadLetter(dataplane_pb2.GetDeadLetterRequest(id="missing-42"), timeout=5)
    assert info.value.status == Status.NOT_FOUND
    assert "missing-42" in str(info.value.message)
    with pytest.raises(GRPCError) as info:
        await admin.stub.GetDeadLetter(dataplane_pb2.GetDeadLetterRequest(id="x" * 1000), timeout=5)
    assert info.value.status == Status.INVALID_ARGUMENT


async def test_redrive_by_ids_groups_by_dag_and_stage_and_removes_what_was_accepted(admin: Harness) -> None:
    a = [letter(i, stage="parse") for i in range(3)]
    b = [letter(10 + i, dag="dag-2", stage="load") for i in range(2)]
    keep = letter(99)
    await admin.store.put([*a, *b, keep])
    reply = await admin.stub.RedriveDeadLetters(
        dataplane_pb2.RedriveDeadLettersRequest(ids=[x.id for x in [*a, *b]] + ["ghost"]), timeout=5
    )
    assert reply.redriven == 5
    assert dict(reply.failed) == {"ghost": "not in this sidecar's DLQ"}
    assert sorted(admin.redriver.calls) == [
        ("dag-1", "parse", [x.id for x in a]),
        ("dag-2", "load", [x.id for x in b]),
    ]
    assert admin.store.ids() == [keep.id], "redriven letters leave the DLQ, others stay"


async def test_redrive_by_filter_into_a_target_stage(admin: Harness) -> None:
    orders = [letter(i) for i in range(4)]
    users = [letter(10 + i, pipeline="users") for i in range(2)]
    await admin.store.put([*orders, *users])
    reply = await admin.stub.RedriveDeadLetters(
        dataplane_pb2.RedriveDeadLettersRequest(pipeline="orders", target_stage_id="parse-v2"), timeout=5
    )
    assert reply.redriven == 4 and not reply.failed
    assert admin.redriver.calls == [("dag-1", "parse-v2", [x.id for x in orders])]
    assert admin.store.ids() == [x.id for x in users]


async def test_a_failing_redrive_keeps_the_letters_and_says_why(admin: Harness) -> None:
    good = [letter(i, stage="parse") for i in range(2)]
    bad = [letter(10 + i, stage="enrich") for i in range(2)]
    await admin.store.put([*good, *bad])
    admin.redriver.fail_stages.add("enrich")
    reply = await admin.stub.RedriveDeadLetters(
        dataplane_pb2.RedriveDeadLettersRequest(ids=[x.id for x in [*good, *bad]]), timeout=5
    )
    assert reply.redriven == 2
    assert set(reply.failed) == {x.id for x in bad}
    assert all("stage enrich is not running here" in why for why in reply.failed.values())
    assert admin.store.ids() == [x.id for x in bad]
    for x in bad:
        assert (await admin.store.get(x.id)) == x, "a failed redrive loses nothing"


async def test_a_partly_accepted_redrive_removes_only_the_accepted_prefix(admin: Harness) -> None:
    letters = [letter(i) for i in range(3)]
    await admin.store.put(letters)
    admin.redriver.accept_at_most = 1
    reply = await admin.stub.RedriveDeadLetters(
        dataplane_pb2.RedriveDeadLettersRequest(ids=[x.id for x in letters]), timeout=5
    )
    assert reply.redriven == 1
    assert set(reply.failed) == {letters[1].id, letters[2].id}
    assert "accepted 1 of 3" in reply.failed[letters[1].id]
    assert admin.store.ids() == [letters[1].id, letters[2].id]


async def test_redrive_without_an_engine_is_unavailable(tmp_path: Path) -> None:
    server, store, channel = await start(tmp_path, None, TapHub())
    try:
        await store.put([letter(1)])
        with pytest.raises(GRPCError) as info:
            await dataplane_grpc.SidecarAdminStub(channel).RedriveDeadLetters(
                dataplane_pb2.RedriveDeadLettersRequest(), timeout=5
            )
        assert info.value.status == Status.UNAVAILABLE
        assert len(store) == 1
    finally:
        channel.close()
        await server.stop()
        await store.close()


def encoded_records(start: int, count: int) -> bytes:
    records = records_pb2.RecordList(
        records=[records_pb2.Record(key=str(i).encode(), offset=i) for i in range(start, start + count)]
    )
    return records.SerializeToString()


async def wait_for_taps(hub: TapHub, count: int) -> None:
    async with asyncio.timeout(5):
        while hub.tap_count != count:
            await asyncio.sleep(0.005)


async def test_a_slow_tap_client_sees_how_many_records_it_missed(admin: Harness) -> None:
    request = dataplane_pb2.TapRequest(dag_id="dag-1", stage_id="parse", limit=6)
    async with admin.stub.Tap.open(timeout=10) as call:
        await call.send_message(request, end=True)
        await wait_for_taps(admin.hub, 1)
        admin.hub.offer("dag-1", "other-stage", "b0", encoded_records(0, 10))  # not tapped
        # 100 records at once: the queue holds 4, the other 96 are counted as dropped.
        admin.hub.offer("dag-1", "parse", "b1", encoded_records(0, 100))
        first = [await call.recv_message() for _ in range(4)]
        assert [e.record.offset for e in first if e] == [0, 1, 2, 3]
        assert all(e is not None and e.batch_id == "b1" and e.dropped == 96 for e in first)
        admin.hub.offer("dag-1", "parse", "b2", encoded_records(500, 2))
        rest = [await call.recv_message() for _ in range(2)]
        assert [(e.record.offset, e.dropped) for e in rest if e] == [(500, 96), (501, 96)]
        assert await call.recv_message() is None, "the stream ends after `limit` records"
    await wait_for_taps(admin.hub, 0)


async def test_tap_samples_at_the_requested_rate(admin: Harness) -> None:
    request = dataplane_pb2.TapRequest(dag_id="d", stage_id="s", sample_rate=0.25, limit=4)
    async with admin.stub.Tap.open(timeout=10) as call:
        await call.send_message(request, end=True)
        await wait_for_taps(admin.hub, 1)
        admin.hub.offer("d", "s", "b", encoded_records(0, 16))
        events = [await call.recv_message() for _ in range(4)]
        assert [e.record.offset for e in events if e] == [3, 7, 11, 15]
        assert all(e is not None and e.dropped == 0 for e in events)


async def test_taps_are_limited_and_validated(admin: Harness) -> None:
    calls = []
    for _ in range(2):
        call = admin.stub.Tap.open(timeout=10)
        await call.__aenter__()
        await call.send_message(dataplane_pb2.TapRequest(dag_id="d", stage_id="s"), end=True)
        calls.append(call)
    try:
        await wait_for_taps(admin.hub, 2)
        with pytest.raises(GRPCError) as info:
            await admin.stub.Tap(dataplane_pb2.TapRequest(dag_id="d", stage_id="s"), timeout=5)
        assert info.value.status == Status.RESOURCE_EXHAUSTED
        assert "limit is 2" in str(info.value.message)
    finally:
        for call in calls:
            await call.cancel()
            await call.__aexit__(None, None, None)
    await wait_for_taps(admin.hub, 0)
    for bad in (
        dataplane_pb2.TapRequest(dag_id="d", stage_id="s", sample_rate=1.5),
        dataplane_pb2.TapRequest(dag_id="d", stage_id=""),
    ):
        with pytest.raises(GRPCError) as info:
            await admin.stub.Tap(bad, timeout=5)
        assert info.value.status == Status.INVALID_ARGUMENT


def test_offer_decodes_nothing_when_nobody_taps() -> None:
    hub = TapHub()
    before = REGISTRY.get_sample_value("etlrouter_tap_undecodable_batches_total") or 0.0
    hub.offer("d", "s", "b", b"\xff\xff not a record list")
    assert (REGISTRY.get_sample_value("etlrouter_tap_undecodable_batches_total") or 0.0) == before


async def test_a_large_redrive_goes_to_the_engine_in_bounded_chunks(
    admin: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_module, "REDRIVE_CHUNK", 2)
    letters = [letter(i) for i in range(5)]
    await admin.store.put(letters)
    reply = await admin.stub.RedriveDeadLetters(dataplane_pb2.RedriveDeadLettersRequest(), timeout=5)
    assert reply.redriven == 5 and not reply.failed
    assert [ids for _, _, ids in admin.redriver.calls] == [
        [letters[0].id, letters[1].id],
        [letters[2].id, letters[3].id],
        [letters[4].id],
    ]
    assert len(admin.store) == 0
