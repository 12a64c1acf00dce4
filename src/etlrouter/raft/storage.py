"""Durable Raft storage: a segmented write-ahead log plus atomically written snapshot files.

Layout of a data directory::

    LOCK                      flock()ed by the one process that owns the directory
    wal/<seq:016x>.wal        log segments, replayed in sequence order
    snap/<index:016x>.snap    snapshot files (the newest `keep_snapshots` are kept)

Segment file = 24-byte header (magic, format version, segment sequence, header CRC) followed by records.
Record frame = body length (u32) | type (u8) | CRC32 of body (u32) | CRC32 of the preceding 9 header
bytes (u32) | body, little-endian. The body is the msgpack encoding of a versioned msgspec Struct
(`v` is its first field). The first record of every segment is a SEGMENT_STATE record (hard state,
snapshot, last log index at creation), so a segment can be replayed without the ones before it:
that is what lets `compact` delete whole segments.

Durability contract (see `RaftStorage.save`):
- when `save(..., sync=True)` or `sync()` returns, everything saved so far is on stable storage;
- when `save(..., sync=False)` returns, the bytes are in the OS page cache: they survive a crash of
  this process, not a power loss, until the next sync;
- with `StorageOptions(fsync=False)` nothing is ever fsynced (tests and benchmarks only).

Recovery (`RaftStorage.open` / `load`): a torn tail (a partial or zero-filled final record of the
LAST segment, left by a crash before its fsync) is cut off with a warning. Anything else that does not
check out -- a bad CRC before the tail, a bad magic, an unknown version, a missing segment, a gap in
indexes -- raises `StorageCorruptError` naming the file and byte offset. Nothing committed is dropped
silently.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec

from etlrouter.core import durable
from etlrouter.core.durable import (
    DirectoryLock,
    DurableLogCorruptError,
    DurableLogError,
    DurableLogFailedError,
    DurableLogLockedError,
    StorageThread,
    write_all,
)
from etlrouter.core.framing import (
    FILE_HEADER,
    FileFormat,
    Frame,
    FramedFile,
    file_header,
    frame,
    fsync_dir,
    parse_seq,
)
from etlrouter.raft.types import Entry, HardState, SnapshotMeta

__all__ = [
    "AsyncRaftStorage",
    "LoadedState",
    "RaftStorage",
    "StorageCorruptError",
    "StorageError",
    "StorageFailedError",
    "StorageLockedError",
    "StorageOptions",
    "load",
]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
RECORD_VERSION: Final = 1
SEGMENT_MAGIC: Final = b"ETLRWAL\x00"
SNAPSHOT_MAGIC: Final = b"ETLRSNP\x00"

# Segment header and record frames: core/framing.py.
# Snapshot file header: magic, format version, meta length, data length, CRC32 over meta + data.
_SNAPSHOT_HEADER = struct.Struct("<8sIIQI")

_WAL_DIR = "wal"
_SNAP_DIR = "snap"
_WAL_SUFFIX = ".wal"
_SNAP_SUFFIX = ".snap"
_TMP_SUFFIX = ".tmp"

# A module-level name: the crash tests replace it to see which syncs happen.
_fdatasync: Callable[[int], None] = durable.fdatasync


# ---------------------------------------------------------------------------------------------------
# Errors (the durable-log family of core/durable.py, under the names Raft callers know) and value types

StorageError = DurableLogError
StorageCorruptError = DurableLogCorruptError  # (path, offset, reason)
StorageLockedError = DurableLogLockedError  # another process (or RaftStorage in this one) owns the directory
StorageFailedError = (
    DurableLogFailedError  # a write or fsync failed earlier, or the storage is closed: reopen
)


@dataclass(frozen=True, slots=True)
class StorageOptions:
    segment_bytes: int = 64 * 1024 * 1024  # a segment is rolled over once it would grow past this
    fsync: bool = True  # False: never fsync (tests and benchmarks only -- nothing is durable)
    keep_snapshots: int = 2  # snapshot files kept on disk, newest first

    def __post_init__(self) -> None:
        if self.segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {self.segment_bytes}")
        if self.keep_snapshots < 1:
            raise ValueError(f"keep_snapshots must be at least 1, got {self.keep_snapshots}")


@dataclass(frozen=True, slots=True)
class LoadedState:
    """What a node restarts from.

    `entries` are contiguous and start right after the snapshot (at index 1 without one). The hard
    state's `commit` may lag the snapshot index (a follower that installed a snapshot); the effective
    commit index is max(hard_state.commit, snapshot.index).
    """

    hard_state: HardState
    snapshot: SnapshotMeta | None
    snapshot_data: bytes | None
    entries: list[Entry] = field(default_factory=list)

    @property
    def first_index(self) -> int:
        return (self.snapshot.index if self.snapshot else 0) + 1

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.entries) - 1


# ---------------------------------------------------------------------------------------------------
# Persisted records. Every body starts with a version so a future format can be told apart.


class RecordType(enum.IntEnum):
    SEGMENT_STATE = 1
    ENTRIES = 2
    HARD_STATE = 3
    TRUNCATE = 4
    SNAPSHOT = 5


class SegmentStateRecord(msgspec.Struct, array_like=True, frozen=True):
    """First record of every segment: the state the segment's records apply on top of."""

    v: int
    hard_state: HardState
    snapshot: SnapshotMeta | None
    last_index: int  # the log's last index when the segment was created


