"""CPU-heavy request work in worker processes, off the event loop that drives Raft.

A router's event loop sends Raft heartbeats every tick; a request that keeps it busy for seconds (a 1 MiB DSL
document that is all punctuation, say) makes the followers elect. `WorkerPool` runs such work in separate
processes, so the loop only waits on a pipe:

- admission: at most `workers` jobs run and `queue` more wait; beyond that `OverloadedError` at once, with a
  retry hint (the APIs answer RESOURCE_EXHAUSTED) — a flood of heavy requests costs the loop nothing;
- a deadline per job: a job still running at its deadline is stopped by killing its worker (which is then
  replaced), and `WorkTimeoutError` says so — the caller's own deadline is reported as the leader's, not as
  an unreachable cluster;
- workers are started with `spawn` (a fork of a process with running threads and an event loop is unsafe),
  lazily, and kept for the next job; they run at a lower priority (nice 5) than the router itself, and a
  job's deadline starts once its worker is up.

The functions sent must be importable top-level functions and their arguments and results picklable.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import SpawnProcess
from typing import Any, ParamSpec, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from etlrouter.core.metrics import REGISTRY

_P = ParamSpec("_P")
_T = TypeVar("_T")

JOBS = Counter(
    "etlrouter_offload_jobs_total",
    "Heavy request jobs by outcome: ok, error (the job raised), timeout (stopped at its deadline), crashed "
    "(the worker died), rejected (the pool was full).",
    ["pool", "outcome"],
    registry=REGISTRY,
)
JOB_SECONDS = Histogram(
    "etlrouter_offload_job_seconds",
    "Wall time of a heavy request job in its worker process, queueing excluded.",
    ["pool"],
    buckets=(0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
WAITING = Gauge(
    "etlrouter_offload_waiting", "Heavy request jobs waiting for a worker.", ["pool"], registry=REGISTRY
)


class OverloadedError(Exception):
    """The pool is full; `retry_after_s` is a hint for the client."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class WorkTimeoutError(TimeoutError):
    """A job ran past its deadline and was stopped."""


class WorkerCrashedError(RuntimeError):
    """The worker process died while running a job (killed, out of memory)."""


@dataclass(frozen=True, slots=True)
class _Failure:
    """An exception raised by the job, carried back as text when it does not pickle."""

    error: BaseException | None
    text: str


def _serve(conn: multiprocessing.connection.Connection, niceness: int) -> None:
    """A worker's loop: run each (function, args, kwargs) received and send back the result or the error."""
    # Below the router itself: on a busy node the Raft loop and the data plane get the CPU first.
    with contextlib.suppress(OSError):
        os.nice(niceness)
    conn.send(("ready", None))  # started and imported: a job's deadline covers the job alone
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        fn, args, kwargs = job
        try:
            reply: Any = ("ok", fn(*args, **kwargs))
        except BaseException as e:  # the job's own error goes back to the caller, whatever it is
            reply = ("error", _Failure(e, "".join(traceback.format_exception_only(e)).strip()))
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result or error: send its text
            conn.send(("error", _Failure(None, f"{type(e).__name__}: {e}")))


class _Worker:
    def __init__(self, context: multiprocessing.context.SpawnContext, name: str, niceness: int) -> None:
        """Start a worker and wait until it is ready (blocking: called in a thread)."""
        parent, child = context.Pipe()
        self.conn = parent
        self.process: SpawnProcess = context.Process(
            target=_serve, args=(child, niceness), name=name, daemon=True
        )
        self.process.start()
        child.close()
        try:
            ready = self.conn.recv()
        except (EOFError, OSError):
            raise WorkerCrashedError(
                f"worker {name} did not start (exit code {self.process.exitcode})"
            ) from None
        assert ready == ("ready", None), ready

    async def call(self, job: tuple[Any, ...]) -> tuple[str, Any]:
        """Send a job and wait for its reply, ("ok", result) or ("error", _Failure).

        Both ends of the pipe are blocking calls in a thread: a 1 MiB argument or a long rendering never
        holds the event loop, and a job that is given up on ends its thread when its worker is killed."""
        try:
            return await asyncio.to_thread(self._exchange, job)
        except (EOFError, OSError):
            code = self.process.exitcode
            raise WorkerCrashedError(f"worker {self.process.name} died (exit code {code})") from None

    def _exchange(self, job: tuple[Any, ...]) -> tuple[str, Any]:
        self.conn.send(job)
        reply: tuple[str, Any] = self.conn.recv()
        return reply

    def kill(self) -> None:
        # The pipe is not closed here: a thread may still be blocked reading it (closing an fd in use
        # invites fd reuse); it sees EOF once the process is gone, and the pipe closes with this object.
        self.process.kill()

    def close(self) -> None:
        self.conn.close()  # the worker's recv() sees EOF and returns
        self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()


