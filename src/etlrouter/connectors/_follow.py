"""Following a growing file: wake the moment it changes (inotify on Linux), or poll where it cannot.

`FileWatch(path)` watches the file's inode (the one a reader holds open) for writes, truncation and
metadata changes. `mode` says how: "inotify", or "poll" when inotify is not available (not Linux, no libc
symbol, the per-user watch limit reached, a file system that cannot be watched) — then waiting is a plain
timeout of `poll_s`, as before inotify.

inotify is reached through ctypes (libc's inotify_init1 / inotify_add_watch) and the event loop's
add_reader, not through a library: it is three calls and a read of a non-blocking descriptor, and a
dependency (asyncinotify, inotify_simple) would bring a lock change and an image change for that.

Use it the lost-wakeup-free way: note `generation` before reading the file, and after reading nothing
`await watch.wait_past(generation, timeout)`; a change between the read and the wait returns at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

from etlrouter.sdk.services import Wakeup

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_MASK = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE

_libc: Any = None


def _inotify() -> Any:
    """libc with the inotify symbols, or None."""
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
                libc.inotify_init1.argtypes = [ctypes.c_int]
                libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
                _libc = libc
            except (OSError, AttributeError):
                pass
    return _libc or None


def open_watch(path: str | Path, mask: int = _MASK) -> int:
    """A non-blocking inotify descriptor watching `path` for `mask`; -1 where inotify does not exist (not
    Linux, no such libc symbol). Raises OSError when it exists but cannot be set up. Readable when
    something happened; read and discard its events with os.read until BlockingIOError."""
    libc = _inotify()
    if libc is None:
        return -1
    fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, os.strerror(err), str(path))
    return fd


class FileWatch:
    """Wakes waiters when `path` changes; see the module docstring."""

    def __init__(self, path: str | Path, *, poll_s: float = 0.05, use_inotify: bool = True) -> None:
        self.path = Path(path)
        self.poll_s = poll_s
        self.mode = "poll"
        self.wakeup = Wakeup()
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        if use_inotify:
            self._fd = self._open_inotify()
            if self._fd >= 0:
                self.mode = "inotify"

    def _open_inotify(self) -> int:
        try:
            return open_watch(self.path, _MASK)
        except OSError as e:
            log.warning("cannot watch %s with inotify (%s): polling it", self.path, e.strerror)
            return -1

    @property
    def generation(self) -> int:
        return self.wakeup.generation

    def start(self) -> None:
        """Begin delivering change events (on the running loop)."""
        if self._fd >= 0 and self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._on_readable)

    def _on_readable(self) -> None:
        changed = False
        while True:  # drain: the events themselves do not matter, only that there were some
            try:
                if not os.read(self._fd, 64 * 1024):
                    break
                changed = True
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                log.warning("reading inotify events for %s failed (%r): polling it", self.path, e)
                self._stop_inotify()
                changed = True
                break
        if changed:
            self.wakeup.notify()

    async def wait_past(self, generation: int, timeout: float) -> bool:
        """Until the file changed after `generation` (True) or `timeout` seconds passed (False); when
        polling, at most `poll_s` (and False: nothing tells a poll whether the file changed)."""
        if self.mode == "inotify":
            return await self.wakeup.wait_past(generation, timeout)
        if timeout > 0:
            await asyncio.sleep(min(self.poll_s, timeout))
        return False

    def _stop_inotify(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None:
            with contextlib.suppress(Exception):  # the loop may be closed already
                self._loop.remove_reader(self._fd)
            self._loop = None
        os.close(self._fd)
        self._fd = -1
        self.mode = "poll"

    def close(self) -> None:
        self._stop_inotify()
