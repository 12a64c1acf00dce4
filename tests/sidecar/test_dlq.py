"""The sidecar's durable dead-letter store: round trips, restarts, torn tails, corruption, bounds."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from etlrouter._proto.v1 import dataplane_pb2, records_pb2
from etlrouter.core.metrics import REGISTRY
from etlrouter.sidecar import dlq
from etlrouter.sidecar.dlq import (
    DeadLetterStore,
    DeadLetterStoreCorruptError,
    DeadLetterStoreFailedError,
    DeadLetterStoreFullError,
    DeadLetterStoreLockedError,
    InvalidPageTokenError,
)
from etlrouter.sidecar.model import DeadLetterSink

PERMANENT = records_pb2.ERROR_CLASS_PERMANENT
REJECTED = records_pb2.ERROR_CLASS_REJECTED


def letter(
    n: int,
    *,
    pipeline: str = "orders",
    stage: str = "parse",
    error_class: int = PERMANENT,
    value_size: int = 20,
) -> dataplane_pb2.DeadLetter:
    return dataplane_pb2.DeadLetter(
        pipeline=pipeline,
        dag_id="dag-1",
        stage_id=stage,
        service="parser",
        error_class=error_class,  # type: ignore[arg-type]
        error=f"bad json #{n}",
        attempts=1,
        failed_at_ms=1_700_000_000_000 + n,
        source_id="src",
        partition=n % 3,
        batch_id=f"b{n // 10}",
        record=records_pb2.Record(
            key=f"k{n}".encode(), value=b"v" * value_size, headers={"n": str(n)}, offset=n
        ),
        reason="error",
    )


async def open_store(
    path: Path, *, max_bytes: int = 1 << 30, segment_bytes: int = 16 << 20, fsync: bool = False
) -> DeadLetterStore:
    return await DeadLetterStore.open(path, fsync=fsync, max_bytes=max_bytes, segment_bytes=segment_bytes)


def segments(path: Path) -> list[Path]:
    return sorted(path.glob("*.dlq"))


def tombs(path: Path) -> list[Path]:
    return sorted(path.glob("*.tomb"))


async def test_put_assigns_ordered_ids_and_get_returns_the_letter(tmp_path: Path) -> None:
    store = await DeadLetterStore.open(tmp_path, fsync=True)
    try:
        letters = [letter(i) for i in range(50)]
        await store.put(letters[:25])
        await store.put(letters[25:])
        ids = [x.id for x in letters]
        assert all(ids), "put fills in empty ids"
        assert len(set(ids)) == 50
        assert ids == sorted(ids), "ids are time-ordered: sorting them gives put order"
        got = await store.get(ids[7])
        assert got == letters[7]
        assert got is not None and got.record.value == b"v" * 20
        assert await store.get("no-such-id") is None
        assert len(store) == 50
    finally:
        await store.close()


async def test_caller_ids_are_kept_and_a_retried_put_is_idempotent(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        first = letter(1)
        first.id = "custom-1"
        await store.put([first])
        await store.put([first, letter(2)])  # a retry of the same id stores nothing new for it
        assert len(store) == 2
        assert (await store.get("custom-1")) == first
    finally:
        await store.close()


async def test_concurrent_puts_share_one_commit_and_all_land(tmp_path: Path) -> None:
    store = await DeadLetterStore.open(tmp_path, fsync=True)
    try:
        batches = [[letter(i * 10 + j) for j in range(10)] for i in range(20)]
        await asyncio.gather(*(store.put(b) for b in batches))
        assert len(store) == 200
        page, _, total = await store.list(limit=1000)
        assert total == 200
        assert [x.id for x in page] == sorted(x.id for b in batches for x in b)
    finally:
        await store.close()


async def test_list_filters_pages_and_omits_records(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        letters = [
            letter(
                i,
                pipeline="orders" if i % 2 else "users",
                stage="parse" if i % 3 else "load",
                error_class=PERMANENT if i % 5 else REJECTED,
            )
            for i in range(60)
        ]
        await store.put(letters)
        page, token, total = await store.list(pipeline="orders", limit=7)
        assert total == 30
        assert len(page) == 7 and token
        assert all(not x.HasField("record") for x in page), "list leaves records out"
        assert all(x.error for x in page), "but keeps everything else"
        seen = [x.id for x in page]
        while token:
            page, token, total = await store.list(pipeline="orders", limit=7, page_token=token)
            seen += [x.id for x in page]
        expected = [x.id for x in letters if x.pipeline == "orders"]
        assert seen == expected

        both, _, total = await store.list(pipeline="users", stage_id="load", error_class=REJECTED)
        expected = [
            x.id for x in letters if (x.pipeline, x.stage_id, x.error_class) == ("users", "load", REJECTED)
        ]
        assert [x.id for x in both] == expected and total == len(expected)

        exact, token, _ = await store.list(limit=60)
        assert len(exact) == 60 and token == "", "no token when nothing follows the page"
        capped, _, _ = await store.list(limit=10**6)
        assert len(capped) == 60
        with pytest.raises(InvalidPageTokenError, match="not returned by ListDeadLetters"):
            await store.list(page_token="garbage!")
    finally:
        await store.close()


async def test_reopen_returns_the_same_letters_and_keeps_appending(tmp_path: Path) -> None:
    store = await open_store(tmp_path, segment_bytes=4096)
    letters = [letter(i, value_size=300) for i in range(40)]
    for start in range(0, 40, 5):  # a put lands in one segment; several puts roll segments over
        await store.put(letters[start : start + 5])
    removed = await store.remove([letters[3].id, letters[4].id])
    assert removed == 2
    await store.close()
    assert len(segments(tmp_path)) > 1

    again = await open_store(tmp_path, segment_bytes=4096)
    try:
        page, _, total = await again.list(limit=100)
        assert total == 38
        assert [x.id for x in page] == [x.id for i, x in enumerate(letters) if i not in (3, 4)]
        assert (await again.get(letters[39].id)) == letters[39]
        more = [letter(100 + i) for i in range(3)]
        await again.put(more)
        assert more[0].id > letters[-1].id, "ids keep increasing after a restart"
        assert (await again.get(more[2].id)) == more[2]
    finally:
        await again.close()


async def test_a_second_store_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        with pytest.raises(DeadLetterStoreLockedError, match=str(tmp_path)):
            DeadLetterStore(tmp_path, fsync=False)
    finally:
        await store.close()


async def _write_two_puts(path: Path) -> tuple[list[dataplane_pb2.DeadLetter], int, int]:
    """Two puts; returns the letters and the file size after the first and after the second."""
    store = await open_store(path)
    first = [letter(i) for i in range(5)]
    await store.put(first)
    size_after_first = segments(path)[0].stat().st_size
    second = [letter(10)]
    await store.put(second)
    await store.close()
    return first + second, size_after_first, segments(path)[0].stat().st_size


@pytest.mark.parametrize("cut", [1, 5, 12, 13, 14, 40, -1])
async def test_a_torn_tail_is_cut_off_with_a_warning(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    letters, first_size, full_size = await _write_two_puts(tmp_path)
    keep = full_size - 1 if cut == -1 else first_size + cut
    seg = segments(tmp_path)[0]
    seg.write_bytes(seg.read_bytes()[:keep])
    with caplog.at_level(logging.WARNING, logger="etlrouter.sidecar.dlq"):
        store = await open_store(tmp_path)
    try:
        assert "torn tail" in caplog.text and str(seg) in caplog.text
        page, _, total = await store.list()
        assert total == 5 and [x.id for x in page] == [x.id for x in letters[:5]]
        assert seg.stat().st_size == first_size, "the torn bytes are truncated"
        extra = letter(99)
        await store.put([extra])
        assert (await store.get(extra.id)) == extra
    finally:
        await store.close()


async def test_a_zero_filled_tail_is_torn_too(tmp_path: Path) -> None:
    _, first_size, full_size = await _write_two_puts(tmp_path)
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[first_size:] = bytes(full_size - first_size)
    seg.write_bytes(bytes(data))
    store = await open_store(tmp_path)
    try:
        assert len(store) == 5
    finally:
        await store.close()


async def test_a_flipped_byte_before_the_tail_is_corruption_naming_file_and_offset(tmp_path: Path) -> None:
    _, first_size, _ = await _write_two_puts(tmp_path)
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    target = first_size - 5  # inside the body of the last letter of the first put
    data[target] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(DeadLetterStoreCorruptError) as info:
        DeadLetterStore(tmp_path, fsync=False)
    assert info.value.path == seg
    assert info.value.offset < target and info.value.offset >= 24
    assert "CRC mismatch" in str(info.value) and str(seg) in str(info.value)
    assert seg.read_bytes() == bytes(data), "a corrupt store is left untouched"


async def test_damage_in_an_older_segment_is_never_a_torn_tail(tmp_path: Path) -> None:
    store = await open_store(tmp_path, segment_bytes=4096)
    for i in range(6):
        await store.put([letter(i, value_size=1500)])
    await store.close()
    older = segments(tmp_path)[0]
    assert len(segments(tmp_path)) > 1
    older.write_bytes(older.read_bytes()[:-3])
    with pytest.raises(DeadLetterStoreCorruptError, match="runs past the end of the file") as info:
        DeadLetterStore(tmp_path, fsync=False, segment_bytes=4096)
    assert info.value.path == older


async def test_a_bad_header_is_corruption(tmp_path: Path) -> None:
    await _write_two_puts(tmp_path)
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[0:8] = b"NOTADLQ!"
    seg.write_bytes(bytes(data))
    with pytest.raises(DeadLetterStoreCorruptError, match="bad magic") as info:
        DeadLetterStore(tmp_path, fsync=False)
    assert info.value.offset == 0


async def test_a_full_store_refuses_the_put_naming_the_bound(tmp_path: Path) -> None:
    store = await open_store(tmp_path, max_bytes=8192)
    try:
        stored = 0
        with pytest.raises(DeadLetterStoreFullError, match="max_bytes=8192") as info:
            for i in range(100):
                await store.put([letter(i, value_size=500)])
                stored += 1
        assert 0 < stored < 100
        assert info.value.max_bytes == 8192
        assert len(store) == stored, "a refused put stores nothing"
        assert store.bytes_used <= 8192
        refused = letter(1000, value_size=500)
        with pytest.raises(DeadLetterStoreFullError):
            await store.put([refused])
        assert (await store.get(refused.id)) is None
        # Removing letters makes room again once their segment can go.
        ids = store.ids(limit=1000)
        assert await store.remove(ids) == stored
        await store.put([refused])
        assert (await store.get(refused.id)) == refused
    finally:
        await store.close()
    assert REGISTRY.get_sample_value("etlrouter_dlq_refused_total") is not None


async def test_remove_is_durable_and_compacts_fully_removed_segments(tmp_path: Path) -> None:
    store = await open_store(tmp_path, segment_bytes=4096, fsync=True)
    letters = [letter(i, value_size=1000) for i in range(12)]
    for x in letters:
        await store.put([x])
    before = segments(tmp_path)
    assert len(before) >= 4
    bytes_before = store.bytes_used
    # Remove everything in the first segments but one letter of the last: whole segments go away.
    victims = [x.id for x in letters[:-1]]
    assert await store.remove([*victims, "unknown-id"]) == len(victims)
    assert await store.remove(victims) == 0, "removing twice is a no-op"
    after = segments(tmp_path)
    assert len(after) < len(before)
    assert before[0] not in after and not before[0].with_suffix(".tomb").exists()
    assert store.bytes_used < bytes_before
    assert (await store.get(letters[0].id)) is None
    await store.close()

    again = await open_store(tmp_path, segment_bytes=4096)
    try:
        page, _, total = await again.list()
        assert total == 1 and page[0].id == letters[-1].id
        assert await again.remove([letters[-1].id]) == 1
        assert len(again) == 0
    finally:
        await again.close()
    again = await open_store(tmp_path, segment_bytes=4096)
    try:
        assert len(again) == 0, "removals of the last letters survive a restart too"
    finally:
        await again.close()


async def test_a_torn_tombstone_keeps_the_letter(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    letters = [letter(i) for i in range(3)]
    await store.put(letters)
    await store.remove([letters[0].id])
    tomb = tombs(tmp_path)[0]
    size = tomb.stat().st_size
    await store.remove([letters[1].id])
    await store.close()
    tomb.write_bytes(tomb.read_bytes()[: size + 6])  # the second removal never completed
    again = await open_store(tmp_path)
    try:
        assert [x.id for x in (await again.list())[0]] == [letters[1].id, letters[2].id]
        assert tomb.stat().st_size == size
    finally:
        await again.close()


async def test_metrics_count_letters_by_pipeline_stage_and_reason(tmp_path: Path) -> None:
    labels = {"pipeline": "metrics-p", "stage": "metrics-s", "reason": "shed"}
    before = REGISTRY.get_sample_value("etlrouter_dlq_records_total", labels) or 0.0
    store = await open_store(tmp_path)
    try:
        shed = [letter(i, pipeline="metrics-p", stage="metrics-s") for i in range(4)]
        for x in shed:
            x.reason = "shed"
        await store.put(shed)
        assert REGISTRY.get_sample_value("etlrouter_dlq_records_total", labels) == before + 4
        assert REGISTRY.get_sample_value("etlrouter_dlq_bytes") == store.bytes_used
    finally:
        await store.close()


def test_ids_are_strictly_increasing_even_within_a_millisecond() -> None:
    ids = [dlq.new_letter_id() for _ in range(5000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(len(i) == 24 for i in ids)


async def test_tombstones_left_by_a_crash_during_compaction_are_removed(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    await store.put([letter(1)])
    await store.close()
    orphan = tmp_path / f"{7:016x}.tomb"
    orphan.write_bytes(b"whatever was left")
    again = await open_store(tmp_path)
    try:
        assert len(again) == 1
        assert not orphan.exists()
    finally:
        await again.close()


async def _fill_segments(
    store: DeadLetterStore, path: Path, count: int
) -> list[list[dataplane_pb2.DeadLetter]]:
    """Puts `count` ~1 KB letters one by one; returns them grouped by the segment they landed in."""
    by_segment: list[list[dataplane_pb2.DeadLetter]] = []
    for i in range(count):
        x = letter(i, value_size=1000)
        await store.put([x])
        while len(by_segment) < len(segments(path)):
            by_segment.append([])
        by_segment[-1].append(x)
    return by_segment


async def test_a_full_store_moves_the_few_live_letters_out_of_mostly_removed_segments(tmp_path: Path) -> None:
    store = await open_store(tmp_path, max_bytes=14000, segment_bytes=4096)
    try:
        by_segment = await _fill_segments(store, tmp_path, 12)
        assert len(by_segment) == 4 and all(len(group) == 3 for group in by_segment)
        with pytest.raises(DeadLetterStoreFullError):
            await store.put([letter(100, value_size=1000)])
        # One survivor per segment: no segment is empty, but most of every one is removed.
        survivors = [group[1] for group in by_segment]
        assert await store.remove([x.id for g in by_segment for x in g if x not in survivors]) == 8
        fresh = [letter(200 + i, value_size=1000) for i in range(4)]
        for x in fresh:
            await store.put([x])
        assert store.bytes_used <= 14000
        for x in [*survivors, *fresh]:
            assert (await store.get(x.id)) == x
    finally:
        await store.close()
    again = await open_store(tmp_path, max_bytes=14000, segment_bytes=4096)
    try:
        assert again.ids() == sorted(x.id for x in [*survivors, *fresh])
    finally:
        await again.close()


async def test_a_crash_between_moving_letters_and_deleting_their_old_segment_loses_and_revives_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(tmp_path, segment_bytes=4096)
    by_segment = await _fill_segments(store, tmp_path, 9)
    first = segments(tmp_path)[0]
    gone, kept = by_segment[0][:2], by_segment[0][2]
    with monkeypatch.context() as patch:
        # The crash: the moved letters are durable in the newest segment, the old segment never deleted.
        patch.setattr(dlq._Files, "delete_segments", lambda self, seqs: [])
        assert await store.remove([x.id for x in gone]) == 2
        assert first.exists()
    await store.close()

    again = await open_store(tmp_path, segment_bytes=4096)
    try:
        expected = sorted(x.id for g in by_segment for x in g if x not in gone)
        assert again.ids() == expected, "the moved letter appears once, removed ones stay removed"
        assert (await again.get(kept.id)) == kept
        assert await again.remove([kept.id]) == 1
        assert not first.exists(), "the old segment goes once nothing in it is live"
    finally:
        await again.close()
    last = await open_store(tmp_path, segment_bytes=4096)
    try:
        assert (await last.get(kept.id)) is None, "a removed letter never comes back from an old copy"
        assert len(last) == len(expected) - 1
    finally:
        await last.close()


async def test_an_id_removed_and_stored_again_is_listed_once(tmp_path: Path) -> None:
    store = await open_store(tmp_path)
    try:
        x = letter(1)
        x.id = "same"
        await store.put([x, letter(2)])
        await store.remove(["same"])
        await store.put([x])
        page, _, total = await store.list()
        assert total == 2 and [y.id for y in page].count("same") == 1
    finally:
        await store.close()


async def test_a_failed_write_fails_the_put_and_every_later_one_until_reopened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(tmp_path)
    sink: DeadLetterSink = store  # the store is what the engine writes dead letters to
    kept = letter(1)
    await sink.put([kept])

    def no_space(fd: int, payload: bytes) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(dlq, "_write_all", no_space)
        with pytest.raises(DeadLetterStoreFailedError, match="No space left on device"):
            await sink.put([letter(2)])
    with pytest.raises(DeadLetterStoreFailedError, match="reopen it"):
        await sink.put([letter(3)])
    await store.close()
    again = await open_store(tmp_path)
    try:
        assert again.ids() == [kept.id]
    finally:
        await again.close()
