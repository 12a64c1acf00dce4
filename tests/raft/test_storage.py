"""Tests of the durable Raft storage: round trips against a reference model, torn tails, corruption,
crashes of a real child process (SIGKILL) and simulated power loss (unsynced bytes dropped)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etlrouter.raft import storage as storage_module
from etlrouter.raft.storage import (
    AsyncRaftStorage,
    LoadedState,
    RaftStorage,
    StorageCorruptError,
    StorageFailedError,
    StorageLockedError,
    StorageOptions,
    load,
)
from etlrouter.raft.types import ConfState, Entry, EntryKind, HardState, SnapshotMeta

SMALL = StorageOptions(segment_bytes=4096, fsync=False)

# ---------------------------------------------------------------------------------------------------
# A reference model of what storage must return, and a generator of valid Raft-like operations.


@dataclass
class Model:
    hard_state: HardState = field(default_factory=HardState)
    snapshot: SnapshotMeta | None = None
    snapshot_data: bytes | None = None
    entries: list[Entry] = field(default_factory=list)  # contiguous, right after the snapshot

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.index if self.snapshot else 0

    @property
    def last_index(self) -> int:
        return self.snapshot_index + len(self.entries)

    def term_at(self, index: int) -> int | None:
        if self.snapshot is not None and index == self.snapshot.index:
            return self.snapshot.term
        if self.snapshot_index < index <= self.last_index:
            return self.entries[index - self.snapshot_index - 1].term
        return None

    def copy(self) -> Model:
        return dataclasses.replace(self, entries=list(self.entries))

    def as_loaded(self) -> LoadedState:
        return LoadedState(self.hard_state, self.snapshot, self.snapshot_data, list(self.entries))


@dataclass(frozen=True)
class Save:
    hard_state: HardState | None
    entries: tuple[Entry, ...]
    truncate_after: int | None
    sync: bool


@dataclass(frozen=True)
class Snapshot:
    meta: SnapshotMeta
    data: bytes


@dataclass(frozen=True)
class Compact:
    index: int


@dataclass(frozen=True)
class Sync:
    pass


@dataclass(frozen=True)
class Reopen:
    pass


Op = Save | Snapshot | Compact | Sync | Reopen


def apply_to_model(model: Model, op: Op) -> list[Model]:
    """Applies `op` to `model`; returns the state after each record it writes (crash points)."""
    states: list[Model] = []
    if isinstance(op, Save):
        cut = (
            op.truncate_after
            if op.truncate_after is not None and op.truncate_after < model.last_index
            else None
        )
        if op.entries and op.entries[0].index <= (model.last_index if cut is None else cut):
            cut = op.entries[0].index - 1
        if cut is not None:
            del model.entries[cut - model.snapshot_index :]
            states.append(model.copy())
        if op.entries:
            model.entries.extend(op.entries)
            states.append(model.copy())
        if op.hard_state is not None and op.hard_state != model.hard_state:
            model.hard_state = op.hard_state
            states.append(model.copy())
    elif isinstance(op, Snapshot):
        meta = op.meta
        if model.term_at(meta.index) == meta.term and meta.index < model.last_index:
            del model.entries[: meta.index - model.snapshot_index]
        else:
            model.entries = []
        model.snapshot, model.snapshot_data = meta, op.data
        states.append(model.copy())
    return states


def apply_to_storage(storage: RaftStorage, op: Op, data_dir: Path, options: StorageOptions) -> RaftStorage:
    if isinstance(op, Save):
        storage.save(
            hard_state=op.hard_state, entries=op.entries, truncate_after=op.truncate_after, sync=op.sync
        )
    elif isinstance(op, Snapshot):
        storage.save_snapshot(op.meta, op.data)
    elif isinstance(op, Compact):
        storage.compact(op.index)
    elif isinstance(op, Sync):
        storage.sync()
    else:
        storage.close()
        storage, _ = RaftStorage.open(data_dir, options)
    return storage


def next_op(rng: random.Random, model: Model, *, always_sync: bool, allow_reopen: bool) -> Op:
    """A random operation a Raft node could legally ask of its storage in `model`'s state."""
    hs = model.hard_state
    term = max(hs.term, 1)
    last, commit = model.last_index, hs.commit
    floor = max(commit, model.snapshot_index)  # nothing at or below this may be rewritten
    sync = always_sync or rng.random() < 0.4
    roll = rng.random()

    def payload() -> bytes:
        return rng.randbytes(rng.randint(0, 60))

    def entries_from(first: int, entry_term: int) -> tuple[Entry, ...]:
        count = rng.randint(1, 5)
        return tuple(
            Entry(first + i, entry_term, rng.choice(list(EntryKind)), payload()) for i in range(count)
        )

    if roll < 0.45:  # the leader appends, commit moves along
        new = entries_from(last + 1, term)
        new_commit = rng.randint(commit, new[-1].index) if rng.random() < 0.5 else commit
        return Save(HardState(term, hs.vote or "a", new_commit), new, None, sync)
    if roll < 0.55 and last > floor:  # a new leader overwrites an uncommitted suffix
        cut = rng.randint(floor, last - 1)
        explicit = cut if rng.random() < 0.5 else None
        return Save(
            HardState(term + 1, rng.choice("abc"), commit), entries_from(cut + 1, term + 1), explicit, sync
        )
    if roll < 0.62 and last > floor:  # only a truncation
        return Save(None, (), rng.randint(floor, last - 1), sync)
    if roll < 0.72:  # commit moves, or a new term starts with a vote (a vote is cast once per term)
        new_term = term + rng.randint(0, 1)
        vote = rng.choice("abc") if new_term != hs.term or not hs.vote else hs.vote
        return Save(HardState(new_term, vote, rng.randint(commit, last)), (), None, sync)
    if roll < 0.82 and commit > model.snapshot_index:  # the state machine takes a snapshot
        index = rng.randint(model.snapshot_index + 1, commit)
        term_at = model.term_at(index)
        assert term_at is not None
        return Snapshot(SnapshotMeta(index, term_at, ConfState(("a", "b")), {"a": "10.0.0.1:1"}), payload())
    if roll < 0.86:  # the leader sends a snapshot: beyond our log, or conflicting with it
        index = rng.randint(floor + 1, last + 3)
        return Snapshot(SnapshotMeta(index, term, ConfState(("a", "b", "c"))), payload())
    if roll < 0.93 and model.snapshot_index > 0:
        return Compact(rng.randint(0, model.snapshot_index))
    if roll < 0.97 or not allow_reopen:
        return Sync()
    return Reopen()


