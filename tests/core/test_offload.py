"""WorkerPool: heavy work in spawned processes, bounded admission, a deadline that really stops the work."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from etlrouter.core.offload import OverloadedError, WorkerPool, WorkTimeoutError


def pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def spin(seconds: float) -> int:
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:  # CPU-bound, as a parse is: nothing cooperative to interrupt
        n += 1
    return os.getpid()


def fail(message: str) -> None:
    raise ValueError(message)


async def test_work_runs_in_another_process_and_the_worker_is_reused() -> None:
    pool = WorkerPool("test", workers=1, queue=0, deadline_s=30)
    try:
        (pid1, nine), (pid2, sixteen) = await pool.run(pid_and_square, 3), await pool.run(pid_and_square, 4)
        assert (nine, sixteen) == (9, 16)
        assert pid1 == pid2 != os.getpid()
    finally:
        await pool.close()


async def test_the_jobs_exception_reaches_the_caller_and_the_worker_survives() -> None:
    pool = WorkerPool("test", workers=1, queue=0, deadline_s=30)
    try:
        with pytest.raises(ValueError, match="bad input at 3:4"):
            await pool.run(fail, "bad input at 3:4")
        assert (await pool.run(pid_and_square, 2))[1] == 4
    finally:
        await pool.close()


async def test_a_job_past_its_deadline_is_stopped_and_the_loop_stays_free() -> None:
    pool = WorkerPool("test", workers=1, queue=0, deadline_s=0.5)
    try:
        await pool.warm()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        started = time.monotonic()
        with pytest.raises(WorkTimeoutError, match=r"longer than 0\.5 s"):
            await pool.run(spin, 30.0)
        assert time.monotonic() - started < 5  # stopped, not waited for
        task.cancel()
        assert ticks > 10  # the event loop kept running while the worker spun
        _, four = await pool.run(pid_and_square, 2)  # a fresh worker replaced the killed one
        assert four == 4
    finally:
        await pool.close()


async def test_beyond_workers_plus_queue_requests_are_refused_at_once_with_a_hint() -> None:
    pool = WorkerPool("test", workers=1, queue=1, deadline_s=30)
    try:
        await pool.warm()
        running = [asyncio.create_task(pool.run(spin, 1.0)) for _ in range(2)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(OverloadedError) as refused:
            await pool.run(pid_and_square, 1)
        assert time.monotonic() - started < 0.1
        assert refused.value.retry_after_s > 0
        assert "busy with 2 heavy requests" in str(refused.value)
        await asyncio.gather(*running)
        assert (await pool.run(pid_and_square, 5))[1] == 25  # capacity is back
    finally:
        await pool.close()


async def test_a_cancelled_caller_does_not_leave_a_busy_worker_in_the_pool() -> None:
    pool = WorkerPool("test", workers=1, queue=0, deadline_s=30)
    try:
        await pool.warm()
        task = asyncio.create_task(pool.run(spin, 30.0))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started = time.monotonic()
        assert (await pool.run(pid_and_square, 3))[1] == 9
        assert time.monotonic() - started < 10  # not stuck behind the abandoned 30 s job
    finally:
        await pool.close()
