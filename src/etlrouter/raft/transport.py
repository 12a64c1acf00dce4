"""Raft messages over grpclib (RaftService in proto/etlrouter/v1/raft.proto).

The core speaks one message type (`types.Message`) and does not care how it travels; this module maps
message kinds onto the RPCs:

- APPEND / HEARTBEAT (and any message without a better route) go on one long-lived AppendEntries stream per
  peer; the peer's answers come back on the same stream. Order per peer is preserved, which is what lets the
  leader pipeline appends.
- VOTE / PRE_VOTE and TIMEOUT_NOW are unary calls; a vote's answer is the call's reply.
- SNAPSHOT carries its data in chunks over the InstallSnapshot client stream; the reply is SNAPSHOT_RESP.

A message that cannot be sent right now is dropped and counted: Raft retries everything it needs (heartbeats,
probes, elections), and queueing stale messages behind a dead connection would only delay recovery.

The server side hands inbound messages to `deliver` (the node's inbox). When the node answers a message that
arrived on a unary call or on a peer's stream, `send` routes the answer back the way the question came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from grpclib.client import Channel
from grpclib.client import Stream as ClientStream
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream
from prometheus_client import Counter

from etlrouter._proto.v1 import raft_grpc, raft_pb2
from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.core.metrics import REGISTRY
from etlrouter.flow.retry import Backoff
from etlrouter.raft.types import (
    ConfState,
    Entry,
    EntryKind,
    Message,
    MessageType,
    NodeId,
    SnapshotMeta,
)
from etlrouter.security.context import Security
from etlrouter.security.identity import ROUTER

log = logging.getLogger(__name__)

MESSAGES_SENT = Counter(
    "etlrouter_raft_messages_sent_total", "Raft messages handed to the network.", ["type"], registry=REGISTRY
)
MESSAGES_RECEIVED = Counter(
    "etlrouter_raft_messages_received_total",
    "Raft messages received from peers.",
    ["type"],
    registry=REGISTRY,
)
MESSAGES_DROPPED = Counter(
    "etlrouter_raft_messages_dropped_total",
    "Raft messages not sent or not delivered, by reason (Raft retries what it needs).",
    ["reason"],
    registry=REGISTRY,
)

_UNARY = frozenset({MessageType.VOTE, MessageType.PRE_VOTE, MessageType.TIMEOUT_NOW})
_ANSWER_OF = {MessageType.VOTE: MessageType.VOTE_RESP, MessageType.PRE_VOTE: MessageType.PRE_VOTE_RESP}
_STREAM_ANSWERS = frozenset({MessageType.APPEND_RESP, MessageType.HEARTBEAT_RESP})
_TYPE_NAMES = {t: t.name.lower() for t in MessageType}


# ---------------------------------------------------------------------------------------------------------
# Conversion between the core's structs and the wire messages.


def to_proto(msg: Message, cluster_id: str) -> raft_pb2.RaftMessage:
    pb = raft_pb2.RaftMessage(
        type=int(msg.type),  # type: ignore[arg-type]
        sender=msg.sender,
        to=msg.to,
        term=msg.term,
        log_term=msg.log_term,
        index=msg.index,
        commit=msg.commit,
        reject=msg.reject,
        reject_hint=msg.reject_hint,
        reject_term=msg.reject_term,
        context=msg.context,
        cluster_id=cluster_id,
    )
    if msg.entries:
        pb.entries.extend(
            raft_pb2.RaftEntry(index=e.index, term=e.term, kind=int(e.kind), data=e.data)  # type: ignore[arg-type]
            for e in msg.entries
        )
    if msg.snapshot is not None:
        meta = msg.snapshot
        pb.snapshot.index, pb.snapshot.term = meta.index, meta.term
        pb.snapshot.conf.voters.extend(meta.conf.voters)
        pb.snapshot.conf.learners.extend(meta.conf.learners)
        pb.snapshot.addresses.update(meta.addresses)
    return pb


def from_proto(pb: raft_pb2.RaftMessage, snapshot_data: bytes = b"") -> Message:
    snapshot = None
    if pb.HasField("snapshot"):
        snapshot = SnapshotMeta(
            index=pb.snapshot.index,
            term=pb.snapshot.term,
            conf=ConfState(voters=tuple(pb.snapshot.conf.voters), learners=tuple(pb.snapshot.conf.learners)),
            addresses=dict(pb.snapshot.addresses),
        )
    return Message(
        type=MessageType(pb.type),
        sender=pb.sender,
        to=pb.to,
        term=pb.term,
        log_term=pb.log_term,
        index=pb.index,
        entries=tuple(Entry(e.index, e.term, EntryKind(e.kind), e.data) for e in pb.entries),
        commit=pb.commit,
        reject=pb.reject,
        reject_hint=pb.reject_hint,
        reject_term=pb.reject_term,
        context=pb.context,
        snapshot=snapshot,
        snapshot_data=snapshot_data,
    )


# ---------------------------------------------------------------------------------------------------------


class RaftTransport:
    """Sends the local node's messages to peers and delivers peers' messages to it.

    `deliver(msg)` must not block (put the message in the node's inbox). `on_snapshot_sent(peer, ok)` tells
    the core whether a snapshot reached a follower, so it can retry or resume replication.
    """

    def __init__(
        self,
        node_id: NodeId,
        cluster_id: str,
        deliver: Callable[[Message], None],
        *,
        on_snapshot_sent: Callable[[NodeId, bool], None] = lambda peer, ok: None,
        transport_config: TransportConfig | None = None,
        security: Security | None = None,
        queue_limit: int = 4096,
        rpc_timeout_s: float = 1.0,
        snapshot_chunk_bytes: int = 1 << 20,
        max_snapshot_bytes: int = 1 << 30,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.deliver = deliver
        self.on_snapshot_sent = on_snapshot_sent
        self.transport_config = transport_config or TransportConfig()
        self.security = security
        self.queue_limit = queue_limit
        self.rpc_timeout_s = rpc_timeout_s
        self.snapshot_chunk_bytes = snapshot_chunk_bytes
        self.max_snapshot_bytes = max_snapshot_bytes
        self._peers: dict[NodeId, _Peer] = {}
        # Answers owed on an open unary call or inbound stream, by (peer, message type).
        self._pending_answers: dict[tuple[NodeId, MessageType], asyncio.Future[Message]] = {}
        self._reply_streams: dict[NodeId, asyncio.Queue[Message]] = {}
        self.service = _RaftService(self)

    # -- sending ---------------------------------------------------------------------------------------

    def update_peers(self, addresses: Mapping[NodeId, str]) -> None:
        """Set the peers' addresses (the membership's address book); peers not listed are closed."""
        for node, address in addresses.items():
            if node == self.node_id or not address:
                continue
            peer = self._peers.get(node)
            if peer is None or peer.address != address:
                if peer is not None:
                    peer.close()
                self._peers[node] = _Peer(self, node, address)
        for node in list(self._peers):
            if node not in addresses:
                self._peers.pop(node).close()

    def peer_addresses(self) -> dict[NodeId, str]:
        return {node: peer.address for node, peer in self._peers.items()}

    def send(self, msg: Message) -> None:
        """Queue a message for its destination; never blocks."""
        MESSAGES_SENT.labels(_TYPE_NAMES[msg.type]).inc()
        waiting = self._pending_answers.pop((msg.to, msg.type), None)
        if waiting is not None and not waiting.done():
            waiting.set_result(msg)
            return
        reply_stream = self._reply_streams.get(msg.to) if msg.type in _STREAM_ANSWERS else None
        if reply_stream is not None and reply_stream.qsize() < self.queue_limit:
            reply_stream.put_nowait(msg)
            return
        peer = self._peers.get(msg.to)
        if peer is None:
            MESSAGES_DROPPED.labels("unknown_peer").inc()
            return
        peer.enqueue(msg)

    async def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        await asyncio.gather(*(p.closed() for p in self._peers.values()), return_exceptions=True)
        self._peers.clear()
        for fut in self._pending_answers.values():
            fut.cancel()

    # -- receiving -------------------------------------------------------------------------------------

    def accept(self, pb: raft_pb2.RaftMessage, snapshot_data: bytes = b"") -> Message | None:
        """Check and deliver one inbound message; None when it was refused."""
        if pb.cluster_id != self.cluster_id:
            MESSAGES_DROPPED.labels("wrong_cluster").inc()
            raise GRPCError(
                Status.FAILED_PRECONDITION,
                f"message for cluster {pb.cluster_id!r} reached node {self.node_id!r} "
                f"of cluster {self.cluster_id!r}",
            )
        if pb.to != self.node_id:
            MESSAGES_DROPPED.labels("wrong_node").inc()
            return None
        msg = from_proto(pb, snapshot_data)
        MESSAGES_RECEIVED.labels(_TYPE_NAMES[msg.type]).inc()
        self.deliver(msg)
        return msg

    async def answer_to(self, question: raft_pb2.RaftMessage, answer_type: MessageType) -> Message:
        """Deliver `question` and wait for the node's answer of `answer_type` to its sender."""
        key = (question.sender, answer_type)
        previous = self._pending_answers.get(key)
        if previous is not None:
            previous.cancel()
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending_answers[key] = fut
        try:
            if self.accept(question) is None:
                raise GRPCError(Status.FAILED_PRECONDITION, f"message addressed to {question.to!r}")
            return await asyncio.wait_for(fut, self.rpc_timeout_s)
        except TimeoutError:
            raise GRPCError(Status.UNAVAILABLE, "the node did not answer in time") from None
        finally:
            if self._pending_answers.get(key) is fut:
                del self._pending_answers[key]