class EntriesRecord(msgspec.Struct, array_like=True, frozen=True):
    v: int
    entries: tuple[Entry, ...]  # contiguous; the first follows the log's last index


class HardStateRecord(msgspec.Struct, array_like=True, frozen=True):
    v: int
    hard_state: HardState


class TruncateRecord(msgspec.Struct, array_like=True, frozen=True):
    v: int
    after: int  # entries with a greater index are discarded


class SnapshotRecord(msgspec.Struct, array_like=True, frozen=True):
    """Written after the snapshot file is durable; from here the log starts after `meta.index`."""

    v: int
    meta: SnapshotMeta
    discard_log: bool  # True: the log did not hold (meta.index, meta.term), so all of it was dropped


class SnapshotFileMeta(msgspec.Struct, array_like=True, frozen=True):
    v: int
    meta: SnapshotMeta


_AnyRecord = SegmentStateRecord | EntriesRecord | HardStateRecord | TruncateRecord | SnapshotRecord

_RECORD_CLASSES: dict[RecordType, type[_AnyRecord]] = {
    RecordType.SEGMENT_STATE: SegmentStateRecord,
    RecordType.ENTRIES: EntriesRecord,
    RecordType.HARD_STATE: HardStateRecord,
    RecordType.TRUNCATE: TruncateRecord,
    RecordType.SNAPSHOT: SnapshotRecord,
}
_DECODERS: dict[int, msgspec.msgpack.Decoder[_AnyRecord]] = {
    int(kind): msgspec.msgpack.Decoder(cls) for kind, cls in _RECORD_CLASSES.items()
}
_encoder = msgspec.msgpack.Encoder()
_snapshot_meta_decoder = msgspec.msgpack.Decoder(SnapshotFileMeta)


def _frame(kind: RecordType, record: _AnyRecord) -> bytes:
    return frame(kind, _encoder.encode(record))


def _segment_header(seq: int) -> bytes:
    return file_header(SEGMENT_MAGIC, FORMAT_VERSION, seq)


def _segment_name(seq: int) -> str:
    return f"{seq:016x}{_WAL_SUFFIX}"


def _snapshot_name(index: int) -> str:
    return f"{index:016x}{_SNAP_SUFFIX}"


# ---------------------------------------------------------------------------------------------------
# Replay: a pure state machine over decoded records. Errors are raised as _ReplayError and turned
# into StorageCorruptError by the reader, which knows the file and offset.


class _ReplayError(Exception):
    pass


