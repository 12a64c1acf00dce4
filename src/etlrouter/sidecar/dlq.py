"""The sidecar's durable dead-letter queue.

Layout of a DLQ directory::

    LOCK                    flock()ed by the one DeadLetterStore that owns the directory
    <seq:016x>.dlq          letter segments: DeadLetter records, appended to the newest segment only
    <seq:016x>.tomb         removals (tombstones) of letters held by the segment of the same number

Every file = 24-byte header (magic, format version, segment number, header CRC) followed by frames.
Frame = body length (u32) | type (u8) | CRC32 of body (u32) | CRC32 of the preceding 9 bytes (u32) | body,
little-endian: the framing of the Raft WAL, written and read by core/framing.py. A LETTER body is the
encoded `etlrouter.v1.DeadLetter`; a TOMBSTONE body is the msgpack encoding of the versioned
`TombstoneRecord`.

Keeping a segment's tombstones beside it (not in the newest segment) means a segment and its tombstones
go away together: once every letter of a segment is removed, `<n>.dlq` is deleted, then `<n>.tomb`, and
no other file can resurrect or depend on them.

Durability contract: when `put` returns, the letters are on stable storage (one fdatasync shared by every
put that was waiting: group commit); when `remove` returns, the removals are. With `fsync=False` nothing is
ever synced (tests only).

Recovery on open (the rule of core/framing.py's FramedFile, shared with the WAL): a torn tail -- a partial
or zero-filled final frame of the newest segment, or of any tombstone file, left by a crash before its
fsync -- is cut off with a warning (nothing in it was ever acknowledged). Anything else that does not check
out raises `DeadLetterStoreCorruptError` naming the file and byte offset, and leaves the files as they
are; letters are never dropped silently.

Compaction (after every `remove`, and before a put is refused): a segment (other than the newest) whose
live letters fill less than half of it has them copied to the newest segment, synced; then every segment
without live letters is deleted, its `.dlq` before its `.tomb`. A crash between the copy and the deletion
leaves two copies of a letter; replay keeps the later one, against which later removals were written.

Bound: `max_bytes` bounds the bytes of all files. When a put would exceed it (even after compaction),
`put` raises `DeadLetterStoreFullError` and stores nothing: the engine stops acknowledging the source
(backpressure) until letters are redriven or removed. Compaction may exceed the bound transiently, by
at most the live letters it copies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import enum
import functools
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import msgspec
from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge

from etlrouter._proto.v1 import dataplane_pb2
from etlrouter.core import framing
from etlrouter.core.durable import (
    DirectoryLock,
    DurableLogCorruptError,
    DurableLogError,
    DurableLogFailedError,
    DurableLogLockedError,
    StorageThread,
    fdatasync,
)
from etlrouter.core.durable import write_all as _write_all  # a module name: tests make writes fail through it
from etlrouter.core.framing import (
    FILE_HEADER,
    FileFormat,
    Frame,
    FramedFile,
    file_header,
    frame_body,
    fsync_dir,
    parse_seq,
)
from etlrouter.core.metrics import REGISTRY

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "MAX_LIST_LIMIT",
    "DeadLetterStore",
    "DeadLetterStoreClosedError",
    "DeadLetterStoreCorruptError",
    "DeadLetterStoreError",
    "DeadLetterStoreFailedError",
    "DeadLetterStoreFullError",
    "DeadLetterStoreLockedError",
    "InvalidPageTokenError",
    "new_letter_id",
]

log = logging.getLogger(__name__)

FORMAT_VERSION: Final = 1
RECORD_VERSION: Final = 1
SEGMENT_MAGIC: Final = b"ETLRDLQ\x00"
TOMB_MAGIC: Final = b"ETLRDLT\x00"
DEFAULT_LIST_LIMIT: Final = 100
MAX_LIST_LIMIT: Final = 1000
MAX_PAGE_TOKEN_CHARS: Final = 512

_SEG_SUFFIX = ".dlq"
_TOMB_SUFFIX = ".tomb"
_TOKEN_PREFIX = b"dlq1:"

DLQ_RECORDS = Counter(
    "etlrouter_dlq_records_total",
    "Records durably put into the sidecar's dead-letter queue.",
    ["pipeline", "stage", "reason"],
    registry=REGISTRY,
)
DLQ_REMOVED = Counter(
    "etlrouter_dlq_removed_total",
    "Dead letters removed from the sidecar's dead-letter queue (redriven or deleted).",
    registry=REGISTRY,
)
DLQ_REFUSED = Counter(
    "etlrouter_dlq_refused_total",
    "Dead letters refused because the dead-letter queue was full (the source is not acknowledged).",
    registry=REGISTRY,
)
DLQ_BYTES = Gauge("etlrouter_dlq_bytes", "Bytes on disk of the dead-letter queue.", registry=REGISTRY)
DLQ_LETTERS = Gauge("etlrouter_dlq_letters", "Dead letters held by the dead-letter queue.", registry=REGISTRY)


# ---------------------------------------------------------------------------------------------------
# Errors: the durable-log family (core/durable.py) under the names the sidecar knows, and two of its own

DeadLetterStoreError = DurableLogError
DeadLetterStoreCorruptError = DurableLogCorruptError  # (path, offset, reason)
DeadLetterStoreLockedError = DurableLogLockedError  # another DeadLetterStore owns the directory
DeadLetterStoreFailedError = DurableLogFailedError  # a write or fsync failed earlier: reopen the store


class DeadLetterStoreFullError(DurableLogError):
    """A put would grow the store past its `max_bytes` bound; nothing of it was stored."""

    def __init__(self, directory: Path, max_bytes: int, used: int, needed: int) -> None:
        super().__init__(
            f"dead-letter store {directory} is full: {used} of max_bytes={max_bytes} bytes used, "
            f"{needed} more needed; redrive or remove dead letters to make room"
        )
        self.max_bytes = max_bytes
        self.used = used
        self.needed = needed


class DeadLetterStoreClosedError(DurableLogError):
    """The store was closed."""


class InvalidPageTokenError(ValueError):
    """A page token that `list` did not produce."""


# ---------------------------------------------------------------------------------------------------
# Ids and tokens


class _IdClock:
    """Time-ordered, strictly increasing ids: 12 hex digits of ms, 4 of a per-ms sequence, 8 random.

    The random part makes ids of different sidecars distinct; the first 16 digits never repeat or go back
    within a store, even if the wall clock does (`observe` seeds it from the ids found on open).
    """

    def __init__(self) -> None:
        self._ms = 0
        self._seq = -1
        self._lock = threading.Lock()

    def observe(self, letter_id: str) -> None:
        parsed = _parse_id(letter_id)
        if parsed is not None and parsed > (self._ms, self._seq):
            self._ms, self._seq = parsed

    def next(self) -> str:
        with self._lock:
            now = time.time_ns() // 1_000_000
            if now > self._ms:
                self._ms, self._seq = now, 0
            else:
                self._seq += 1
                if self._seq > 0xFFFF:
                    self._ms, self._seq = self._ms + 1, 0
            return f"{self._ms:012x}{self._seq:04x}{secrets.randbits(32):08x}"


def _parse_id(letter_id: str) -> tuple[int, int] | None:
    if len(letter_id) != 24:
        return None
    try:
        return int(letter_id[:12], 16), int(letter_id[12:16], 16)
    except ValueError:
        return None


_ID_CLOCK = _IdClock()


def new_letter_id() -> str:
    """A fresh time-ordered dead-letter id (24 lowercase hex digits)."""
    return _ID_CLOCK.next()


def _encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(_TOKEN_PREFIX + last_id.encode()).decode()


def _decode_token(token: str) -> str:
    if len(token) > MAX_PAGE_TOKEN_CHARS:
        raise InvalidPageTokenError(f"page token is {len(token)} characters, at most {MAX_PAGE_TOKEN_CHARS}")
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii"))
        if not raw.startswith(_TOKEN_PREFIX):
            raise ValueError("wrong prefix")
        return raw[len(_TOKEN_PREFIX) :].decode()
    except (ValueError, binascii.Error, UnicodeError) as exc:
        raise InvalidPageTokenError(f"page token {token[:64]!r} was not returned by ListDeadLetters") from exc


# ---------------------------------------------------------------------------------------------------
# Framing


class RecordType(enum.IntEnum):
    LETTER = 1
    TOMBSTONE = 2


class TombstoneRecord(msgspec.Struct, array_like=True, frozen=True):
    """Removal of letters of the segment the tombstone file belongs to."""

    v: int
    ids: tuple[str, ...]


_tomb_encoder = msgspec.msgpack.Encoder()
_tomb_decoder = msgspec.msgpack.Decoder(TombstoneRecord)


# Both files accept both record types, so a record in the wrong file gets its own message below.
_SEGMENT_FORMAT = FileFormat(
    SEGMENT_MAGIC, FORMAT_VERSION, frozenset(RecordType), "DLQ", "an etlrouter DLQ segment", log
)
_TOMB_FORMAT = FileFormat(
    TOMB_MAGIC, FORMAT_VERSION, frozenset(RecordType), "DLQ", "an etlrouter DLQ tombstone file", log
)


def _frame(kind: RecordType, body: bytes) -> bytes:
    return framing.frame(kind, body)


def _file_header(magic: bytes, seq: int) -> bytes:
    return file_header(magic, FORMAT_VERSION, seq)


def _seg_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:016x}{_SEG_SUFFIX}"


def _tomb_path(directory: Path, seq: int) -> Path:
    return directory / f"{seq:016x}{_TOMB_SUFFIX}"


# ---------------------------------------------------------------------------------------------------
# The index (loop side)


@dataclass(slots=True)
class _Slot:
    id: str
    pipeline: str
    stage_id: str
    error_class: int
    segment: int
    offset: int  # of the frame
    length: int  # of the frame, header included
    live: bool = True


@dataclass(slots=True)
class _SegmentState:
    live: int = 0
    live_bytes: int = 0  # frames of live letters
    seg_bytes: int = 0
    tomb_bytes: int = 0


_FilterKey = tuple[str, str, int]


@dataclass(slots=True)
class _Pending:
    payload: bytes
    slots: list[_Slot]
    letters: list[dataplane_pb2.DeadLetter]
    future: asyncio.Future[None]


@dataclass(slots=True)
class _WriteResult:
    segment: int
    offset: int  # where the payload starts
    created: list[int] = field(default_factory=list)  # segments created (header bytes)


# ---------------------------------------------------------------------------------------------------
# Files (storage-thread side)


class _Files:
    """The open files; only ever used from the store's single storage thread."""

    def __init__(
        self, directory: Path, fsync: bool, segment_bytes: int, active: int, active_size: int
    ) -> None:
        self.dir = directory
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.active = active
        self.active_size = active_size
        self.fd = -1
        if active_size:
            self.fd = os.open(_seg_path(directory, active), os.O_WRONLY | os.O_APPEND)

    def create_segment(self, seq: int) -> int:
        path = _seg_path(self.dir, seq)
        header = _file_header(SEGMENT_MAGIC, seq)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, header)
            if self.fsync:
                os.fsync(fd)
                fsync_dir(self.dir)
        except BaseException:
            os.close(fd)
            raise
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.active, self.active_size = fd, seq, len(header)
        return len(header)

    def append(self, payload: bytes) -> _WriteResult:
        """Appends to the newest segment (starting a new one past `segment_bytes`) and syncs."""
        created: list[int] = []
        if self.fd < 0 or (
            self.active_size + len(payload) > self.segment_bytes and self.active_size > FILE_HEADER.size
        ):
            if self.fd >= 0 and self.fsync:
                fdatasync(self.fd)  # only the newest segment may ever have a torn tail
            self.create_segment(self.active + 1)
            created.append(self.active)
        offset = self.active_size
        _write_all(self.fd, payload)
        self.active_size += len(payload)
        if self.fsync:
            fdatasync(self.fd)
        return _WriteResult(self.active, offset, created)

    def append_tombstones(self, by_segment: dict[int, list[str]]) -> dict[int, int]:
        """Appends and syncs one TOMBSTONE frame per segment; returns bytes added per segment."""
        added: dict[int, int] = {}
        created = False
        for seq, ids in by_segment.items():
            path = _tomb_path(self.dir, seq)
            body = _tomb_encoder.encode(TombstoneRecord(RECORD_VERSION, tuple(ids)))
            payload = _frame(RecordType.TOMBSTONE, body)
            exists = path.exists()
            if not exists:
                payload = _file_header(TOMB_MAGIC, seq) + payload
                created = True
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                _write_all(fd, payload)
                if self.fsync:
                    fdatasync(fd)
            finally:
                os.close(fd)
            added[seq] = len(payload)
        if created and self.fsync:
            fsync_dir(self.dir)
        return added

    def delete_segments(self, seqs: Iterable[int]) -> list[int]:
        """Deletes fully-removed segments (letters first, then their tombstones); returns which."""
        deleted: list[int] = []
        for seq in seqs:
            if seq == self.active:
                continue
            _seg_path(self.dir, seq).unlink(missing_ok=True)
            if self.fsync:  # the letters must be gone before the tombstones that hide them
                fsync_dir(self.dir)
            _tomb_path(self.dir, seq).unlink(missing_ok=True)
            deleted.append(seq)
        if deleted and self.fsync:
            fsync_dir(self.dir)
        return deleted

    def roll_if_empty(self, active_live: int) -> int:
        """Starts a new segment when the active one holds only removed letters; returns header bytes."""
        if active_live == 0 and self.active_size > FILE_HEADER.size:
            if self.fsync and self.fd >= 0:
                fdatasync(self.fd)
            return self.create_segment(self.active + 1)
        return 0

    def read(self, locations: Sequence[tuple[int, int, int]]) -> list[bytes]:
        """Reads frames (segment, offset, length) and returns their letter bodies, in order."""
        bodies: list[bytes] = []
        fds: dict[int, int] = {}
        try:
            for seq, offset, length in locations:
                fd = fds.get(seq)
                if fd is None:
                    fd = fds[seq] = os.open(_seg_path(self.dir, seq), os.O_RDONLY)
                frame = os.pread(fd, length, offset)
                if len(frame) != length:
                    raise DeadLetterStoreCorruptError(
                        _seg_path(self.dir, seq), offset, f"short read: {len(frame)} of {length} bytes"
                    )
                body = frame_body(frame)
                if body is None:
                    raise DeadLetterStoreCorruptError(_seg_path(self.dir, seq), offset, "record CRC mismatch")
                bodies.append(body)
        finally:
            for fd in fds.values():
                os.close(fd)
        return bodies

    def relocate(self, locations: Sequence[tuple[int, int, int]]) -> _WriteResult:
        """Copies letter frames (segment, offset, length) to the newest segment, in order, and syncs."""
        bodies = self.read(locations)
        return self.append(b"".join(_frame(RecordType.LETTER, body) for body in bodies))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---------------------------------------------------------------------------------------------------
