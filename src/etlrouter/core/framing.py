"""The on-disk framing shared by the Raft WAL and the sidecar's dead-letter store: one format, one place.

A file starts with a header: magic (8 bytes), format version (u32), sequence number (u64), CRC32 of those
20 bytes. Records follow, each framed as body length (u32) | type (u8) | CRC32 of the body (u32) | CRC32 of
the 9 bytes before it (u32) | body, little-endian. The header's own CRC means a damaged length field is caught
as corruption instead of passing for a torn tail.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

FILE_HEADER = struct.Struct("<8sIQI")
FRAME = struct.Struct("<IBII")
FRAME_CHECKED = struct.Struct("<IBI")


def frame(kind: int, body: bytes) -> bytes:
    checked = FRAME_CHECKED.pack(len(body), kind, zlib.crc32(body))
    return checked + struct.pack("<I", zlib.crc32(checked)) + body


def file_header(magic: bytes, version: int, seq: int) -> bytes:
    head = magic + struct.pack("<IQ", version, seq)
    return head + struct.pack("<I", zlib.crc32(head))


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