def assert_loaded(state: LoadedState, model: Model) -> None:
    expected = model.as_loaded()
    assert state.hard_state == expected.hard_state
    assert state.snapshot == expected.snapshot
    assert state.snapshot_data == expected.snapshot_data
    assert state.entries == expected.entries


def segments(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "wal").glob("*.wal"))


def entries(first: int, last: int, term: int = 1, size: int = 20) -> list[Entry]:
    return [Entry(i, term, EntryKind.NORMAL, bytes([i % 256]) * size) for i in range(first, last + 1)]


# ---------------------------------------------------------------------------------------------------
# Round trips


def test_fresh_directory_loads_empty(tmp_path: Path) -> None:
    storage, state = RaftStorage.open(tmp_path / "node", SMALL)
    storage.close()
    assert state == LoadedState(HardState(), None, None, [])
    assert load(tmp_path / "node") == state


def test_round_trip_entries_and_hard_state(tmp_path: Path) -> None:
    written = entries(1, 50)
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(3, "b", 40), entries=written[:30])
        storage.append(written[30:])
        storage.set_hard_state(HardState(3, "b", 45))
        assert storage.last_index == 50
        assert storage.term_at(50) == 1
    reopened, state = RaftStorage.open(tmp_path, SMALL)
    reopened.close()
    assert state.hard_state == HardState(3, "b", 45)
    assert state.entries == written
    assert (state.first_index, state.last_index) == (1, 50)


def test_overwriting_entries_discards_the_old_suffix(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(1, "a", 3), entries=entries(1, 10, term=1))
        storage.save(hard_state=HardState(2, "b", 3), entries=entries(6, 7, term=2))  # implicit cut
        storage.truncate_after(6)
        storage.append(entries(7, 8, term=3))
        assert [storage.term_at(i) for i in (5, 6, 7, 8, 9)] == [1, 2, 3, 3, None]
    state = load(tmp_path)
    assert state.entries == entries(1, 5, term=1) + entries(6, 6, term=2) + entries(7, 8, term=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False), op_count=st.integers(1, 120))