class _LogReplay:
    """Rebuilds hard state, snapshot and the log suffix from records, checking every invariant."""

    def __init__(self) -> None:
        self.started = False
        self.hard_state = HardState()
        self.snapshot: SnapshotMeta | None = None
        self.last_index = 0
        # Entries from `known_start` to `last_index`. Entries between the snapshot and `known_start`
        # lived in deleted segments; at the end a snapshot must cover them (see `finish`).
        self.known_start = 1
        self.entries: list[Entry] = []

    @property
    def snapshot_index(self) -> int:
        return self.snapshot.index if self.snapshot else 0

    def segment_state(self, record: SegmentStateRecord) -> None:
        if not self.started:
            self.started = True
            self.hard_state = record.hard_state
            self.snapshot = record.snapshot
            self.last_index = record.last_index
            self.known_start = record.last_index + 1
            if record.last_index < self.snapshot_index:
                raise _ReplayError(
                    f"segment state has last index {record.last_index} below its snapshot index "
                    f"{self.snapshot_index}"
                )
            return
        if record.last_index != self.last_index or record.snapshot != self.snapshot:
            raise _ReplayError(
                f"segment starts at last index {record.last_index} (snapshot "
                f"{record.snapshot.index if record.snapshot else 0}) but the previous segments end at "
                f"{self.last_index} (snapshot {self.snapshot_index}): records are missing"
            )
        if record.hard_state != self.hard_state:
            raise _ReplayError(
                f"segment starts with hard state {record.hard_state} but the previous segments end "
                f"with {self.hard_state}: records are missing"
            )

    def append(self, entries: Sequence[Entry]) -> None:
        expected = self.last_index + 1
        for entry in entries:
            if entry.index != expected:
                raise _ReplayError(f"gap in log: expected entry index {expected}, found {entry.index}")
            expected += 1
        self.entries.extend(entries)
        self.last_index = expected - 1

    def truncate(self, after: int) -> None:
        if after < self.snapshot_index or after > self.last_index:
            raise _ReplayError(
                f"truncation after index {after} outside the log ({self.snapshot_index}, {self.last_index}]"
            )
        if after < self.known_start:
            self.entries.clear()
            self.known_start = after + 1
        else:
            del self.entries[after + 1 - self.known_start :]
        self.last_index = after

    def install_snapshot(self, record: SnapshotRecord) -> None:
        meta = record.meta
        if meta.index <= self.snapshot_index:
            raise _ReplayError(f"snapshot {meta.index} is not newer than snapshot {self.snapshot_index}")
        if record.discard_log or meta.index >= self.last_index:
            self.entries.clear()
            self.last_index = meta.index
            self.known_start = meta.index + 1
        elif meta.index >= self.known_start:
            del self.entries[: meta.index + 1 - self.known_start]
            self.known_start = meta.index + 1
        self.snapshot = meta

    def finish(self) -> str | None:
        """Returns why the replayed log is incomplete, or None when it is whole."""
        if self.known_start > self.snapshot_index + 1 and self.last_index > self.snapshot_index:
            return (
                f"entries {self.snapshot_index + 1}..{self.known_start - 1} are missing: their segments "
                f"were deleted but no snapshot covers them"
            )
        return None


# ---------------------------------------------------------------------------------------------------
# Reading segments


@dataclass(slots=True)
class _SegmentInfo:
    seq: int
    path: Path
    start_last_index: int  # from its SEGMENT_STATE record
    records: int = 1  # records in the segment, its SEGMENT_STATE included


@dataclass(slots=True)
class _WalScan:
    replay: _LogReplay
    segments: list[_SegmentInfo]
    tail_size: int  # valid byte length of the last segment


_SEGMENT_FORMAT = FileFormat(
    magic=SEGMENT_MAGIC,
    version=FORMAT_VERSION,
    kinds=frozenset(_DECODERS),
    label="WAL",
    description="an etlrouter WAL segment",
    log=log,
)


def _decode(file: FramedFile, raw: Frame) -> _AnyRecord:
    kind = RecordType(raw.kind)  # FramedFile only yields the kinds of _SEGMENT_FORMAT
    try:
        record = _DECODERS[kind].decode(raw.body)
    except msgspec.DecodeError as exc:
        raise file.corrupt(raw, f"undecodable {kind.name} record: {exc}") from exc
    if record.v != RECORD_VERSION:
        raise file.corrupt(raw, f"unsupported {kind.name} record version {record.v}")
    return record


def _scan_segment(
    path: Path, seq: int, replay: _LogReplay, is_last: bool
) -> tuple[FramedFile, _SegmentInfo | None]:
    """Replays one segment. Returns (the file, info); info is None for a torn, empty last segment.

    Framing and the torn-tail rule are core/framing.py's (only the last segment's tail may tear, since a
    segment is synced before the next one is created); this adds the WAL's own rule that every segment
    starts with a SEGMENT_STATE record, and the replay's checks.
    """
    file = FramedFile(path, _SEGMENT_FORMAT, seq, tail_may_tear=is_last)
    info: _SegmentInfo | None = None
    for raw in file:
        record = _decode(file, raw)
        try:
            if isinstance(record, SegmentStateRecord):
                if info is not None:
                    raise _ReplayError("second SEGMENT_STATE record in one segment")
                replay.segment_state(record)
                info = _SegmentInfo(seq, path, record.last_index)
                continue
            if info is None:
                raise file.corrupt(raw, "segment does not start with a SEGMENT_STATE record")
            if isinstance(record, EntriesRecord):
                replay.append(record.entries)
            elif isinstance(record, HardStateRecord):
                replay.hard_state = record.hard_state
            elif isinstance(record, TruncateRecord):
                replay.truncate(record.after)
            else:
                replay.install_snapshot(record)
            info.records += 1
        except _ReplayError as exc:
            raise file.corrupt(raw, str(exc)) from exc
    if info is None:
        if is_last:  # the crash hit the segment's creation: nothing in it was ever acknowledged
            return file, None
        raise StorageCorruptError(path, FILE_HEADER.size, "segment has no SEGMENT_STATE record")
    return file, info


