"""The read side both durable logs share (core/framing.py) and the parts around it (core/durable.py).

The Raft WAL and the dead-letter store each test their own rules in tests/raft/test_storage.py and
tests/sidecar/test_dlq.py; here: the format pinned byte for byte, the torn-tail rule on its own, and that
both logs go through the same reader, lock and errors.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from etlrouter._proto.v1 import dataplane_pb2
from etlrouter.core.durable import (
    DirectoryLock,
    DurableLogCorruptError,
    DurableLogError,
    DurableLogLockedError,
    StorageThread,
)
from etlrouter.core.framing import FILE_HEADER, FRAME, FileFormat, FramedFile, file_header, frame
from etlrouter.raft import storage as raft_storage
from etlrouter.raft.storage import RaftStorage, StorageOptions
from etlrouter.raft.types import Entry
from etlrouter.sidecar import dlq

MAGIC = b"TESTLOG\x00"
FORMAT = FileFormat(MAGIC, 1, frozenset({1, 2}), "TEST", "a test log", logging.getLogger(__name__))


def write_log(path: Path, bodies: list[bytes], seq: int = 7) -> list[int]:
    """Writes a framed file; returns the offset of each frame."""
    data = file_header(MAGIC, 1, seq)
    offsets = []
    for body in bodies:
        offsets.append(len(data))
        data += frame(1, body)
    path.write_bytes(data)
    return offsets


def read_all(path: Path, *, tail_may_tear: bool, seq: int = 7) -> tuple[FramedFile, list[bytes]]:
    file = FramedFile(path, FORMAT, seq, tail_may_tear=tail_may_tear)
    return file, [bytes(f.body) for f in file]


# ---------------------------------------------------------------------------------------------------
# The format


def test_the_format_is_the_documented_one_byte_for_byte() -> None:
    head = MAGIC + struct.pack("<IQ", 1, 7)
    assert file_header(MAGIC, 1, 7) == head + struct.pack("<I", zlib.crc32(head))
    checked = struct.pack("<IBI", 3, 2, zlib.crc32(b"abc"))
    assert frame(2, b"abc") == checked + struct.pack("<I", zlib.crc32(checked)) + b"abc"
    assert (FILE_HEADER.size, FRAME.size) == (24, 13)


# ---------------------------------------------------------------------------------------------------
# The torn-tail rule

# Damage to the last frame (body b"x" * 40): (name, how to damage the file's bytes from the frame on).
TAIL_DAMAGE: list[tuple[str, Callable[[bytearray], bytearray]]] = [
    ("frame header cut short", lambda tail: tail[:7]),
    ("body cut short", lambda tail: tail[:30]),
    ("frame header CRC bad, zeros after", lambda tail: bytearray(b"\x01") + bytearray(len(tail) - 1)),
    ("body CRC bad, zeros after", lambda tail: tail[:-1] + b"y" + bytearray(9)),
    ("zero-filled", lambda tail: bytearray(len(tail))),
]


@pytest.mark.parametrize(("name", "damage"), TAIL_DAMAGE, ids=[name for name, _ in TAIL_DAMAGE])
def test_a_torn_last_frame_ends_the_file_where_the_tail_may_tear(
    tmp_path: Path, name: str, damage: Callable[[bytearray], bytearray], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log"
    offsets = write_log(path, [b"a" * 10, b"x" * 40])
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[: offsets[1]] + damage(data[offsets[1] :])))
    with caplog.at_level(logging.WARNING):
        file, bodies = read_all(path, tail_may_tear=True)
    assert bodies == [b"a" * 10] and file.valid == offsets[1]
    assert f"TEST {path}: torn tail at byte offset {offsets[1]}" in caplog.text
    assert file.cut_tail(fsync=False) and path.stat().st_size == offsets[1]

    path.write_bytes(bytes(data[: offsets[1]] + damage(data[offsets[1] :])))
    with pytest.raises(DurableLogCorruptError) as caught:  # the same bytes where the tail cannot tear
        read_all(path, tail_may_tear=False)
    assert (caught.value.path, caught.value.offset) == (path, offsets[1])


@pytest.mark.parametrize("where", ["frame header", "body"])
def test_damage_with_data_after_it_is_corruption_naming_file_and_offset(tmp_path: Path, where: str) -> None:
    path = tmp_path / "log"
    offsets = write_log(path, [b"a" * 10, b"b" * 10, b"c" * 10])
    data = bytearray(path.read_bytes())
    data[offsets[1] + (2 if where == "frame header" else FRAME.size + 3)] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(DurableLogCorruptError, match="CRC mismatch") as caught:
        read_all(path, tail_may_tear=True)
    assert (caught.value.path, caught.value.offset) == (path, offsets[1])
    assert str(caught.value).startswith(f"{path}: at byte offset {offsets[1]}: ")


def test_an_unknown_record_type_is_corruption_even_at_the_tail(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_bytes(file_header(MAGIC, 1, 7) + frame(9, b"zz"))
    with pytest.raises(DurableLogCorruptError, match="unknown record type 9") as caught:
        read_all(path, tail_may_tear=True)
    assert caught.value.offset == FILE_HEADER.size


@pytest.mark.parametrize("content", [b"", b"ETLR", bytes(100)], ids=["empty", "short", "zeros"])
def test_a_torn_creation_is_reported_not_read(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "log"
    path.write_bytes(content)
    file, bodies = read_all(path, tail_may_tear=True)
    assert not file.created and bodies == [] and file.valid == 0
    with pytest.raises(DurableLogCorruptError) as caught:
        read_all(path, tail_may_tear=False)
    assert caught.value.offset == 0


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (file_header(b"OTHERLOG", 1, 7), "bad magic b'OTHERLOG': not a test log"),
        (file_header(MAGIC, 1, 7)[:-1] + b"\x00", "file header CRC mismatch"),
        (file_header(MAGIC, 2, 7), "unsupported TEST format version 2"),
        (file_header(MAGIC, 1, 8), "header says segment 8, file name says 7"),
    ],
)
def test_a_bad_header_is_corruption_at_offset_zero(tmp_path: Path, header: bytes, reason: str) -> None:
    path = tmp_path / "log"
    path.write_bytes(header + frame(1, b"a"))
    with pytest.raises(DurableLogCorruptError) as caught:
        FramedFile(path, FORMAT, 7, tail_may_tear=True)
    assert (caught.value.offset, caught.value.reason) == (0, reason)


# ---------------------------------------------------------------------------------------------------
# Both logs, one reader


class _CutSpy:
    """Records every FramedFile.cut_tail that found a tail to cut: (path, format label)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cuts: list[tuple[Path, str]] = []
        original = FramedFile.cut_tail

        def cut_tail(file: FramedFile, *, fsync: bool) -> bool:
            cut = original(file, fsync=fsync)
            if cut:
                self.cuts.append((file.path, file.format.label))
            return cut

        monkeypatch.setattr(FramedFile, "cut_tail", cut_tail)