def test_random_operations_reload_exactly_the_model(
    tmp_path_factory: pytest.TempPathFactory, rng: random.Random, op_count: int
) -> None:
    data_dir = tmp_path_factory.mktemp("wal")
    model = Model()
    storage, _ = RaftStorage.open(data_dir, SMALL)
    try:
        for _ in range(op_count):
            op = next_op(rng, model, always_sync=False, allow_reopen=True)
            storage = apply_to_storage(storage, op, data_dir, SMALL)
            apply_to_model(model, op)
            assert storage.last_index == model.last_index
            assert storage.snapshot == model.snapshot
            assert storage.hard_state == model.hard_state
            for index in range(model.snapshot_index - 1, model.last_index + 2):
                assert storage.term_at(index) == model.term_at(index), f"term of {index}"
        storage.sync()
    finally:
        storage.close()
    assert_loaded(load(data_dir), model)
    reopened, state = RaftStorage.open(data_dir, SMALL)
    reopened.close()
    assert_loaded(state, model)


def test_restart_after_appends_truncations_snapshot_and_compaction(tmp_path: Path) -> None:
    options = StorageOptions(segment_bytes=4096, fsync=False, keep_snapshots=2)
    with RaftStorage.open(tmp_path, options)[0] as storage:
        for first in range(1, 300, 10):
            storage.save(
                hard_state=HardState(1, "a", 0), entries=entries(first, first + 9, term=1), sync=False
            )
        for first in range(281, 400, 10):  # a new leader overwrites 281.. on its first batch
            storage.save(
                hard_state=HardState(2, "b", 250), entries=entries(first, first + 9, term=2), sync=False
            )
        storage.truncate_after(390)
        storage.save_snapshot(SnapshotMeta(200, 1, ConfState(("a", "b"))), b"state@200")
        segments_before = storage.segment_count
        removed = storage.compact(200)
        assert removed > 0
        assert storage.segment_count == segments_before - removed
        storage.append(entries(391, 420, term=2))
    reopened, state = RaftStorage.open(tmp_path, options)
    reopened.close()
    assert state.snapshot == SnapshotMeta(200, 1, ConfState(("a", "b")))
    assert state.snapshot_data == b"state@200"
    assert state.hard_state == HardState(2, "b", 250)
    assert state.entries == entries(201, 280, term=1) + entries(281, 420, term=2)
    assert (state.first_index, state.last_index) == (201, 420)