def _list_segments(wal_dir: Path) -> list[tuple[int, Path]]:
    found: list[tuple[int, Path]] = []
    for path in wal_dir.iterdir():
        seq = parse_seq(path.name, _WAL_SUFFIX)
        if seq is not None:
            found.append((seq, path))
    found.sort()
    for (seq_a, _), (seq_b, path_b) in itertools.pairwise(found):
        if seq_b != seq_a + 1:
            raise StorageCorruptError(
                path_b, 0, f"segment sequence jumps from {seq_a} to {seq_b}: segments are missing"
            )
    return found


def _scan_wal(wal_dir: Path, repair: bool) -> _WalScan:
    replay = _LogReplay()
    infos: list[_SegmentInfo] = []
    segments = _list_segments(wal_dir)
    tail_size = 0
    for position, (seq, path) in enumerate(segments):
        is_last = position == len(segments) - 1
        file, info = _scan_segment(path, seq, replay, is_last)
        if info is None:
            log.warning("WAL %s: segment creation was interrupted by a crash; removing it", path)
            if repair:
                path.unlink()
            continue
        infos.append(info)
        tail_size = file.valid
        if is_last and repair:
            file.cut_tail(fsync=True)  # synced even with fsync=False: a repair is rare, keep it
    problem = replay.finish()
    if problem is not None:
        first = infos[0].path if infos else wal_dir
        raise StorageCorruptError(first, 0, problem)
    return _WalScan(replay, infos, tail_size)


# ---------------------------------------------------------------------------------------------------
# Snapshot files


def _read_snapshot_file(path: Path, expected: SnapshotMeta) -> bytes:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise StorageCorruptError(
            path, 0, f"snapshot {expected.index} recorded in the WAL is missing"
        ) from exc
    if len(raw) < _SNAPSHOT_HEADER.size:
        raise StorageCorruptError(path, 0, f"snapshot file is {len(raw)} bytes, shorter than its header")
    magic, version, meta_len, data_len, crc = _SNAPSHOT_HEADER.unpack_from(raw, 0)
    if magic != SNAPSHOT_MAGIC:
        raise StorageCorruptError(path, 0, f"bad magic {bytes(magic)!r}: not an etlrouter snapshot")
    if version != FORMAT_VERSION:
        raise StorageCorruptError(path, 0, f"unsupported snapshot format version {version}")
    start = _SNAPSHOT_HEADER.size
    if len(raw) != start + meta_len + data_len:
        raise StorageCorruptError(
            path, len(raw), f"snapshot file is {len(raw)} bytes, header says {start + meta_len + data_len}"
        )
    body = memoryview(raw)[start:]
    if zlib.crc32(body) != crc:
        raise StorageCorruptError(path, start, "snapshot CRC mismatch")
    try:
        file_meta = _snapshot_meta_decoder.decode(body[:meta_len])
    except msgspec.DecodeError as exc:
        raise StorageCorruptError(path, start, f"undecodable snapshot metadata: {exc}") from exc
    if file_meta.v != RECORD_VERSION:
        raise StorageCorruptError(path, start, f"unsupported snapshot metadata version {file_meta.v}")
    if file_meta.meta != expected:
        raise StorageCorruptError(
            path, start, f"snapshot file holds {file_meta.meta}, the WAL recorded {expected}"
        )
    return bytes(body[meta_len:])


def _snapshot_files(snap_dir: Path) -> Iterator[tuple[int, Path]]:
    for path in snap_dir.iterdir():
        index = parse_seq(path.name, _SNAP_SUFFIX)
        if index is not None:
            yield index, path