def _cut(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _first_frame_end(path: Path) -> int:
    """Where the frame after the file header ends."""
    length: int = FRAME.unpack_from(path.read_bytes(), FILE_HEADER.size)[0]
    return FILE_HEADER.size + FRAME.size + length


def _wal_with_two_saves(data_dir: Path) -> tuple[Path, int]:
    """A WAL whose last save is the second; returns its segment and the size after the first save."""
    options = StorageOptions(segment_bytes=4096, fsync=False)
    storage, _ = RaftStorage.open(data_dir, options)
    storage.append([Entry(1, 1, data=b"one")])
    segment = _only_file(data_dir / "wal", "*.wal")
    first = _size(segment)
    storage.append([Entry(2, 1, data=b"two" * 10)])
    storage.close()
    return segment, first


def _size(path: Path) -> int:
    return path.stat().st_size


def _only_file(directory: Path, pattern: str) -> Path:
    (path,) = directory.glob(pattern)
    return path


async def _dlq_with_two_puts(directory: Path) -> tuple[Path, int]:
    store = await dlq.DeadLetterStore.open(directory, fsync=False)
    await store.put([dataplane_pb2.DeadLetter(pipeline="p", error="one")])
    segment = _only_file(directory, "*.dlq")
    first = _size(segment)
    await store.put([dataplane_pb2.DeadLetter(pipeline="p", error="two" * 10)])
    await store.close()
    return segment, first


async def test_a_torn_tail_is_cut_on_both_logs_by_the_shared_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wal_segment, wal_first = _wal_with_two_saves(tmp_path / "raft")
    dlq_segment, dlq_first = await _dlq_with_two_puts(tmp_path / "dlq")
    _cut(wal_segment, wal_first + 20)  # the second record half written
    _cut(dlq_segment, dlq_first + 20)
    spy = _CutSpy(monkeypatch)

    storage, state = RaftStorage.open(tmp_path / "raft", StorageOptions(segment_bytes=4096, fsync=False))
    storage.close()
    store = await dlq.DeadLetterStore.open(tmp_path / "dlq", fsync=False)
    try:
        assert len(store) == 1
    finally:
        await store.close()

    assert [entry.index for entry in state.entries] == [1]
    assert spy.cuts == [(wal_segment, "WAL"), (dlq_segment, "DLQ")]
    assert (_size(wal_segment), _size(dlq_segment)) == (wal_first, dlq_first)


async def test_a_corrupt_frame_in_the_middle_is_reported_with_file_and_offset_on_both_logs(
    tmp_path: Path,
) -> None:
    wal_segment, wal_first = _wal_with_two_saves(tmp_path / "raft")
    dlq_segment, dlq_first = await _dlq_with_two_puts(tmp_path / "dlq")
    # The first save / put is followed by another: a flipped byte in it cannot be a torn tail.
    _flip(wal_segment, wal_first - 2)
    _flip(dlq_segment, dlq_first - 2)
    wal_frame = _first_frame_end(wal_segment)  # the first save follows the segment's state record

    with pytest.raises(DurableLogCorruptError, match="record CRC mismatch") as wal_error:
        RaftStorage.open(tmp_path / "raft", StorageOptions(segment_bytes=4096, fsync=False))
    with pytest.raises(DurableLogCorruptError, match="record CRC mismatch") as dlq_error:
        dlq.DeadLetterStore(tmp_path / "dlq", fsync=False)
    assert (wal_error.value.path, wal_error.value.offset) == (wal_segment, wal_frame)
    assert (dlq_error.value.path, dlq_error.value.offset) == (dlq_segment, 24)
    assert isinstance(wal_error.value, raft_storage.StorageCorruptError)
    assert isinstance(dlq_error.value, dlq.DeadLetterStoreCorruptError)


# ---------------------------------------------------------------------------------------------------
# Lock, errors, thread


def test_the_lock_refuses_a_second_opener_until_released(tmp_path: Path) -> None:
    lock = DirectoryLock(tmp_path, "TestLog")
    with pytest.raises(DurableLogLockedError, match=f"{tmp_path} is in use by another TestLog"):
        DirectoryLock(tmp_path, "TestLog")
    lock.release()
    lock.release()  # a second release does nothing
    DirectoryLock(tmp_path, "TestLog").release()


async def test_both_logs_refuse_a_second_opener_with_the_shared_error(tmp_path: Path) -> None:
    storage, _ = RaftStorage.open(tmp_path / "raft", StorageOptions(segment_bytes=4096, fsync=False))
    store = await dlq.DeadLetterStore.open(tmp_path / "dlq", fsync=False)
    try:
        with pytest.raises(DurableLogLockedError, match="another RaftStorage"):
            RaftStorage.open(tmp_path / "raft", StorageOptions(segment_bytes=4096, fsync=False))
        with pytest.raises(DurableLogLockedError, match="another DeadLetterStore"):
            dlq.DeadLetterStore(tmp_path / "dlq", fsync=False)
    finally:
        storage.close()
        await store.close()


def test_one_family_of_errors() -> None:
    assert raft_storage.StorageError is dlq.DeadLetterStoreError is DurableLogError
    assert raft_storage.StorageLockedError is dlq.DeadLetterStoreLockedError
    assert raft_storage.StorageFailedError is dlq.DeadLetterStoreFailedError
    assert issubclass(dlq.DeadLetterStoreFullError, DurableLogError)


async def test_the_storage_thread_runs_calls_in_order_on_one_thread() -> None:
    thread = StorageThread("test-storage")
    seen: list[tuple[int, str]] = []
    try:
        await asyncio.gather(
            *(thread.run(lambda n=n: seen.append((n, threading.current_thread().name))) for n in range(20))
        )
    finally:
        thread.shutdown(wait=True)
    assert [n for n, _ in seen] == list(range(20))
    assert len({name for _, name in seen}) == 1 and seen[0][1].startswith("test-storage")