def test_segments_roll_over_at_the_size_limit(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        for index in range(1, 401):
            storage.append(entries(index, index, size=100), sync=False)
        assert storage.segment_count == len(segments(tmp_path)) > 5
    files = segments(tmp_path)
    assert [int(path.stem, 16) for path in files] == list(range(1, len(files) + 1))
    assert all(path.stat().st_size <= SMALL.segment_bytes for path in files)
    assert load(tmp_path).entries == entries(1, 400, size=100)


def test_an_oversized_batch_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    big = entries(1, 100, size=200)  # ~21 KB in one record, five times the segment size
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.append(big)
        storage.append(entries(101, 101))
    assert load(tmp_path).entries == [*big, *entries(101, 101)]


async def test_async_wrapper_runs_saves_in_order(tmp_path: Path) -> None:
    storage, _ = RaftStorage.open(tmp_path, SMALL)
    wrapper = AsyncRaftStorage(storage)
    for index in range(1, 21):
        await wrapper.save(hard_state=HardState(1, "a", index - 1), entries=entries(index, index), sync=False)
    await wrapper.sync()
    await wrapper.save_snapshot(SnapshotMeta(10, 1, ConfState(("a",))), b"ten")
    assert await wrapper.compact(10) >= 0
    await wrapper.close()
    state = load(tmp_path)
    assert state.entries == entries(11, 20)
    assert state.hard_state == HardState(1, "a", 19)


async def test_async_calls_never_overlap_even_when_their_callers_are_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, _ = RaftStorage.open(tmp_path, SMALL)
    running, overlaps, ran = 0, 0, list[HardState]()

    def slow_save(*, hard_state: HardState, **_: object) -> None:
        nonlocal running, overlaps
        running += 1
        overlaps += running > 1
        time.sleep(0.002)
        ran.append(hard_state)
        running -= 1

    monkeypatch.setattr(storage, "save", slow_save)
    wrapper = AsyncRaftStorage(storage)
    tasks = [asyncio.create_task(wrapper.save(hard_state=HardState(n))) for n in range(20)]
    await asyncio.sleep(0.005)  # let a few start, then cancel every other caller mid-flight
    for task in tasks[::2]:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wrapper.close()
    assert overlaps == 0
    assert ran == sorted(ran, key=lambda hard_state: hard_state.term)  # still in call order
    assert {HardState(n) for n in range(1, 20, 2)} <= set(ran)  # the uncancelled ones all ran


# ---------------------------------------------------------------------------------------------------
# Snapshots


def test_snapshot_keeps_the_log_after_a_matching_entry_and_drops_a_conflicting_one(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(2, "a", 5), entries=entries(1, 10, term=2))
        storage.save_snapshot(SnapshotMeta(5, 2, ConfState(("a",))), b"five")
        assert (storage.snapshot_index, storage.last_index) == (5, 10)
        assert load(tmp_path).entries == entries(6, 10, term=2)
        # A leader's snapshot whose (index, term) is not in our log replaces the whole log.
        storage.save_snapshot(SnapshotMeta(8, 3, ConfState(("a",))), b"eight")
        assert (storage.snapshot_index, storage.last_index, storage.term_at(8)) == (8, 8, 3)
        storage.append(entries(9, 9, term=3))
    state = load(tmp_path)
    assert state.snapshot is not None and state.snapshot.index == 8
    assert state.snapshot_data == b"eight"
    assert state.entries == entries(9, 9, term=3)


def test_a_truncation_below_a_new_snapshot_applies_to_what_follows_the_snapshot(tmp_path: Path) -> None:
    # The core overwrote entries from 4 on, then a leader snapshot at 6 replaced the log before the
    # Ready was persisted: the driver saves the snapshot, then the truncation and the new entries.
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(1, "a", 2), entries=entries(1, 8, term=1))
        storage.save_snapshot(SnapshotMeta(6, 2, ConfState(("a",))), b"six")
        storage.save(hard_state=HardState(2, "b", 6), entries=entries(7, 9, term=2), truncate_after=3)
        with pytest.raises(ValueError, match="entries up to 6 are in a snapshot"):
            storage.save(entries=entries(6, 6, term=2), truncate_after=3)
    state = load(tmp_path)
    assert state.snapshot is not None and state.snapshot.index == 6
    assert state.entries == entries(7, 9, term=2)


def test_only_the_newest_snapshots_are_kept(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(1, "a", 40), entries=entries(1, 40))
        for index in (10, 20, 30, 40):
            storage.save_snapshot(SnapshotMeta(index, 1, ConfState(("a",))), f"at {index}".encode())
    kept = sorted(int(path.stem, 16) for path in (tmp_path / "snap").iterdir())
    assert kept == [30, 40]
    assert load(tmp_path).snapshot_data == b"at 40"


def test_leftover_tmp_and_unrecorded_snapshot_files_are_removed(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(1, "a", 20), entries=entries(1, 20))
        storage.save_snapshot(SnapshotMeta(10, 1, ConfState(("a",))), b"ten")
    snap_dir = tmp_path / "snap"
    ten = snap_dir / f"{10:016x}.snap"
    # A crash mid-write leaves a .tmp; a crash between rename and WAL record leaves a newer file.
    (snap_dir / f"{20:016x}.snap.tmp").write_bytes(b"half a snapsh")
    shutil.copy(ten, snap_dir / f"{15:016x}.snap")
    reopened, state = RaftStorage.open(tmp_path, SMALL)
    reopened.close()
    assert sorted(path.name for path in snap_dir.iterdir()) == [ten.name]
    assert state.snapshot is not None and state.snapshot.index == 10
    assert state.snapshot_data == b"ten"


