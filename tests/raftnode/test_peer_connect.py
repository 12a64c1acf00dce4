"""A peer whose connects go unanswered does not hold the Raft transport's queue towards it.

A listening socket whose accept queue is full drops further SYNs, as an address nobody answers at does
(a pod gone while its name still resolves to it): connect() would wait for the kernel's SYN retries,
about two minutes. The transport gives up on the stream after its RPC timeout and drops the messages
queued meanwhile, so it tries again soon (CI: a restarted router heard nothing for 131 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import pytest

from etlrouter.core.metrics import REGISTRY
from etlrouter.raft.transport import RaftTransport
from etlrouter.raft.types import Message, MessageType


@pytest.fixture
def unanswered_address() -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers: list[socket.socket] = []
    try:
        # Fill the accept queue (never accepted): the kernel drops the SYNs that come after.
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("etlrouter_raft_messages_dropped_total", {"reason": reason}) or 0.0


async def test_a_peer_that_never_answers_the_connect_does_not_hold_its_queue(unanswered_address: str) -> None:
    transport = RaftTransport("a", "cluster", lambda message: None, rpc_timeout_s=0.5)
    transport.update_peers({"b": unanswered_address})
    before = dropped("peer_unreachable")
    try:
        for _ in range(5):
            transport.send(Message(type=MessageType.HEARTBEAT, sender="a", to="b", term=1))
        deadline = time.monotonic() + 20  # far below the SYN retries' two minutes
        while dropped("peer_unreachable") < before + 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # The first message waited for the connect (bounded); the others were dropped, not held.
        assert dropped("peer_unreachable") >= before + 4
    finally:
        await transport.close()