def _read_state(data_dir: Path, repair: bool) -> tuple[_WalScan, LoadedState]:
    wal_dir = data_dir / _WAL_DIR
    if not wal_dir.is_dir():
        raise FileNotFoundError(f"{wal_dir} does not exist: {data_dir} is not a Raft data directory")
    scan = _scan_wal(wal_dir, repair)
    replay = scan.replay
    snapshot_data = None
    if replay.snapshot is not None:
        snap_path = data_dir / _SNAP_DIR / _snapshot_name(replay.snapshot.index)
        snapshot_data = _read_snapshot_file(snap_path, replay.snapshot)
    state = LoadedState(replay.hard_state, replay.snapshot, snapshot_data, replay.entries)
    return scan, state


def load(data_dir: str | os.PathLike[str]) -> LoadedState:
    """Reads the state in `data_dir` without taking the lock or repairing anything (tools, tests).

    A torn tail is skipped (with a warning) but left on disk; only `RaftStorage.open` cuts it off.
    """
    return _read_state(Path(data_dir), repair=False)[1]


# ---------------------------------------------------------------------------------------------------
# The storage


class RaftStorage:
    """Synchronous, single-threaded Raft storage over one data directory.

    Open with `RaftStorage.open`, which replays the WAL, repairs a torn tail and returns the state to
    restart from. Calls block on disk I/O: from asyncio use `AsyncRaftStorage` (or
    `asyncio.to_thread`), never from two threads at once.
    """

    def __init__(self, data_dir: Path, options: StorageOptions, lock: DirectoryLock, scan: _WalScan) -> None:
        self._dir = data_dir
        self._wal_dir = data_dir / _WAL_DIR
        self._snap_dir = data_dir / _SNAP_DIR
        self._options = options
        self._lock = lock
        self._failed: BaseException | None = None
        replay = scan.replay
        self._hard_state = replay.hard_state
        self._snapshot = replay.snapshot
        self._last_index = replay.last_index
        # Terms as runs [(first index, term)] over (snapshot index, last index]: enough to answer
        # term_at() without keeping the log, which the core holds in memory anyway.
        self._term_runs: list[tuple[int, int]] = []
        for entry in replay.entries:
            if not self._term_runs or self._term_runs[-1][1] != entry.term:
                self._term_runs.append((entry.index, entry.term))
        self._segments = scan.segments
        self._fd = -1
        self._size = 0
        self._records_in_segment = 0
        self._unsynced = True  # the tail may hold writes of a previous process that were never synced
        if self._segments:
            self._fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)
            self._size = scan.tail_size
            self._records_in_segment = self._segments[-1].records
        else:
            self._create_segment(seq=1)

    # -- opening and closing --------------------------------------------------------------------

    @classmethod
    def open(
        cls, data_dir: str | os.PathLike[str], options: StorageOptions | None = None
    ) -> tuple[RaftStorage, LoadedState]:
        """Opens (creating if needed) `data_dir`, locks it, replays it and returns the restart state.

        Raises StorageLockedError if another owner holds the directory and StorageCorruptError if
        the data cannot be trusted. A torn tail of the last segment is cut off with a warning.
        """
        options = options or StorageOptions()
        path = Path(data_dir)
        created = not (path / _WAL_DIR).is_dir() or not (path / _SNAP_DIR).is_dir()
        (path / _WAL_DIR).mkdir(parents=True, exist_ok=True)
        (path / _SNAP_DIR).mkdir(exist_ok=True)
        if created and options.fsync:  # the new directories must survive a power loss too
            fsync_dir(path)
            fsync_dir(path.parent)
        lock = DirectoryLock(path, "RaftStorage")
        try:
            scan, state = _read_state(path, repair=True)
            _clean_snapshot_dir(path / _SNAP_DIR, state.snapshot)
            storage = cls(path, options, lock, scan)
        except BaseException:
            lock.release()
            raise
        return storage, state

    def close(self) -> None:
        """Closes files and releases the lock. Unsynced writes are NOT synced: call sync() first."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._lock.release()

    def __enter__(self) -> RaftStorage:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- what is stored ---------------------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    @property
    def snapshot(self) -> SnapshotMeta | None:
        return self._snapshot

    @property
    def snapshot_index(self) -> int:
        return self._snapshot.index if self._snapshot else 0

    @property
    def last_index(self) -> int:
        return self._last_index

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, the snapshot's term at its index, None if unknown."""
        if self._snapshot is not None and index == self._snapshot.index:
            return self._snapshot.term
        if index <= self.snapshot_index or index > self._last_index:
            return None
        for first, term in reversed(self._term_runs):
            if first <= index:
                return term
        return None

    # -- writing ----------------------------------------------------------------------------------

    def save(
        self,
        *,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        truncate_after: int | None = None,
        sync: bool = True,
    ) -> None:
        """Writes everything one Raft Ready asks for, in one write() call, then fdatasyncs if `sync`.

        Applied in this order: discard entries after `truncate_after` (a point at or below the
        snapshot index means every entry after the snapshot); append `entries` (if the first one is
        at or below the last index, the overlapping suffix is discarded first, as when a new leader
        overwrites the log); record `hard_state`.

        Durability: when this returns with sync=True, this save and every earlier one are on stable
        storage. A changed term or vote MUST be saved with sync=True before any message that depends
        on it (a vote, an append response) is sent. With sync=False the data survives a crash of
        this process but not of the machine until sync() or a later sync=True save returns. After a
        crash a save is recovered whole or as a prefix of its records (truncate, entries, hard
        state), never reordered.

        Raises ValueError for a request that would break the log (a gap, decreasing terms,
        truncating committed or snapshotted entries) or Raft's safety (the term going back, a second
        vote in one term) before writing anything.
        """
        self._check_usable()
        if hard_state is not None:
            self._check_hard_state(hard_state)
        cut = self._plan_truncation(entries, truncate_after)
        frames: list[bytes] = []
        if cut is not None:
            frames.append(_frame(RecordType.TRUNCATE, TruncateRecord(RECORD_VERSION, cut)))
        new_runs = self._check_entries(entries, self._last_index if cut is None else cut)
        if entries:
            frames.append(_frame(RecordType.ENTRIES, EntriesRecord(RECORD_VERSION, tuple(entries))))
        if hard_state is not None and hard_state != self._hard_state:
            frames.append(_frame(RecordType.HARD_STATE, HardStateRecord(RECORD_VERSION, hard_state)))
        if frames:
            self._write(b"".join(frames) if len(frames) > 1 else frames[0])
            self._records_in_segment += len(frames)
            if cut is not None:
                self._truncate_runs(cut)
                self._last_index = cut
            if entries:
                self._term_runs.extend(new_runs)
                self._last_index = entries[-1].index
            if hard_state is not None:
                self._hard_state = hard_state
        if sync:
            self.sync()

    def append(self, entries: Sequence[Entry], *, sync: bool = True) -> None:
        """save(entries=entries, sync=sync)."""
        self.save(entries=entries, sync=sync)

    def set_hard_state(self, hard_state: HardState, *, sync: bool = True) -> None:
        """save(hard_state=hard_state, sync=sync): durable on return unless sync=False."""
        self.save(hard_state=hard_state, sync=sync)

    def truncate_after(self, index: int, *, sync: bool = True) -> None:
        """save(truncate_after=index, sync=sync): discards the entries after `index`."""
        self.save(truncate_after=index, sync=sync)

    def sync(self) -> None:
        """Makes every earlier save durable (one fdatasync: group commit). A no-op with fsync=False."""
        self._check_usable()
        if self._options.fsync and self._unsynced:
            try:
                _fdatasync(self._fd)
                self._unsynced = False
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty pages: never retry.
                self._failed = exc
                raise StorageFailedError(f"fdatasync of {self._segments[-1].path} failed: {exc}") from exc

    # -- snapshots and compaction -------------------------------------------------------------------

    def save_snapshot(self, meta: SnapshotMeta, data: bytes) -> None:
        """Durably stores a snapshot and makes the log start after `meta.index`.

        The file is written to a .tmp name, fsynced, renamed and the directory fsynced; then a
        SNAPSHOT record is appended to the WAL and synced (with every earlier save). If the log
        holds the entry (meta.index, meta.term) the entries after it are kept; otherwise the whole
        log is discarded (Raft's InstallSnapshot rule). Old snapshot files beyond `keep_snapshots`
        are deleted. Segments are only deleted by `compact`.
        """
        self._check_usable()
        if meta.index <= self.snapshot_index:
            raise ValueError(
                f"snapshot index {meta.index} is not newer than the current {self.snapshot_index}"
            )
        meta_bytes = _encoder.encode(SnapshotFileMeta(RECORD_VERSION, meta))
        crc = zlib.crc32(data, zlib.crc32(meta_bytes))
        header = _SNAPSHOT_HEADER.pack(SNAPSHOT_MAGIC, FORMAT_VERSION, len(meta_bytes), len(data), crc)
        final = self._snap_dir / _snapshot_name(meta.index)
        tmp = final.with_name(final.name + _TMP_SUFFIX)
        try:
            with open(tmp, "wb") as fh:
                fh.write(header)
                fh.write(meta_bytes)
                fh.write(data)
                fh.flush()
                if self._options.fsync:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)  # the WAL is untouched: the old snapshot still stands
            raise
        if self._options.fsync:
            fsync_dir(self._snap_dir)
        discard_log = self.term_at(meta.index) != meta.term
        self._write(_frame(RecordType.SNAPSHOT, SnapshotRecord(RECORD_VERSION, meta, discard_log)))
        self._records_in_segment += 1
        if discard_log or meta.index >= self._last_index:
            self._term_runs = []
            self._last_index = meta.index
        else:
            self._drop_runs_through(meta.index)
        self._snapshot = meta
        self.sync()
        self._prune_snapshots()

    def compact(self, index: int) -> int:
        """Deletes whole segments holding only entries at or below `index`; returns how many.

        `index` may not exceed the durable snapshot's index. The segment being written is never
        deleted. Deletion goes oldest first, so a crash leaves a replayable suffix.
        """
        self._check_usable()
        if index > self.snapshot_index:
            raise ValueError(
                f"cannot compact through {index}: the snapshot only covers {self.snapshot_index}"
            )
        removed = 0
        # Segment k holds entries up to the last index its successor started at.
        while len(self._segments) > 1 and self._segments[1].start_last_index <= index:
            victim = self._segments.pop(0)
            victim.path.unlink()
            removed += 1
            if self._options.fsync:  # keep deletions ordered so no gap can appear after a crash
                fsync_dir(self._wal_dir)
        return removed

    # -- internals -----------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise StorageFailedError(f"storage in {self._dir} failed earlier ({self._failed}); reopen it")
        if self._fd < 0:
            raise StorageFailedError(f"storage in {self._dir} is closed")

    def _check_hard_state(self, hard_state: HardState) -> None:
        current = self._hard_state
        if hard_state.term < current.term:
            raise ValueError(f"the term would go back from {current.term} to {hard_state.term}")
        if hard_state.term == current.term and current.vote and hard_state.vote != current.vote:
            raise ValueError(
                f"the vote of term {current.term} would change from {current.vote!r} to "
                f"{hard_state.vote!r}: a node votes at most once per term"
            )

    def _plan_truncation(self, entries: Sequence[Entry], truncate_after: int | None) -> int | None:
        cut = truncate_after
        if cut is not None:
            # Below the snapshot the entries are gone already (a snapshot that replaced the log
            # landed after the core noted the truncation): what is left to discard starts after it.
            cut = max(cut, self.snapshot_index)
            if cut >= self._last_index:
                cut = None  # nothing after it to discard
        base = self._last_index if cut is None else cut
        if entries and entries[0].index <= base:
            cut = entries[0].index - 1
        if cut is None:
            return None
        if cut < self.snapshot_index:
            raise ValueError(
                f"cannot truncate after {cut}: entries up to {self.snapshot_index} are in a snapshot"
            )
        if cut < self._hard_state.commit:
            raise ValueError(
                f"refusing to truncate after {cut}: entries up to {self._hard_state.commit} are committed"
            )
        return cut

    def _check_entries(self, entries: Sequence[Entry], after: int) -> list[tuple[int, int]]:
        """Validates `entries` as the continuation of a log ending at `after`; returns new term runs."""
        runs: list[tuple[int, int]] = []
        if not entries:
            return runs
        expected = after + 1
        last_term = self._term_before(after)
        # Runs only cover entries after the snapshot: an entry right after it always starts a run.
        current = next((term for first, term in reversed(self._term_runs) if first <= after), -1)
        for entry in entries:
            if entry.index != expected:
                raise ValueError(f"entries are not contiguous: expected index {expected}, got {entry.index}")
            if entry.term < last_term:
                raise ValueError(
                    f"entry {entry.index} has term {entry.term} below the previous term {last_term}"
                )
            if entry.term != current:
                runs.append((entry.index, entry.term))
                current = entry.term
            last_term = entry.term
            expected += 1
        return runs

    def _term_before(self, index: int) -> int:
        term = self.term_at(index)
        return 0 if term is None else term

    def _truncate_runs(self, after: int) -> None:
        while self._term_runs and self._term_runs[-1][0] > after:
            self._term_runs.pop()

    def _drop_runs_through(self, index: int) -> None:
        keep: list[tuple[int, int]] = []
        for position, (first, term) in enumerate(self._term_runs):
            next_first = self._term_runs[position + 1][0] if position + 1 < len(self._term_runs) else None
            if next_first is not None and next_first <= index + 1:
                continue  # run lies entirely at or below the snapshot
            keep.append((max(first, index + 1), term))
        self._term_runs = keep

    def _write(self, payload: bytes) -> None:
        if self._size + len(payload) > self._options.segment_bytes and self._records_in_segment > 1:
            self._roll_segment()
        try:
            write_all(self._fd, payload)
        except OSError as exc:
            self._failed = exc
            raise StorageFailedError(f"write to {self._segments[-1].path} failed: {exc}") from exc
        self._size += len(payload)
        self._unsynced = True

    def _roll_segment(self) -> None:
        # The full segment is synced first, so only the last segment can ever have a torn tail.
        self.sync()
        os.close(self._fd)
        self._fd = -1
        self._create_segment(self._segments[-1].seq + 1)

    def _create_segment(self, seq: int) -> None:
        path = self._wal_dir / _segment_name(seq)
        state = SegmentStateRecord(RECORD_VERSION, self._hard_state, self._snapshot, self._last_index)
        payload = _segment_header(seq) + _frame(RecordType.SEGMENT_STATE, state)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            write_all(fd, payload)
            if self._options.fsync:
                os.fsync(fd)
                fsync_dir(self._wal_dir)
        except OSError as exc:
            os.close(fd)
            self._failed = exc
            raise StorageFailedError(f"creating segment {path} failed: {exc}") from exc
        self._fd = fd
        self._size = len(payload)
        self._records_in_segment = 1
        self._unsynced = not self._options.fsync
        self._segments.append(_SegmentInfo(seq, path, self._last_index))

    def _prune_snapshots(self) -> None:
        indexes = sorted(_snapshot_files(self._snap_dir), reverse=True)
        for _, path in indexes[self._options.keep_snapshots :]:
            path.unlink()