def test_a_crash_between_snapshot_rename_and_wal_record_keeps_the_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, _ = RaftStorage.open(tmp_path, SMALL)
    storage.save(hard_state=HardState(1, "a", 20), entries=entries(1, 20))

    def crash(payload: bytes) -> None:
        raise SystemExit("simulated crash before the WAL record")

    monkeypatch.setattr(storage, "_write", crash)
    with pytest.raises(SystemExit):
        storage.save_snapshot(SnapshotMeta(15, 1, ConfState(("a",))), b"fifteen")
    storage.close()
    assert (tmp_path / "snap" / f"{15:016x}.snap").exists()
    reopened, state = RaftStorage.open(tmp_path, SMALL)
    reopened.close()
    assert state.snapshot is None
    assert state.entries == entries(1, 20)
    assert list((tmp_path / "snap").iterdir()) == []


def test_a_damaged_snapshot_file_is_reported(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(1, "a", 20), entries=entries(1, 20))
        storage.save_snapshot(SnapshotMeta(10, 1, ConfState(("a",))), b"snapshot data")
    path = tmp_path / "snap" / f"{10:016x}.snap"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(StorageCorruptError, match="snapshot CRC mismatch") as caught:
        load(tmp_path)
    assert caught.value.path == path
    path.unlink()
    with pytest.raises(StorageCorruptError, match="missing") as caught:
        load(tmp_path)
    assert caught.value.path == path


# ---------------------------------------------------------------------------------------------------
# Torn tails and corruption


def _write_records(data_dir: Path, count: int) -> list[tuple[int, int]]:
    """Writes `count` saves into one segment; returns the byte range of each save's records."""
    ranges: list[tuple[int, int]] = []
    with RaftStorage.open(data_dir, SMALL)[0] as storage:
        for index in range(1, count + 1):
            start = segments(data_dir)[-1].stat().st_size
            storage.save(hard_state=HardState(1, "a", index - 1), entries=entries(index, index), sync=False)
            ranges.append((start, segments(data_dir)[-1].stat().st_size))
    assert len(segments(data_dir)) == 1
    return ranges


def test_torn_tail_at_every_byte_of_the_last_save_recovers_to_the_last_complete_record(
    tmp_path: Path,
) -> None:
    ranges = _write_records(tmp_path, 5)
    segment = segments(tmp_path)[0]
    original = segment.read_bytes()
    last_start, last_end = ranges[-1]
    assert last_end == len(original)
    # The last save wrote an ENTRIES record (entry 5) and then a HARD_STATE record (commit 4).
    hard_state_record = _record_offsets(original)[-1]
    assert last_start < hard_state_record < last_end
    for cut in range(last_start, last_end):
        expected = entries(1, 5) if cut >= hard_state_record else entries(1, 4)
        for damaged in (original[:cut], original[:cut] + bytes(last_end - cut)):  # short / zero-filled
            segment.write_bytes(damaged)
            state = load(tmp_path)
            assert state.entries == expected, f"cut at {cut} of {len(damaged)}"
            assert state.hard_state == HardState(1, "a", 3)
    segment.write_bytes(original)  # the record that ends the segment exactly is kept
    assert load(tmp_path).hard_state == HardState(1, "a", 4)


def test_opening_a_torn_tail_truncates_it_and_appends_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_records(tmp_path, 5)
    segment = segments(tmp_path)[0]
    original = segment.read_bytes()
    hard_state_record = _record_offsets(original)[-1]
    segment.write_bytes(original[:-3])  # the final HARD_STATE record is torn
    storage, state = RaftStorage.open(tmp_path, SMALL)
    assert "torn tail" in caplog.text
    assert state.entries == entries(1, 5)
    assert state.hard_state == HardState(1, "a", 3)
    assert segment.stat().st_size == hard_state_record  # cut off on disk, not just skipped
    storage.append(entries(6, 7))
    storage.close()
    assert load(tmp_path).entries == entries(1, 7)


def test_a_bit_flip_in_the_final_record_body_counts_as_torn(tmp_path: Path) -> None:
    _write_records(tmp_path, 3)  # each save writes an ENTRIES then a HARD_STATE record
    segment = segments(tmp_path)[0]
    raw = bytearray(segment.read_bytes())
    raw[-1] ^= 0x40  # inside the third save's HARD_STATE record, the very last one
    segment.write_bytes(bytes(raw))
    state = load(tmp_path)
    assert state.entries == entries(1, 3)
    assert state.hard_state == HardState(1, "a", 1)  # the second save's


