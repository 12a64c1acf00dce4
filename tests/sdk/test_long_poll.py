"""Long-poll PullRecords in the SDK: a source that answers at once and calls `notify()` has its empty pulls
held until it notifies or the pull's wait_ms runs out; a source that never notifies is answered as it
returns, as before."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from etlrouter.sdk import Capabilities, Pulled, Record, Source, serving
from etlrouter.sdk.services import Wakeup
from tests.sdk.grpc_helpers import channel_to, pull

# Far longer than any test waits for an answer: a pull that returns before it was woken, not timed out.
HUGE_WAIT_MS = 60_000


class Queue(Source):
    """Answers every pull at once with what it has; `put` adds a record and, when `notifies`, notifies."""

    capabilities = Capabilities(name="queue")

    def __init__(self, notifies: bool = True) -> None:
        self.notifies = notifies
        self.pending: list[Record] = []
        self.offset = 0
        self.pulls = 0
        if notifies:
            self.notify()  # opts in to long polls before the first pull

    def put(self, value: bytes) -> None:
        self.pending.append(Record(value=value, offset=self.offset))
        self.offset += 1
        if self.notifies:
            self.notify()

    async def pull(
        self, *, max_records: int, max_bytes: int, wait_ms: int, partitions: Sequence[int]
    ) -> Pulled:
        self.pulls += 1
        taken, self.pending = self.pending[:max_records], self.pending[max_records:]
        return Pulled(taken)

    async def acknowledge(self, partition: int, up_to_offset: int) -> None:
        return None


async def test_a_held_pull_answers_as_soon_as_the_source_notifies() -> None:
    source = Queue()
    async with serving(source) as host, channel_to(host.address) as channel:
        call = asyncio.ensure_future(pull(channel, 10, wait_ms=HUGE_WAIT_MS))
        await asyncio.sleep(0.2)
        assert not call.done(), "an empty pull of a notifying source was not held"
        source.put(b"x")
        reply = await asyncio.wait_for(call, 10)  # long before the minute of wait_ms
    assert reply.batch.header.record_count == 1 and not reply.end_of_stream
    assert source.pulls == 2  # the empty one, then the one after the notify


async def test_a_held_pull_answers_empty_when_its_wait_runs_out() -> None:
    source = Queue()
    async with serving(source) as host, channel_to(host.address) as channel:
        loop = asyncio.get_running_loop()
        started = loop.time()
        reply = await asyncio.wait_for(pull(channel, 10, wait_ms=300), 10)
        took = loop.time() - started
    assert reply.batch.header.record_count == 0 and not reply.end_of_stream
    assert took >= 0.25  # held for (about) its wait, not answered at once


async def test_a_source_that_never_notifies_is_answered_at_once_whatever_the_wait() -> None:
    source = Queue(notifies=False)
    async with serving(source) as host, channel_to(host.address) as channel:
        empty = await asyncio.wait_for(pull(channel, 10, wait_ms=HUGE_WAIT_MS), 10)
        source.put(b"x")
        full = await asyncio.wait_for(pull(channel, 10, wait_ms=HUGE_WAIT_MS), 10)
    assert empty.batch.header.record_count == 0
    assert full.batch.header.record_count == 1
    assert source.pulls == 2


async def test_a_notify_between_the_read_and_the_wait_is_not_lost() -> None:
    wakeup = Wakeup()
    seen = wakeup.generation
    wakeup.notify()  # after the caller looked, before it waits
    assert await asyncio.wait_for(wakeup.wait_past(seen, HUGE_WAIT_MS / 1000), 10)
    assert not await wakeup.wait_past(wakeup.generation, 0.01)