class _RaftService(raft_grpc.RaftServiceBase):
    def __init__(self, transport: RaftTransport) -> None:
        self.t = transport

    async def AppendEntries(self, stream: Stream[raft_pb2.RaftMessage, raft_pb2.RaftMessage]) -> None:
        replies: asyncio.Queue[Message] = asyncio.Queue()
        sender: NodeId | None = None
        writer: asyncio.Task[None] | None = None

        async def write() -> None:
            while True:
                msg = await replies.get()
                await stream.send_message(to_proto(msg, self.t.cluster_id))

        try:
            async for pb in stream:
                if sender is None:
                    sender = pb.sender
                    self.t._reply_streams[sender] = replies
                    writer = asyncio.ensure_future(write())
                self.t.accept(pb)
        finally:
            if sender is not None and self.t._reply_streams.get(sender) is replies:
                del self.t._reply_streams[sender]
            if writer is not None:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await writer

    async def RequestVote(self, stream: Stream[raft_pb2.RaftMessage, raft_pb2.RaftMessage]) -> None:
        question = await stream.recv_message()
        assert question is not None
        answer_type = _ANSWER_OF.get(MessageType(question.type))
        if answer_type is None:
            raise GRPCError(Status.INVALID_ARGUMENT, f"RequestVote carries {MessageType(question.type).name}")
        answer = await self.t.answer_to(question, answer_type)
        await stream.send_message(to_proto(answer, self.t.cluster_id))

    async def InstallSnapshot(
        self, stream: Stream[raft_pb2.InstallSnapshotChunk, raft_pb2.RaftMessage]
    ) -> None:
        first = await stream.recv_message()
        if first is None or not first.HasField("message"):
            raise GRPCError(Status.INVALID_ARGUMENT, "the first InstallSnapshot chunk must carry the message")
        parts, size = [first.data], len(first.data)
        last = first.last
        while not last:
            chunk = await stream.recv_message()
            if chunk is None:
                raise GRPCError(Status.INVALID_ARGUMENT, "snapshot stream ended before the last chunk")
            if chunk.offset != size:
                raise GRPCError(
                    Status.INVALID_ARGUMENT, f"snapshot chunk at offset {chunk.offset}, expected {size}"
                )
            size += len(chunk.data)
            if size > self.t.max_snapshot_bytes:
                raise GRPCError(
                    Status.RESOURCE_EXHAUSTED, f"snapshot larger than {self.t.max_snapshot_bytes} bytes"
                )
            parts.append(chunk.data)
            last = chunk.last
        question = first.message
        key = (question.sender, MessageType.SNAPSHOT_RESP)
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.t._pending_answers[key] = fut
        try:
            self.t.accept(question, b"".join(parts))
            answer = await asyncio.wait_for(fut, max(self.t.rpc_timeout_s, 10.0))
        except TimeoutError:
            raise GRPCError(Status.UNAVAILABLE, "the node did not install the snapshot in time") from None
        finally:
            if self.t._pending_answers.get(key) is fut:
                del self.t._pending_answers[key]
        await stream.send_message(to_proto(answer, self.t.cluster_id))

    async def TimeoutNow(self, stream: Stream[raft_pb2.RaftMessage, raft_pb2.TimeoutNowResponse]) -> None:
        question = await stream.recv_message()
        assert question is not None
        self.t.accept(question)
        await stream.send_message(raft_pb2.TimeoutNowResponse())