def _clean_snapshot_dir(snap_dir: Path, current: SnapshotMeta | None) -> None:
    """Removes leftovers of crashes: .tmp files and snapshots the WAL never recorded."""
    current_index = current.index if current else 0
    for path in snap_dir.iterdir():
        if path.name.endswith(_SNAP_SUFFIX + _TMP_SUFFIX):
            log.warning("removing %s: a snapshot write interrupted by a crash", path)
            path.unlink()
    for index, path in _snapshot_files(snap_dir):
        if index > current_index:
            log.warning("removing %s: snapshot %d was never recorded in the WAL", path, index)
            path.unlink()


class AsyncRaftStorage:
    """Runs a RaftStorage's blocking calls on one worker thread, in call order, never overlapping.

    The thread is core/durable.py's StorageThread (why not asyncio.to_thread: see there). A call
    cancelled before its turn is skipped; its successors then see the log without it (and may be
    refused with ValueError).
    """

    def __init__(self, storage: RaftStorage) -> None:
        self.storage = storage
        self._thread = StorageThread("raft-storage")

    async def save(
        self,
        *,
        hard_state: HardState | None = None,
        entries: Sequence[Entry] = (),
        truncate_after: int | None = None,
        sync: bool = True,
    ) -> None:
        """RaftStorage.save on the storage thread: durable on return when sync=True."""
        await self._thread.run(
            functools.partial(
                self.storage.save,
                hard_state=hard_state,
                entries=entries,
                truncate_after=truncate_after,
                sync=sync,
            )
        )

    async def sync(self) -> None:
        await self._thread.run(self.storage.sync)

    async def save_snapshot(self, meta: SnapshotMeta, data: bytes) -> None:
        await self._thread.run(functools.partial(self.storage.save_snapshot, meta, data))

    async def compact(self, index: int) -> int:
        return await self._thread.run(functools.partial(self.storage.compact, index))

    async def close(self) -> None:
        """Closes the storage after every call queued before it, then stops the thread."""
        try:
            await self._thread.run(self.storage.close)
        finally:
            self._thread.shutdown(wait=False)