def test_a_flipped_byte_in_any_earlier_record_is_reported_with_file_and_offset(tmp_path: Path) -> None:
    ranges = _write_records(tmp_path, 4)
    segment = segments(tmp_path)[0]
    original = segment.read_bytes()
    start, end = ranges[1]  # the second save's records: more follow it
    record_starts = _record_offsets(original)
    for position in range(start, end):
        damaged = bytearray(original)
        damaged[position] ^= 0xFF
        segment.write_bytes(bytes(damaged))
        with pytest.raises(StorageCorruptError) as caught:
            load(tmp_path)
        owning_record = max(offset for offset in record_starts if offset <= position)
        assert caught.value.path == segment
        assert caught.value.offset == owning_record, f"flip at {position}"
        assert str(segment) in str(caught.value) and f"offset {owning_record}" in str(caught.value)


def _record_offsets(segment_bytes: bytes) -> list[int]:
    """Walks the frames independently of the implementation, following the documented format."""
    offsets, offset = [], 24
    while offset < len(segment_bytes):
        length, _kind, _body_crc, header_crc = struct.unpack_from("<IBII", segment_bytes, offset)
        assert zlib.crc32(segment_bytes[offset : offset + 9]) == header_crc
        offsets.append(offset)
        offset += 13 + length
    return offsets


def test_damage_in_a_segment_that_is_not_the_last_is_never_a_torn_tail(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        for index in range(1, 200):
            storage.append(entries(index, index, size=100), sync=False)
    first = segments(tmp_path)[0]
    original = first.read_bytes()
    first.write_bytes(original[:-5])  # shortened, like a torn write
    with pytest.raises(StorageCorruptError, match="runs past the end") as caught:
        load(tmp_path)
    assert caught.value.path == first
    damaged = bytearray(original)
    damaged[-1] ^= 0x01  # the final record of a sealed segment
    first.write_bytes(bytes(damaged))
    with pytest.raises(StorageCorruptError, match="CRC mismatch"):
        load(tmp_path)


def test_bad_magic_unknown_format_and_record_versions_are_reported(tmp_path: Path) -> None:
    _write_records(tmp_path, 2)
    segment = segments(tmp_path)[0]
    original = segment.read_bytes()

    segment.write_bytes(b"NOTAWAL!" + original[8:])
    with pytest.raises(StorageCorruptError, match="bad magic") as caught:
        load(tmp_path)
    assert (caught.value.path, caught.value.offset) == (segment, 0)

    head = b"ETLRWAL\x00" + struct.pack("<IQ", 2, 1)
    segment.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + original[24:])
    with pytest.raises(StorageCorruptError, match="unsupported WAL format version 2"):
        load(tmp_path)

    body = msgspec.msgpack.encode([2, [5, "z", 0]])  # a HARD_STATE record claiming version 2
    checked = struct.pack("<IBI", len(body), 3, zlib.crc32(body))
    future = checked + struct.pack("<I", zlib.crc32(checked)) + body
    segment.write_bytes(original + future + _hard_state_frame(HardState(5, "z", 0)))
    with pytest.raises(StorageCorruptError, match="record version 2") as caught:
        load(tmp_path)
    assert caught.value.offset == len(original)

    unknown = struct.pack("<IBI", 0, 99, zlib.crc32(b""))
    segment.write_bytes(original + unknown + struct.pack("<I", zlib.crc32(unknown)))
    with pytest.raises(StorageCorruptError, match="unknown record type 99"):
        load(tmp_path)


def _hard_state_frame(hard_state: HardState) -> bytes:
    body = msgspec.msgpack.encode([1, hard_state])
    checked = struct.pack("<IBI", len(body), 3, zlib.crc32(body))
    return checked + struct.pack("<I", zlib.crc32(checked)) + body


