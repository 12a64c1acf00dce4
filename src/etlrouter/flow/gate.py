"""A thin asyncio wrapper over `CreditSender`: an awaitable credit gate for one edge's sender loop.

All the accounting stays in the pure `CreditSender`; this only turns "not enough credits" into waiting until
the next grant. Time for starvation accounting is the event loop's clock unless another is injected. It is
meant for one sending task per edge (the data-plane stream writer); concurrent acquirers are not queued
fairly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from etlrouter.flow.credits import CreditSender


class AsyncCreditGate:
    def __init__(self, sender: CreditSender, clock: Callable[[], float] | None = None) -> None:
        self.sender = sender
        self._clock = clock
        self._credits_changed = asyncio.Event()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    async def acquire(self, records: int, nbytes: int) -> None:
        """Wait until the batch may be sent, then take its credits."""
        try:
            while not self.sender.try_acquire(records, nbytes, self._now()):
                self._credits_changed.clear()
                await self._credits_changed.wait()
        except asyncio.CancelledError:
            # The sender gave up (shutdown, stream reset): do not count the rest as starvation.
            self.sender.abandon_wait(self._now())
            raise

    def grant(self, records: int, nbytes: int) -> None:
        """Credits arrived from the receiver: wake the waiting sender."""
        self.sender.grant(records, nbytes)
        self._credits_changed.set()

    def reset(self) -> None:
        """The stream broke: void the credits (the waiting sender keeps waiting for the next grant)."""
        self.sender.reset()
