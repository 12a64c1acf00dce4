"""What the durable logs share besides their format: the errors, the directory lock, the I/O thread.

The Raft WAL (`raft/storage.py`) and the sidecar's dead-letter store (`sidecar/dlq.py`) both own a directory
of framed files (`core/framing.py`), refuse a second owner, run their blocking I/O on one thread and fail the
same ways. Those parts live here, apart from `framing` (the bytes on disk), because they are about owning a
directory, not about the format.

One family of errors: `StorageCorruptError` and `DeadLetterStoreCorruptError` (and the other pairs) are
names of the classes below, kept by the two modules so their callers read as before. A corrupt WAL and a
corrupt DLQ are the same condition — this file, this byte offset, this reason — and the shared reader
raises it without knowing which log it reads.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

__all__ = [
    "DirectoryLock",
    "DurableLogCorruptError",
    "DurableLogError",
    "DurableLogFailedError",
    "DurableLogLockedError",
    "StorageThread",
    "fdatasync",
    "write_all",
]

_T = TypeVar("_T")

fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class DurableLogError(Exception):
    """Base class of every error a durable log (the Raft WAL, the dead-letter store) raises."""


class DurableLogCorruptError(DurableLogError):
    """The on-disk state is damaged or not ours; `path` and `offset` say where."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class DurableLogLockedError(DurableLogError):
    """Another owner (in this process or another) holds the directory's lock."""


class DurableLogFailedError(DurableLogError):
    """A write or fsync failed earlier (or the log is closed); what is on disk is unknown. Reopen."""


class DirectoryLock:
    """flock(LOCK_EX | LOCK_NB) on `<directory>/LOCK`, held until `release` (or the process ends).

    flock rather than a pid file: the kernel drops it when the owner dies, so a crash never leaves a stale
    lock behind. It is per open file description, so a second opener in the same process is refused too.
    """

    def __init__(self, directory: Path, owner: str) -> None:
        """Raises DurableLogLockedError naming `directory` when another `owner` holds it."""
        fd = os.open(directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DurableLogLockedError(f"{directory} is in use by another {owner}") from exc
        self._fd: int | None = fd

    def release(self) -> None:
        """Releases the lock; a second call does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StorageThread:
    """Runs a log's blocking calls on one worker thread, in call order, never two at once.

    A single-thread executor rather than asyncio.to_thread under a lock: a cancelled await cannot stop a
    thread in the middle of an fsync, and with a lock the next call would then run beside it. A call
    cancelled before its turn is skipped.
    """

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, call: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def shutdown(self, *, wait: bool) -> None:
        self._executor.shutdown(wait=wait)


def write_all(fd: int, payload: bytes) -> None:
    """os.write until all of `payload` is written (a write may be short)."""
    view = memoryview(payload)
    while view:
        written = os.write(fd, view)
        view = view[written:]