def test_a_gap_in_indexes_is_reported(tmp_path: Path) -> None:
    _write_records(tmp_path, 2)
    segment = segments(tmp_path)[0]
    original = segment.read_bytes()
    body = msgspec.msgpack.encode([1, [Entry(7, 1)]])  # the log ends at 2
    checked = struct.pack("<IBI", len(body), 2, zlib.crc32(body))
    segment.write_bytes(original + checked + struct.pack("<I", zlib.crc32(checked)) + body)
    with pytest.raises(StorageCorruptError, match="expected entry index 3, found 7") as caught:
        load(tmp_path)
    assert caught.value.offset == len(original)


def test_missing_segments_are_reported(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        for index in range(1, 200):
            storage.append(entries(index, index, size=100), sync=False)
    files = segments(tmp_path)
    assert len(files) > 3
    original_second = files[1].read_bytes()
    files[1].unlink()
    with pytest.raises(StorageCorruptError, match="segments are missing") as caught:
        load(tmp_path)
    assert caught.value.path == files[2]
    files[1].write_bytes(original_second)
    files[0].unlink()  # segment 1 held entries 1..n and no snapshot covers them
    with pytest.raises(StorageCorruptError, match=r"entries 1\.\.\d+ are missing") as caught:
        load(tmp_path)
    assert caught.value.path == files[1]


# ---------------------------------------------------------------------------------------------------
# Refusals


def test_requests_that_would_break_the_log_are_refused_before_writing(tmp_path: Path) -> None:
    with RaftStorage.open(tmp_path, SMALL)[0] as storage:
        storage.save(hard_state=HardState(2, "a", 5), entries=entries(1, 10, term=2))
        size = segments(tmp_path)[0].stat().st_size
        with pytest.raises(ValueError, match="expected index 11, got 12"):
            storage.append(entries(12, 12, term=2))
        with pytest.raises(ValueError, match="term 1 below the previous term 2"):
            storage.append(entries(11, 11, term=1))
        with pytest.raises(ValueError, match="committed"):
            storage.truncate_after(4)
        with pytest.raises(ValueError, match="term would go back from 2 to 1"):
            storage.set_hard_state(HardState(1, "a", 5))
        with pytest.raises(ValueError, match="votes at most once per term"):
            storage.set_hard_state(HardState(2, "b", 5))
        with pytest.raises(ValueError, match="committed"):
            storage.append(entries(3, 3, term=3))
        with pytest.raises(ValueError, match="snapshot only covers 0"):
            storage.compact(3)
        storage.save_snapshot(SnapshotMeta(5, 2, ConfState(("a",))), b"")
        with pytest.raises(ValueError, match="not newer"):
            storage.save_snapshot(SnapshotMeta(5, 2, ConfState(("a",))), b"")
        assert storage.last_index == 10
        assert segments(tmp_path)[0].stat().st_size > size  # only the snapshot record was added


def test_a_second_owner_is_locked_out(tmp_path: Path) -> None:
    storage, _ = RaftStorage.open(tmp_path, SMALL)
    with pytest.raises(StorageLockedError):
        RaftStorage.open(tmp_path, SMALL)
    storage.close()
    RaftStorage.open(tmp_path, SMALL)[0].close()


def test_a_failed_fsync_makes_the_storage_unusable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage, _ = RaftStorage.open(tmp_path, StorageOptions(segment_bytes=4096, fsync=True))

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage_module, "_fdatasync", failing_fdatasync)
    with pytest.raises(StorageFailedError, match="fdatasync"):
        storage.append(entries(1, 1))
    monkeypatch.undo()
    with pytest.raises(StorageFailedError, match="reopen"):
        storage.append(entries(2, 2))  # never retry an fsync after it failed
    storage.close()


# ---------------------------------------------------------------------------------------------------
# Crashes