class WorkerPool:
    """`workers` processes, a bounded queue and a deadline per job; see the module docstring."""

    def __init__(
        self, name: str, *, workers: int = 1, queue: int = 8, deadline_s: float = 10.0, niceness: int = 5
    ) -> None:
        if workers < 1 or queue < 0 or deadline_s <= 0:
            raise ValueError("need workers >= 1, queue >= 0, deadline_s > 0")
        self.name = name
        self.deadline_s = deadline_s
        self.niceness = niceness
        self.capacity = workers + queue
        self._context = multiprocessing.get_context("spawn")
        self._idle: list[_Worker] = []
        self._slots = asyncio.Semaphore(workers)
        self._admitted = 0
        self._started = 0
        self._closed = False
        self._recent_s = 0.5  # a running estimate of a job's duration, for the retry hint

    async def run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """`fn(*args, **kwargs)` in a worker: OverloadedError when full, WorkTimeoutError at the deadline."""
        if self._closed:
            raise RuntimeError(f"the {self.name} pool is closed")
        if self._admitted >= self.capacity:
            JOBS.labels(self.name, "rejected").inc()
            retry = round(max(0.1, self._recent_s * (1 + self._admitted - self.capacity / 2)), 1)
            raise OverloadedError(
                f"the router is busy with {self._admitted} heavy requests ({self.name}); retry in {retry} s",
                retry,
            )
        self._admitted += 1
        waiting = WAITING.labels(self.name)
        waiting.inc()
        try:
            await self._slots.acquire()
        except BaseException:
            waiting.dec()
            self._admitted -= 1
            raise
        waiting.dec()
        try:
            kind, value = await self._run_one((fn, args, kwargs))
        finally:
            self._slots.release()
            self._admitted -= 1
        if kind == "ok":
            return value  # type: ignore[no-any-return]
        assert isinstance(value, _Failure)
        if value.error is not None:
            raise value.error
        raise RuntimeError(value.text)

    async def _run_one(self, job: tuple[Any, ...]) -> tuple[str, Any]:
        worker = self._idle.pop() if self._idle else await self._spawn()
        started = time.perf_counter()
        outcome = "timeout"
        try:
            reply = await asyncio.wait_for(worker.call(job), self.deadline_s)
            outcome = "done"
        except TimeoutError:
            JOBS.labels(self.name, "timeout").inc()
            raise WorkTimeoutError(
                f"the work took longer than {self.deadline_s:g} s and was stopped"
            ) from None
        except WorkerCrashedError:
            outcome = "crashed"
            JOBS.labels(self.name, "crashed").inc()
            raise
        finally:
            if outcome == "timeout":  # also a cancelled caller: the worker is still busy with the job
                with contextlib.suppress(Exception):
                    worker.kill()  # the only way to stop CPU-bound work; a fresh one replaces it on demand
            elapsed = time.perf_counter() - started
            self._recent_s = 0.8 * self._recent_s + 0.2 * elapsed
            JOB_SECONDS.labels(self.name).observe(elapsed)
        JOBS.labels(self.name, reply[0]).inc()
        self._keep(worker)
        return reply

    def _keep(self, worker: _Worker) -> None:
        if self._closed or not worker.process.is_alive():
            worker.kill()
        else:
            self._idle.append(worker)

    async def _spawn(self) -> _Worker:
        self._started += 1
        name = f"etlrouter-{self.name}-{self._started}"
        # Starting an interpreter takes ~0.1-0.3 s of the parent's time in fork/exec: keep it off the loop.
        return await asyncio.to_thread(_Worker, self._context, name, self.niceness)

    async def warm(self) -> None:
        """Start one worker ahead of the first job."""
        if not self._idle and not self._closed:
            self._idle.append(await self._spawn())

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for worker in idle:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(worker.close)
