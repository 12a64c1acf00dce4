"""The asyncio credit gate: waits for grants, and accounts starvation on the injected clock."""

from __future__ import annotations

import asyncio

import pytest

from etlrouter.flow.credits import Credits, CreditSender
from etlrouter.flow.gate import AsyncCreditGate


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_acquire_returns_at_once_when_credits_are_available() -> None:
    gate = AsyncCreditGate(CreditSender(Credits(10, 100)))
    gate.grant(10, 100)
    await asyncio.wait_for(gate.acquire(4, 40), timeout=1.0)
    assert gate.sender.available == Credits(6, 60)


async def test_acquire_waits_for_a_grant_and_measures_starvation() -> None:
    clock = FakeClock()
    gate = AsyncCreditGate(CreditSender(Credits(10, 100)), clock=clock)
    waiter = asyncio.create_task(gate.acquire(5, 50))
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.now = 2.0
    gate.grant(3, 30)  # not enough yet
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.now = 3.0
    gate.grant(7, 70)
    await asyncio.wait_for(waiter, timeout=1.0)
    assert gate.sender.available == Credits(5, 50)
    assert gate.sender.starvation.total_seconds == pytest.approx(3.0)


async def test_cancelled_wait_closes_the_starvation_streak() -> None:
    clock = FakeClock()
    gate = AsyncCreditGate(CreditSender(Credits(10, 100)), clock=clock)
    waiter = asyncio.create_task(gate.acquire(5, 50))
    await asyncio.sleep(0)
    clock.now = 4.0
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.sender.starved_for(100.0) == 0.0
    assert gate.sender.starvation.total_seconds == pytest.approx(4.0)