_CONNECTION_ERRORS = (GRPCError, StreamTerminatedError, OSError, ConnectionError, asyncio.TimeoutError)
# How long messages to an unreachable peer are dropped before the stream is tried again: 50 ms doubling
# to 1 s. No jitter: nothing sleeps on it (the next message after the deadline tries), and Raft's own
# timers already spread the attempts.
_RECONNECT = Backoff(base=0.05, cap=1.0, jitter=0.0)


class _Peer:
    """The outgoing side towards one peer: a queue, one AppendEntries stream, unary calls on the side."""

    def __init__(self, transport: RaftTransport, node: NodeId, address: str) -> None:
        self.t = transport
        self.node = node
        self.address = address
        self.channel: Channel = open_channel(address, transport.transport_config, transport.security, ROUTER)
        self.stub = raft_grpc.RaftServiceStub(self.channel)
        self.queue: asyncio.Queue[Message] = asyncio.Queue(maxsize=transport.queue_limit)
        self._stream: ClientStream[raft_pb2.RaftMessage, raft_pb2.RaftMessage] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._retry_at = 0.0
        self._failures = 0  # consecutive connection failures (the backoff's exponent)
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._task = asyncio.ensure_future(self._run())

    def enqueue(self, msg: Message) -> None:
        try:
            self.queue.put_nowait(msg)
        except asyncio.QueueFull:
            MESSAGES_DROPPED.labels("queue_full").inc()

    def close(self) -> None:
        self._task.cancel()
        for task in self._side_tasks:
            task.cancel()

    async def closed(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._reset_stream()
        self.channel.close()

    async def _run(self) -> None:
        while True:
            msg = await self.queue.get()
            if msg.type in _UNARY:
                self._spawn(self._unary(msg))
            elif msg.type is MessageType.SNAPSHOT:
                self._spawn(self._snapshot(msg))
            elif await self._ensure_stream():
                try:
                    assert self._stream is not None
                    await self._stream.send_message(to_proto(msg, self.t.cluster_id))
                except _CONNECTION_ERRORS as e:
                    self._failed(e)
                    await self._reset_stream()
                    MESSAGES_DROPPED.labels("send_failed").inc()
            else:
                MESSAGES_DROPPED.labels("peer_unreachable").inc()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _failed(self, error: BaseException) -> None:
        self._failures += 1
        self._retry_at = time.monotonic() + _RECONNECT.delay(self._failures)
        log.debug("raft peer %s (%s) unreachable: %r", self.node, self.address, error)

    async def _ensure_stream(self) -> bool:
        if self._stream is not None and self._reader is not None and not self._reader.done():
            return True
        await self._reset_stream()
        if time.monotonic() < self._retry_at:
            return False
        stream = self.stub.AppendEntries.open()
        try:
            # Bounded like the unary calls: a connect whose SYNs go unanswered (a pod gone, its name
            # still resolving to its old address) would otherwise hold this peer's queue for the
            # kernel's two-minute SYN retry, and the restarted peer would hear nothing for as long.
            async with asyncio.timeout(self.t.rpc_timeout_s):
                await stream.__aenter__()
                await stream.send_request()
        except _CONNECTION_ERRORS as e:
            self._failed(e)
            with contextlib.suppress(Exception):
                await stream.__aexit__(None, None, None)
            return False
        self._stream = stream
        self._failures = 0
        self._reader = asyncio.ensure_future(self._read(stream))
        return True

    async def _read(self, stream: ClientStream[raft_pb2.RaftMessage, raft_pb2.RaftMessage]) -> None:
        try:
            while (pb := await stream.recv_message()) is not None:
                self.t.accept(pb)
        except _CONNECTION_ERRORS as e:
            self._failed(e)

    async def _reset_stream(self) -> None:
        stream, self._stream = self._stream, None
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
        if stream is not None:
            with contextlib.suppress(Exception):
                await stream.cancel()
            with contextlib.suppress(Exception):
                await stream.__aexit__(None, None, None)

    async def _unary(self, msg: Message) -> None:
        pb = to_proto(msg, self.t.cluster_id)
        try:
            if msg.type is MessageType.TIMEOUT_NOW:
                await self.stub.TimeoutNow(pb, timeout=self.t.rpc_timeout_s)
            else:
                answer = await self.stub.RequestVote(pb, timeout=self.t.rpc_timeout_s)
                self.t.accept(answer)
        except _CONNECTION_ERRORS as e:
            log.debug("raft %s to %s failed: %r", msg.type.name, self.node, e)
            MESSAGES_DROPPED.labels("send_failed").inc()

    async def _snapshot(self, msg: Message) -> None:
        data, step = msg.snapshot_data, self.t.snapshot_chunk_bytes
        head = to_proto(msg, self.t.cluster_id)
        ok = False
        try:
            async with self.stub.InstallSnapshot.open(timeout=max(30.0, len(data) / 5e6)) as stream:
                offsets = range(0, max(len(data), 1), step)
                for i, offset in enumerate(offsets):
                    chunk = raft_pb2.InstallSnapshotChunk(
                        data=data[offset : offset + step], offset=offset, last=i == len(offsets) - 1
                    )
                    if i == 0:
                        chunk.message.CopyFrom(head)
                    await stream.send_message(chunk, end=chunk.last)
                answer = await stream.recv_message()
                if answer is not None:
                    self.t.accept(answer)
                    ok = not answer.reject
        except _CONNECTION_ERRORS as e:
            log.warning(
                "sending snapshot to %s failed: %r",
                self.node,
                e,
                extra={"fields": {"bytes": len(data), "crc32": zlib.crc32(data)}},
            )
        self.t.on_snapshot_sent(self.node, ok)