# The store


class DeadLetterStore:
    """A durable, bounded, local dead-letter queue (implements `sidecar.model.DeadLetterSink`).

    Construction opens (creating if needed) and locks `directory` and replays it, blocking: from a running
    loop prefer `await DeadLetterStore.open(...)`. Every other call must come from one event loop; disk I/O
    runs on one storage thread, in call order.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 1 << 30,
        fsync: bool = True,
        segment_bytes: int = 16 << 20,
    ) -> None:
        if max_bytes < 4096:
            raise ValueError(f"max_bytes must be at least 4096, got {max_bytes}")
        if segment_bytes < 4096:
            raise ValueError(f"segment_bytes must be at least 4096, got {segment_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._fsync = fsync
        created = not self.directory.is_dir()
        self.directory.mkdir(parents=True, exist_ok=True)
        if created and fsync:
            fsync_dir(self.directory.parent)
        self._lock = DirectoryLock(self.directory, "DeadLetterStore")
        self._by_id: dict[str, _Slot] = {}
        self._order: list[str] = []  # ids, sorted; may hold removed ids until the next rebuild
        self._order_dead = 0
        self._counts: dict[_FilterKey, int] = {}
        self._segments: dict[int, _SegmentState] = {}
        try:
            active, active_size = self._recover()
            self._files = _Files(self.directory, fsync, segment_bytes, active, active_size)
        except BaseException:
            self._lock.release()
            raise
        self._thread = StorageThread("dlq-storage")
        self._mutex = asyncio.Lock()  # one writer at a time: group commit or remove + compaction
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._pending_ids: set[str] = set()
        self._flusher: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._closed = False
        self._publish_gauges()

    @classmethod
    async def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        max_bytes: int = 1 << 30,
        fsync: bool = True,
        segment_bytes: int = 16 << 20,
    ) -> DeadLetterStore:
        """Opens the store on a worker thread (recovery reads every file)."""
        return await asyncio.to_thread(
            lambda: cls(directory, max_bytes=max_bytes, fsync=fsync, segment_bytes=segment_bytes)
        )

    # -- recovery ------------------------------------------------------------------------------------

    def _recover(self) -> tuple[int, int]:
        """Replays every file; returns (active segment, its valid size), (0, 0) when there is none.

        Segments in order, each followed by its tombstones: a letter a compaction copied is then moved to its
        later copy before that copy's segment's removals are applied.
        """
        segs = sorted(self._seqs(_SEG_SUFFIX))
        tombs = set(self._seqs(_TOMB_SUFFIX))
        for seq in sorted(tombs - set(segs)):
            path = _tomb_path(self.directory, seq)
            log.warning(
                "DLQ %s: removing tombstones of deleted segment %d (a crash during compaction)", path, seq
            )
            path.unlink()
        for position, seq in enumerate(segs):
            if self._replay_segment(seq, is_last=position == len(segs) - 1) and seq in tombs:
                self._replay_tombstones(seq)
        self._order.sort()
        if self._segments:
            active = max(self._segments)
            return active, self._segments[active].seg_bytes
        return 0, 0

    def _seqs(self, suffix: str) -> list[int]:
        found = (parse_seq(path.name, suffix) for path in self.directory.iterdir())
        return [seq for seq in found if seq is not None]

    def _replay_segment(self, seq: int, *, is_last: bool) -> bool:
        """Indexes a segment's letters and cuts a torn tail; False when the segment was a torn creation."""
        path = _seg_path(self.directory, seq)
        file = FramedFile(path, _SEGMENT_FORMAT, seq, tail_may_tear=is_last)
        if not file.created:
            log.warning("DLQ %s: segment creation was interrupted by a crash; removing it", path)
            path.unlink()
            _tomb_path(self.directory, seq).unlink(missing_ok=True)
            return False
        self._segments[seq] = _SegmentState()
        for raw in file:
            self._replay_letter(file, raw, seq)
        self._segments[seq].seg_bytes = file.valid
        file.cut_tail(fsync=self._fsync)
        return True

    def _replay_letter(self, file: FramedFile, raw: Frame, seq: int) -> None:
        if raw.kind != RecordType.LETTER:
            raise file.corrupt(raw, "tombstone record in a letter segment")
        letter = dataplane_pb2.DeadLetter()
        try:
            letter.ParseFromString(bytes(raw.body))
        except DecodeError as exc:
            raise file.corrupt(raw, f"undecodable DeadLetter: {exc}") from exc
        if not letter.id:
            raise file.corrupt(raw, "dead letter without an id")
        earlier = self._by_id.get(letter.id)
        if earlier is None:
            slot = _Slot(
                letter.id, letter.pipeline, letter.stage_id, letter.error_class, seq, raw.offset, raw.size
            )
            self._add(slot)
            _ID_CLOCK.observe(letter.id)
        elif earlier.length == raw.size:
            # A compaction copied the letter here and crashed before deleting the old segment: the later
            # copy is the one removals were (and will be) written against.
            self._move(earlier, seq, raw.offset)
        else:
            raise file.corrupt(
                raw,
                f"letter {letter.id!r} differs from its copy in segment {earlier.segment} at byte offset "
                f"{earlier.offset}",
            )

    def _replay_tombstones(self, seq: int) -> None:
        """Applies the removals written against segment `seq` and cuts a torn tail (any tombstone file may
        have one: removals are appended to old segments' files too)."""
        path = _tomb_path(self.directory, seq)
        file = FramedFile(path, _TOMB_FORMAT, seq, tail_may_tear=True)
        if not file.created:
            log.warning("DLQ %s: tombstone file creation was interrupted by a crash; removing it", path)
            path.unlink()
            return
        for raw in file:
            if raw.kind != RecordType.TOMBSTONE:
                raise file.corrupt(raw, "letter record in a tombstone file")
            try:
                record = _tomb_decoder.decode(raw.body)
            except msgspec.DecodeError as exc:
                raise file.corrupt(raw, f"undecodable tombstone record: {exc}") from exc
            if record.v != RECORD_VERSION:
                raise file.corrupt(raw, f"unsupported tombstone record version {record.v}")
            for letter_id in record.ids:
                slot = self._by_id.get(letter_id)
                if slot is not None and slot.segment == seq:
                    self._drop(slot)
        self._segments[seq].tomb_bytes = file.valid
        file.cut_tail(fsync=self._fsync)

    # -- index ---------------------------------------------------------------------------------------

    def _add(self, slot: _Slot) -> None:
        self._by_id[slot.id] = slot
        order = self._order
        if not order or slot.id > order[-1]:
            order.append(slot.id)
        else:
            at = bisect.bisect_left(order, slot.id)
            if at < len(order) and order[at] == slot.id:
                self._order_dead -= 1  # the id of a removed letter is stored again
            else:
                order.insert(at, slot.id)
        key = (slot.pipeline, slot.stage_id, slot.error_class)
        self._counts[key] = self._counts.get(key, 0) + 1
        state = self._segments.setdefault(slot.segment, _SegmentState())
        state.live += 1
        state.live_bytes += slot.length

    def _move(self, slot: _Slot, segment: int, offset: int) -> None:
        """The letter now lives at (segment, offset): a relocated or (on replay) a later copy."""
        old = self._segments[slot.segment]
        old.live -= 1
        old.live_bytes -= slot.length
        slot.segment, slot.offset = segment, offset
        new = self._segments.setdefault(segment, _SegmentState())
        new.live += 1
        new.live_bytes += slot.length

    def _drop(self, slot: _Slot) -> None:
        slot.live = False
        del self._by_id[slot.id]
        self._order_dead += 1
        key = (slot.pipeline, slot.stage_id, slot.error_class)
        left = self._counts[key] - 1
        if left:
            self._counts[key] = left
        else:
            del self._counts[key]
        state = self._segments[slot.segment]
        state.live -= 1
        state.live_bytes -= slot.length
        if self._order_dead > 1024 and self._order_dead * 2 > len(self._order):
            self._order = [i for i in self._order if i in self._by_id]
            self._order_dead = 0

    @property
    def bytes_used(self) -> int:
        """Bytes of every file of the store (what `max_bytes` bounds)."""
        return sum(s.seg_bytes + s.tomb_bytes for s in self._segments.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def _publish_gauges(self) -> None:
        DLQ_BYTES.set(self.bytes_used)
        DLQ_LETTERS.set(len(self._by_id))

    def _check_usable(self) -> None:
        if self._closed:
            raise DeadLetterStoreClosedError(f"dead-letter store {self.directory} is closed")
        if self._failed is not None:
            raise DeadLetterStoreFailedError(
                f"dead-letter store {self.directory} failed earlier ({self._failed}); reopen it"
            )

    # -- put -----------------------------------------------------------------------------------------

    async def put(self, letters: Sequence[dataplane_pb2.DeadLetter]) -> None:
        """Stores the letters durably; returns once they (and every put grouped with them) are fsynced.

        A letter with an empty id gets a fresh time-ordered one (the caller's message is updated). A letter
        whose id is already stored is skipped, so a retried put is idempotent. Raises
        DeadLetterStoreFullError (storing nothing) when the letters do not fit in `max_bytes`.
        """
        self._check_usable()
        frames: list[bytes] = []
        slots: list[_Slot] = []
        accepted: list[dataplane_pb2.DeadLetter] = []
        seen: set[str] = set()
        for letter in letters:
            if not letter.id:
                letter.id = new_letter_id()
            elif letter.id in self._by_id or letter.id in self._pending_ids or letter.id in seen:
                continue
            seen.add(letter.id)
            frame = _frame(RecordType.LETTER, letter.SerializeToString())
            slots.append(
                _Slot(letter.id, letter.pipeline, letter.stage_id, letter.error_class, 0, 0, len(frame))
            )
            frames.append(frame)
            accepted.append(letter)
        if not frames:
            return
        payload = b"".join(frames)
        used = self.bytes_used + self._pending_bytes
        # A new segment costs a header; count one whatever happens so the bound holds.
        needed = len(payload) + FILE_HEADER.size
        if used + needed > self.max_bytes and self._reclaimable():
            await self._reclaim()
            used = self.bytes_used + self._pending_bytes
        if used + needed > self.max_bytes:
            DLQ_REFUSED.inc(len(frames))
            raise DeadLetterStoreFullError(self.directory, self.max_bytes, used, needed)
        if any(letter.id in self._by_id or letter.id in self._pending_ids for letter in accepted):
            # Stored by a concurrent put while this one waited for space: keep put idempotent.
            return await self.put(accepted)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(payload, slots, accepted, future))
        self._pending_bytes += needed
        self._pending_ids.update(seen)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop(), name="dlq-group-commit")
        await asyncio.shield(future)

    async def _flush_loop(self) -> None:
        async with self._mutex:
            while self._pending:
                batch, self._pending = self._pending, []
                payload = b"".join(p.payload for p in batch)
                try:
                    if self._failed is not None:
                        raise DeadLetterStoreFailedError(
                            f"dead-letter store {self.directory} failed earlier ({self._failed}); reopen it"
                        )
                    result = await self._thread.run(functools.partial(self._files.append, payload))
                except BaseException as exc:
                    if self._failed is None:
                        self._failed = exc
                    error = DeadLetterStoreFailedError(
                        f"writing dead letters to {self.directory} failed: {exc}"
                    )
                    for p in batch:
                        self._release(p)
                        if not p.future.done():
                            p.future.set_exception(error)
                    continue
                for seq in result.created:
                    self._segments.setdefault(seq, _SegmentState()).seg_bytes = FILE_HEADER.size
                state = self._segments.setdefault(result.segment, _SegmentState())
                state.seg_bytes += len(payload)
                offset = result.offset
                for p in batch:
                    self._release(p)
                    for slot, letter in zip(p.slots, p.letters, strict=True):
                        slot.segment, slot.offset = result.segment, offset
                        offset += slot.length
                        self._add(slot)
                        DLQ_RECORDS.labels(letter.pipeline, letter.stage_id, letter.reason or "error").inc()
                    if not p.future.done():
                        p.future.set_result(None)
                self._publish_gauges()

    async def _reclaim(self) -> None:
        async with self._mutex:
            self._check_usable()
            try:
                await self._compact()
            except BaseException as exc:
                self._failed = exc
                raise DeadLetterStoreFailedError(f"compacting {self.directory} failed: {exc}") from exc
            finally:
                self._publish_gauges()

    def _release(self, pending: _Pending) -> None:
        self._pending_bytes -= len(pending.payload) + FILE_HEADER.size
        self._pending_ids.difference_update(slot.id for slot in pending.slots)

    # -- reading -------------------------------------------------------------------------------------

    async def get(self, letter_id: str) -> dataplane_pb2.DeadLetter | None:
        """The letter with its record, or None when no such letter is stored."""
        self._check_usable()
        slot = self._by_id.get(letter_id)
        if slot is None:
            return None
        return (await self._read([slot]))[0]

    async def get_many(self, letter_ids: Sequence[str]) -> dict[str, dataplane_pb2.DeadLetter]:
        """The stored letters among `letter_ids`, with their records (missing ids are left out)."""
        self._check_usable()
        slots = [s for s in (self._by_id.get(i) for i in dict.fromkeys(letter_ids)) if s is not None]
        letters = await self._read(slots)
        return {letter.id: letter for letter in letters}

    async def _read(self, slots: Sequence[_Slot]) -> list[dataplane_pb2.DeadLetter]:
        # Called without awaiting in between the index lookup and the submission, so the read is queued
        # before any compaction that could delete the segment (the storage thread runs jobs in order).
        locations = [(s.segment, s.offset, s.length) for s in slots]
        bodies = await self._thread.run(lambda: self._files.read(locations))
        letters: list[dataplane_pb2.DeadLetter] = []
        for slot, body in zip(slots, bodies, strict=True):
            letter = dataplane_pb2.DeadLetter()
            try:
                letter.ParseFromString(body)
            except DecodeError as exc:
                raise DeadLetterStoreCorruptError(
                    _seg_path(self.directory, slot.segment), slot.offset, f"undecodable DeadLetter: {exc}"
                ) from exc
            letters.append(letter)
        return letters

    def _matching_ids(
        self, after: str, pipeline: str, stage_id: str, error_class: int, limit: int
    ) -> list[str]:
        found: list[str] = []
        by_id = self._by_id
        for letter_id in self._order[bisect.bisect_right(self._order, after) if after else 0 :]:
            slot = by_id.get(letter_id)
            if slot is None:
                continue
            if (
                (not pipeline or slot.pipeline == pipeline)
                and (not stage_id or slot.stage_id == stage_id)
                and (not error_class or slot.error_class == error_class)
            ):
                found.append(letter_id)
                if len(found) >= limit:
                    break
        return found

    def count(self, pipeline: str = "", stage_id: str = "", error_class: int = 0) -> int:
        """How many stored letters match the filters (empty / 0 = any)."""
        return sum(
            n
            for (p, s, e), n in self._counts.items()
            if (not pipeline or p == pipeline)
            and (not stage_id or s == stage_id)
            and (not error_class or e == error_class)
        )

    def ids(
        self, pipeline: str = "", stage_id: str = "", error_class: int = 0, limit: int = MAX_LIST_LIMIT
    ) -> list[str]:
        """Ids of stored letters matching the filters, oldest first, at most `limit`."""
        return self._matching_ids("", pipeline, stage_id, error_class, limit)

    async def list(
        self,
        pipeline: str = "",
        stage_id: str = "",
        error_class: int = 0,
        limit: int = DEFAULT_LIST_LIMIT,
        page_token: str = "",
    ) -> tuple[list[dataplane_pb2.DeadLetter], str, int]:
        """One page of letters matching the filters, in id order (oldest first), without their records.

        Returns (letters, next page token or "" on the last page, total matching letters). `limit` 0 means
        DEFAULT_LIST_LIMIT and is capped at MAX_LIST_LIMIT. Raises InvalidPageTokenError for a token `list`
        did not return. Tokens stay valid across restarts (they name the last id returned).
        """
        self._check_usable()
        limit = DEFAULT_LIST_LIMIT if limit <= 0 else min(limit, MAX_LIST_LIMIT)
        after = _decode_token(page_token) if page_token else ""
        found = self._matching_ids(after, pipeline, stage_id, int(error_class), limit + 1)
        more = len(found) > limit
        found = found[:limit]
        total = self.count(pipeline, stage_id, int(error_class))
        letters = await self._read([self._by_id[i] for i in found])
        for letter in letters:
            letter.ClearField("record")
        return letters, (_encode_token(found[-1]) if more else ""), total

    # -- removal -------------------------------------------------------------------------------------

    async def remove(self, letter_ids: Iterable[str]) -> int:
        """Durably removes the letters; returns how many were stored. Frees fully-removed segments."""
        self._check_usable()
        async with self._mutex:
            self._check_usable()
            by_segment: dict[int, list[str]] = {}
            for letter_id in dict.fromkeys(letter_ids):
                slot = self._by_id.get(letter_id)
                if slot is not None:
                    by_segment.setdefault(slot.segment, []).append(letter_id)
            if not by_segment:
                return 0
            try:
                added = await self._thread.run(lambda: self._files.append_tombstones(by_segment))
            except BaseException as exc:
                self._failed = exc
                raise DeadLetterStoreFailedError(
                    f"writing tombstones in {self.directory} failed: {exc}"
                ) from exc
            removed = 0
            for seq, ids in by_segment.items():
                self._segments[seq].tomb_bytes += added[seq]
                for letter_id in ids:
                    slot = self._by_id.get(letter_id)
                    if slot is not None:
                        self._drop(slot)
                        removed += 1
            DLQ_REMOVED.inc(removed)
            try:
                await self._compact()
            except BaseException as exc:
                self._failed = exc
                raise DeadLetterStoreFailedError(f"compacting {self.directory} failed: {exc}") from exc
            finally:
                self._publish_gauges()
            return removed

    def _reclaimable(self) -> bool:
        active = self._files.active
        return any(seq != active and (st.live == 0 or self._sparse(st)) for seq, st in self._segments.items())

    @staticmethod
    def _sparse(state: _SegmentState) -> bool:
        return state.live > 0 and state.live_bytes * 2 < state.seg_bytes

    async def _compact(self) -> None:
        """Frees space (call with the mutex held): copies the live letters of segments that are mostly
        removed letters into the newest segment, then deletes every segment without live letters."""
        active = self._files.active
        sparse = {seq for seq, st in self._segments.items() if seq != active and self._sparse(st)}
        if sparse:
            moving: dict[int, list[_Slot]] = {}
            for slot in self._by_id.values():
                if slot.segment in sparse:
                    moving.setdefault(slot.segment, []).append(slot)
            for seq in sorted(moving):
                slots = sorted(moving[seq], key=lambda slot: slot.offset)
                locations = [(slot.segment, slot.offset, slot.length) for slot in slots]
                result = await self._thread.run(functools.partial(self._files.relocate, locations))
                for created in result.created:
                    self._segments.setdefault(created, _SegmentState()).seg_bytes = FILE_HEADER.size
                self._segments.setdefault(result.segment, _SegmentState()).seg_bytes += sum(
                    slot.length for slot in slots
                )
                offset = result.offset
                for slot in slots:
                    self._move(slot, result.segment, offset)
                    offset += slot.length
                log.info(
                    "DLQ %s: moved %d letters out of segment %d to free it", self.directory, len(slots), seq
                )
        active_state = self._segments.get(self._files.active)
        if active_state is not None and active_state.live == 0:
            header = await self._thread.run(lambda: self._files.roll_if_empty(0))
            if header:
                self._segments[self._files.active] = _SegmentState(seg_bytes=header)
        active = self._files.active
        empty = sorted(seq for seq, s in self._segments.items() if s.live == 0 and seq != active)
        if not empty:
            return
        deleted = await self._thread.run(lambda: self._files.delete_segments(empty))
        for seq in deleted:
            del self._segments[seq]

    # -- lifecycle -----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Waits for queued puts, then closes the files and releases the directory."""
        if self._closed:
            return
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        self._closed = True
        async with self._mutex:
            await self._thread.run(self._files.close)
        self._thread.shutdown(wait=True)
        self._lock.release()
