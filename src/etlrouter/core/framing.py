"""The on-disk framing shared by the Raft WAL and the sidecar's dead-letter store: one format, one place.

A file starts with a header: magic (8 bytes), format version (u32), sequence number (u64), CRC32 of those
20 bytes. Records follow, each framed as body length (u32) | type (u8) | CRC32 of the body (u32) | CRC32 of
the 9 bytes before it (u32) | body, little-endian. The header's own CRC means a damaged length field is caught
as corruption instead of passing for a torn tail.

Both sides live here: `file_header` and `frame` write, `FramedFile` reads a whole file (recovery) and
`frame_body` checks one frame read back by offset. The reading rule, for every log:

- A file whose tail may tear (one written after its last fsync: the newest WAL or DLQ segment, any DLQ
  tombstone file) ends at the first frame that runs past the end of the file, or is damaged and followed
  only by zeros (what a filesystem leaves where a write never landed). That tail is cut off with a warning;
  nothing in it was ever acknowledged. Such a file shorter than its header, or all zeros, is a creation the
  crash interrupted (`FramedFile.created` is False).
- Everything else that does not check out -- a bad header, a damaged frame with data after it, a record
  type the log does not know, any damage in a file whose tail cannot tear -- raises
  `DurableLogCorruptError` with the file and the byte offset of the frame.

What a record means (decoding its body, record versions, replay rules) is the caller's: frames are yielded
one at a time, so a caller's error at an earlier frame is reported before a framing error at a later one,
and a file is only ever truncated (`cut_tail`) after all of it checked out.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from etlrouter.core.durable import DurableLogCorruptError

__all__ = [
    "FILE_HEADER",
    "FRAME",
    "FRAME_CHECKED",
    "FileFormat",
    "Frame",
    "FramedFile",
    "file_header",
    "frame",
    "frame_body",
    "fsync_dir",
    "is_zero",
    "parse_seq",
]

FILE_HEADER = struct.Struct("<8sIQI")
FRAME = struct.Struct("<IBII")
FRAME_CHECKED = struct.Struct("<IBI")


def frame(kind: int, body: bytes) -> bytes:
    checked = FRAME_CHECKED.pack(len(body), kind, zlib.crc32(body))
    return checked + struct.pack("<I", zlib.crc32(checked)) + body


def file_header(magic: bytes, version: int, seq: int) -> bytes:
    head = magic + struct.pack("<IQ", version, seq)
    return head + struct.pack("<I", zlib.crc32(head))


def frame_body(raw: bytes) -> bytes | None:
    """The body of one whole frame read back by its offset and length; None when the body CRC is wrong."""
    body = raw[FRAME.size :]
    return body if zlib.crc32(body) == FRAME.unpack_from(raw, 0)[2] else None


def is_zero(data: memoryview) -> bool:
    """True when `data` holds only zero bytes (what a filesystem shows where writes never landed)."""
    return not data.tobytes().strip(b"\x00")


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (created, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_seq(name: str, suffix: str) -> int | None:
    """The sequence number of a file named `<16 hex digits><suffix>`, None for any other name."""
    stem = name[: -len(suffix)] if name.endswith(suffix) else ""
    try:
        return int(stem, 16) if len(stem) == 16 else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True, slots=True)
class FileFormat:
    """One kind of framed file: what its header must say, which records it holds, how to name it."""

    magic: bytes
    version: int
    kinds: Collection[int]  # the record types a file of this kind may hold
    label: str  # the log's name in messages: "WAL", "DLQ"
    description: str  # for a bad magic: "not <description>"
    log: logging.Logger  # where torn tails are reported: the owning module's logger


@dataclass(frozen=True, slots=True)
class Frame:
    offset: int  # of the frame header in the file
    kind: int
    body: memoryview

    @property
    def size(self) -> int:
        """Bytes of the whole frame, header included."""
        return FRAME.size + len(self.body)


class FramedFile:
    """A framed file read whole into memory and checked by the rules in the module docstring.

    Construction reads the file and checks its header (raising DurableLogCorruptError); iterating yields
    the frames in order, checking each before it is yielded. After a complete iteration `valid` is the
    length of the good prefix: `cut_tail` truncates the file to it.
    """

    def __init__(self, path: Path, fmt: FileFormat, seq: int, *, tail_may_tear: bool) -> None:
        self.path = path
        self.format = fmt
        self.tail_may_tear = tail_may_tear
        self.data = memoryview(path.read_bytes())
        self.size = len(self.data)
        # The crash hit the file's creation: nothing in it was ever acknowledged.
        self.created = not (tail_may_tear and (self.size < FILE_HEADER.size or is_zero(self.data)))
        self.valid = FILE_HEADER.size if self.created else 0
        if self.created:
            self._check_header(seq)

    def _check_header(self, seq: int) -> None:
        fmt, size = self.format, self.size
        if size < FILE_HEADER.size:
            raise self._corrupt(0, f"file header is {size} bytes, expected {FILE_HEADER.size}")
        magic, version, header_seq, header_crc = FILE_HEADER.unpack_from(self.data, 0)
        if magic != fmt.magic:
            raise self._corrupt(0, f"bad magic {bytes(magic)!r}: not {fmt.description}")
        if zlib.crc32(self.data[: FILE_HEADER.size - 4]) != header_crc:
            raise self._corrupt(0, "file header CRC mismatch")
        if version != fmt.version:
            raise self._corrupt(0, f"unsupported {fmt.label} format version {version}")
        if header_seq != seq:
            raise self._corrupt(0, f"header says segment {header_seq}, file name says {seq}")

    def __iter__(self) -> Iterator[Frame]:
        if not self.created:
            return
        data, size, offset = self.data, self.size, FILE_HEADER.size
        while offset < size:
            problem, torn, length, kind = self._check_frame(offset)
            if problem is not None:
                if not torn:
                    raise self._corrupt(offset, problem)
                self.format.log.warning(
                    "%s %s: torn tail at byte offset %d (%s); discarding it",
                    self.format.label,
                    self.path,
                    offset,
                    problem,
                )
                break
            body_start = offset + FRAME.size
            yield Frame(offset, kind, data[body_start : body_start + length])
            offset = body_start + length
            self.valid = offset

    def _check_frame(self, offset: int) -> tuple[str | None, bool, int, int]:
        """(problem or None, whether the problem is a torn tail, body length, type) of the frame at `offset`.

        A torn write leaves the file short or zero-filled past some point, so a damaged frame is torn only
        when nothing but zeros follows it; a length that runs past the end is trusted only because the
        frame header's own CRC checked out.
        """
        data, size, tear = self.data, self.size, self.tail_may_tear
        if size - offset < FRAME.size:
            return "frame header runs past the end of the file", tear, 0, 0
        length, kind, body_crc, header_crc = FRAME.unpack_from(data, offset)
        body_start = offset + FRAME.size
        if zlib.crc32(data[offset : offset + FRAME_CHECKED.size]) != header_crc:
            return "frame header CRC mismatch", tear and is_zero(data[body_start:]), 0, 0
        end = body_start + length
        if end > size:
            return f"record of {length} bytes runs past the end of the file", tear, 0, 0
        if zlib.crc32(data[body_start:end]) != body_crc:
            return "record CRC mismatch", tear and is_zero(data[end:]), 0, 0
        if kind not in self.format.kinds:
            return f"unknown record type {kind}", False, 0, 0
        return None, False, length, kind

    def _corrupt(self, offset: int, reason: str) -> DurableLogCorruptError:
        return DurableLogCorruptError(self.path, offset, reason)

    def corrupt(self, frame: Frame, reason: str) -> DurableLogCorruptError:
        """The error for a frame that framed well but whose record the caller cannot accept."""
        return self._corrupt(frame.offset, reason)

    def cut_tail(self, *, fsync: bool) -> bool:
        """Truncates the file to its good prefix (after iterating it); returns whether there was a tail."""
        if self.valid >= self.size:
            return False
        with open(self.path, "r+b") as fh:
            fh.truncate(self.valid)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        return True
