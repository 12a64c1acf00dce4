"""Process lifecycle: one asyncio loop (uvloop when installed), SIGTERM/SIGINT graceful shutdown.

A component starts, runs until it finishes or a signal arrives, then drains (stops taking new work and
finishes what it has) within a deadline, then stops. A second signal skips the rest of the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

log = logging.getLogger(__name__)
_T = TypeVar("_T")

LAG_PROBE_INTERVAL_S = 0.25


async def watch_event_loop_lag(interval_s: float = LAG_PROBE_INTERVAL_S) -> None:
    """Sleep `interval_s` over and over and observe how late each wake-up is: a blocked or overloaded loop
    delays every timer (Raft ticks, heartbeats, deadlines) by that much. Runs until cancelled."""
    from etlrouter.core.metrics import EVENT_LOOP_LAG  # the registry imports prometheus: only when serving

    while True:
        started = time.monotonic()
        await asyncio.sleep(interval_s)
        EVENT_LOOP_LAG.observe(max(0.0, time.monotonic() - started - interval_s))


class StartupError(Exception):
    """A role cannot start for a reason the operator must fix (a port in use, an unusable data directory);
    `str()` is one line naming the problem and the setting. The process exits with code 2, no traceback."""


def listen_error(address: str, setting: str, error: OSError) -> StartupError:
    reason = error.strerror or str(error)
    return StartupError(f"cannot listen on {address}: {reason} (set by {setting})")


class Component(Protocol):
    async def start(self) -> None: ...

    async def wait(self) -> None:
        """Returns when the component finished on its own (e.g. a bounded run); else waits forever."""

    async def drain(self) -> None: ...

    async def stop(self) -> None: ...


# glibc serves an allocation above its mmap threshold (128 KiB at first) with a fresh mmap(), and gives
# the top of the heap back to the kernel once more than the trim threshold is free there. A batch is a
# few 100 KB buffers allocated and freed several times per hop (encode, frame, read, decode), so by
# default each of them cost page faults and zeroed pages: 20-30% of a forwarding process's CPU, measured
# (docs/adr/0002-transport-tuning.md). Fixed thresholds keep such buffers in the heap and reuse them.
MALLOC_MMAP_THRESHOLD = 4 << 20
MALLOC_TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameter numbers (malloc.h)
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_batch_buffers_in_heap() -> bool:
    """Set glibc's mmap and trim thresholds (above) for this process; True when set. Not on other C
    libraries, and not when the operator set either threshold in the environment (glibc reads those)."""
    if (
        sys.platform != "linux"
        or platform.libc_ver()[0] != "glibc"
        or any(k in os.environ for k in _MALLOC_ENV)
    ):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def run_loop(main: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run main() on uvloop when it is installed, else on the default asyncio loop."""
    keep_batch_buffers_in_heap()
    try:
        import uvloop
    except ImportError:  # non-Linux platforms
        return asyncio.run(main())
    return uvloop.run(main())


async def serve(component: Component, *, drain_deadline_s: float) -> None:
    """Start the component, wait for a signal (or its own end), drain within the deadline, stop."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("signal received: draining", extra={"fields": {"signal": signal.Signals(signum).name}})
            stop_requested.set()
        else:
            log.warning("second signal: stopping now")
            drain_task.cancel()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    drain_task: asyncio.Task[None] | asyncio.Future[None] = loop.create_future()
    lag_probe = asyncio.ensure_future(watch_event_loop_lag())
    try:
        try:
            await component.start()
        except OSError as error:
            # An OS refusal while starting is the environment's, not a bug: say it in one line.
            raise StartupError(f"cannot start: {error}") from error
        await _first_of(stop_requested.wait(), component.wait())
        drain_task = asyncio.ensure_future(component.drain())
        try:
            await asyncio.wait_for(asyncio.shield(drain_task), drain_deadline_s)
        except TimeoutError:
            log.warning("drain deadline passed: stopping", extra={"fields": {"deadline_s": drain_deadline_s}})
            drain_task.cancel()
        except asyncio.CancelledError:
            if not drain_task.cancelled():
                raise
    finally:
        lag_probe.cancel()
        with contextlib.suppress(Exception):
            await component.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _first_of(*aws: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