class _DurabilityTracker:
    """Stands in for fsync/fdatasync and remembers what a power loss would keep: the bytes of each
    file (by inode, so a rename keeps them) up to its last sync, and the names in each directory as
    of that directory's last sync."""

    def __init__(self) -> None:
        self.durable_sizes: dict[int, int] = {}
        self.durable_names: dict[str, set[str]] = {}

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.isdir(path):
            self.durable_names[path] = set(os.listdir(path))
        else:
            status = os.fstat(fd)
            self.durable_sizes[status.st_ino] = status.st_size

    def power_loss_copy(self, data_dir: Path, target: Path) -> Path:
        """Copies `data_dir` as a power loss would leave it: unsynced bytes gone or zero-filled,
        files whose directory entry was never synced gone."""
        shutil.copytree(data_dir, target)
        for subdir in ("wal", "snap"):
            names = self.durable_names.get(str(data_dir / subdir), set())
            for copied in (target / subdir).iterdir():
                size = self.durable_sizes.get((data_dir / subdir / copied.name).stat().st_ino)
                if size is None or copied.name not in names:
                    copied.unlink()
                    continue
                with open(copied, "r+b") as fh:
                    lost = fh.seek(0, os.SEEK_END) - size
                    fh.truncate(size)
                    fh.seek(size)
                    fh.write(bytes(lost // 2))  # some filesystems leave zeros where data never landed
        return target


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to map fds to paths")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.randoms(use_true_random=False), op_count=st.integers(1, 80))
def test_power_loss_keeps_everything_synced(
    tmp_path_factory: pytest.TempPathFactory, rng: random.Random, op_count: int
) -> None:
    tracker = _DurabilityTracker()
    options = StorageOptions(segment_bytes=4096, fsync=True)
    data_dir = tmp_path_factory.mktemp("node")
    model = Model()
    history = [model.copy()]  # every state since the last sync: a crash may land on any of them
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(storage_module, "_fdatasync", tracker)
        patch.setattr(os, "fsync", tracker)  # the module calls os.fsync for new files and directories
        storage, _ = RaftStorage.open(data_dir, options)
        try:
            for _ in range(op_count):
                op = next_op(rng, model, always_sync=False, allow_reopen=False)
                storage = apply_to_storage(storage, op, data_dir, options)
                history.extend(apply_to_model(model, op))
                if isinstance(op, Snapshot | Sync) or (isinstance(op, Save) and op.sync):
                    history = [model.copy()]
        finally:
            storage.close()
    crashed = tracker.power_loss_copy(data_dir, tmp_path_factory.mktemp("crashed") / "node")
    recovered = load(crashed)
    assert any(recovered == state.as_loaded() for state in history), "lost a synced save"


_CHILD = """
import random, sys
sys.path.insert(0, sys.argv[1])
import test_storage as t
from etlrouter.raft.storage import RaftStorage, StorageOptions
rng, model = random.Random(int(sys.argv[3])), t.Model()
storage, _ = RaftStorage.open(sys.argv[2], StorageOptions(segment_bytes=4096, fsync=True))
for number in range(1_000_000):
    op = t.next_op(rng, model, always_sync=True, allow_reopen=False)
    t.apply_to_storage(storage, op, None, None)
    t.apply_to_model(model, op)
    print(number, flush=True)
"""


def _acceptable_states(seed: int, acknowledged: int) -> Iterator[Model]:
    """States the log may hold after `acknowledged` ops returned and the next one was cut short."""
    rng, model = random.Random(seed), Model()
    for _ in range(acknowledged):
        apply_to_model(model, next_op(rng, model, always_sync=True, allow_reopen=False))
    yield model.copy()
    yield from apply_to_model(model, next_op(rng, model, always_sync=True, allow_reopen=False))


@pytest.mark.parametrize("seed", range(6))
def test_sigkill_mid_append_loses_no_acknowledged_save(tmp_path: Path, seed: int) -> None:
    data_dir = tmp_path / "node"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent), str(data_dir), str(seed)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    timing = random.Random(seed)
    kill_after = timing.randint(5, 60)
    acknowledged = 0
    try:
        for line in child.stdout:
            acknowledged = int(line) + 1
            if acknowledged >= kill_after:
                time.sleep(timing.random() * 0.003)  # land anywhere in the next op
                break
    finally:
        child.send_signal(signal.SIGKILL)
    rest = child.stdout.read().split()  # acks printed before the signal landed
    child.wait()
    assert child.returncode == -signal.SIGKILL
    acknowledged = max([acknowledged, *(int(number) + 1 for number in rest)])
    assert acknowledged >= kill_after, "the child died before it was killed"
    recovered = load(data_dir)
    assert any(recovered == state.as_loaded() for state in _acceptable_states(seed, acknowledged))
    storage, reopened = RaftStorage.open(data_dir, SMALL)  # and it is writable again
    storage.close()
    assert reopened == recovered
