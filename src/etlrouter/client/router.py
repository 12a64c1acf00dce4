"""A client of the router cluster that finds the leader by itself.

Used by `etlrouter ctl`, the sidecar's cluster client and the operator. Give it any router addresses; a
follower that cannot serve a request answers FAILED_PRECONDITION with the leader's address in the
`etlrouter-leader` trailer, and the client follows it. A router that does not answer is skipped; when none
answers within the deadline the call raises `ClusterUnreachableError` (`NoAnswerInTimeError` when a router
took the request but answered late). A router too busy for a heavy request answers RESOURCE_EXHAUSTED with
an `etlrouter-retry-after` trailer: the client waits that long and asks again, within its deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from etlrouter.core.config import TransportConfig
from etlrouter.core.grpc import open_channel
from etlrouter.flow.retry import Backoff
from etlrouter.security.context import Security
from etlrouter.security.identity import ROUTER, Kind

log = logging.getLogger(__name__)

LEADER_TRAILER = "etlrouter-leader"
SESSION_CLIENT = "etlrouter-client-id"
SESSION_SEQ = "etlrouter-seq"
# Sent with RESOURCE_EXHAUSTED by a router whose heavy-request pool is full: seconds to wait before retrying.
RETRY_AFTER = "etlrouter-retry-after"
_Reply = TypeVar("_Reply")
_RETRYABLE = (StreamTerminatedError, ConnectionError, OSError, asyncio.TimeoutError)
# Between rounds over every router: 0.1, 0.2, 0.4, then 0.5 s (jittered, so many clients that lost the same
# leader do not ask again in step); short, since an election takes about a second.
ROUND_BACKOFF = Backoff(base=0.1, cap=0.5)


class ClusterUnreachableError(Exception):
    """No router answered: the cluster is down, or the addresses are wrong."""

    def __init__(self, message: str, *, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # every router refused the connection: nothing listens at the addresses


class NoAnswerInTimeError(ClusterUnreachableError):
    """A router took the request but did not answer before the deadline: it is reachable, and may still be
    working on it (a subclass so callers that handle "no answer" keep working; the message says which)."""


def leader_trailer(leader_id: str, leader_address: str) -> dict[str, str]:
    """Trailing metadata a follower attaches to FAILED_PRECONDITION when it is not the leader. Always set,
    so clients can tell "not the leader (try elsewhere)" from a real precondition failure; the address is
    empty while no leader is known (an election is running)."""
    return {LEADER_TRAILER: f"{leader_id}@{leader_address}"}


class RouterClient:
    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float = 10.0,
        transport_config: TransportConfig | None = None,
        fail_fast_refused: bool = False,
        security: Security | None = None,
    ) -> None:
        if not addresses:
            raise ValueError("RouterClient needs at least one router address")
        self.addresses: list[str] = list(dict.fromkeys(addresses))
        self.timeout = timeout
        self.transport_config = transport_config
        self.security = security
        # A command-line client gives up at once when every router refuses the connection (nothing listens
        # there: waiting for the whole timeout helps no one); long-running clients keep retrying.
        self.fail_fast_refused = fail_fast_refused
        self.leader_address: str | None = None
        self._channels: dict[str, Channel] = {}
        # Client sessions: a write carries (client id, sequence) and its retries reuse them, so the cluster
        # applies it at most once even when an attempt's outcome was unknown. The state machine keeps one
        # sequence per client id and refuses a lower one, and concurrent writes may reach the log in any
        # order: so each write gets its own id (this client's prefix + a counter) with sequence 1.
        self.client_id = uuid.uuid4().hex
        self._writes = itertools.count(1)

    def channel(self, address: str, expect: tuple[Kind, ...] = ROUTER) -> Channel:
        """A channel to a router (or, for ctl's DLQ and tap commands, `expect=("sidecar",)`)."""
        key = f"{address}|{','.join(expect)}"
        if key not in self._channels:
            self._channels[key] = open_channel(address, self.transport_config, self.security, expect)
        return self._channels[key]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    async def call(
        self,
        stub_class: type,
        method: str,
        request: Any,
        *,
        any_node: bool = False,
        write: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Call `stub_class(channel).method(request)` on the leader (or, with any_node, on any router).

        `write=True` attaches a client session so retries of this call are applied at most once.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        metadata = None
        if write:
            metadata = {SESSION_CLIENT: f"{self.client_id}/{next(self._writes)}", SESSION_SEQ: "1"}
        last_error: BaseException | None = None
        attempt = 0
        while time.monotonic() < deadline:
            refused = 0
            candidates = self._candidates(any_node)
            for address in candidates:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                stub = stub_class(self.channel(address))
                try:
                    reply = await self._unary(
                        address, getattr(stub, method), request, min(remaining, 5.0), metadata
                    )
                except _NotLeaderError as e:
                    last_error = e
                    if e.leader_address:
                        self._learn_leader(e.leader_address)
                        break  # retry at the leader at once
                    continue
                except GRPCError as e:
                    if e.status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED):
                        last_error = e
                        self._forget_leader(address)
                        continue
                    raise
                except _NoAnswerError as e:
                    last_error = e
                    continue  # the same leader next round: it is up, only slow
                except _BusyError as e:
                    last_error = e
                    # The router said when to come back: wait that long (never past the deadline), then
                    # ask it again; a client that retried at once would only add to the load.
                    await asyncio.sleep(min(e.retry_after_s, max(0.0, deadline - time.monotonic())))
                    break
                except _RETRYABLE as e:
                    last_error = e
                    refused += isinstance(e, ConnectionRefusedError)
                    self._forget_leader(address)
                    continue
                if not any_node:
                    self.leader_address = address
                return reply
            if self.fail_fast_refused and candidates and refused == len(candidates):
                raise ClusterUnreachableError(
                    f"cannot reach the router cluster at {', '.join(self.addresses)}: connection refused",
                    refused=True,
                )
            attempt += 1
            # Never past the deadline: the last round still gets its chance.
            await asyncio.sleep(min(ROUND_BACKOFF.delay(attempt), max(0.0, deadline - time.monotonic())))
        if isinstance(last_error, _BusyError):
            raise GRPCError(Status.RESOURCE_EXHAUSTED, str(last_error))
        if isinstance(last_error, _NoAnswerError):
            raise NoAnswerInTimeError(
                f"the router at {last_error.address} accepted the request but did not answer within"
                f" {last_error.timeout:.1f} s (it may still be working on it; a longer --timeout may help)"
            )
        raise ClusterUnreachableError(
            f"cannot reach the router cluster at {', '.join(self.addresses)}: {_describe(last_error)}"
        )

    def _candidates(self, any_node: bool) -> list[str]:
        if self.leader_address and not any_node:
            return [self.leader_address, *(a for a in self.addresses if a != self.leader_address)]
        return list(self.addresses)

    def _learn_leader(self, address: str) -> None:
        self.leader_address = address
        if address not in self.addresses:
            self.addresses.append(address)

    def _forget_leader(self, address: str) -> None:
        if self.leader_address == address:
            self.leader_address = None

    @staticmethod
    async def _unary(
        address: str, method: Any, request: Any, timeout: float, metadata: dict[str, str] | None
    ) -> Any:
        sent = False
        try:
            async with method.open(timeout=timeout, metadata=metadata) as stream:
                await stream.send_message(request, end=True)
                sent = True
                return await RouterClient._reply(stream)
        except TimeoutError:
            if sent:  # connected and delivered: the router is up, the answer is late
                raise _NoAnswerError(address, timeout) from None
            raise

    @staticmethod
    async def _reply(stream: Any) -> Any:
        try:
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        except GRPCError as e:
            trailers = dict(stream.trailing_metadata or {})
            trailer = trailers.get(LEADER_TRAILER)
            if e.status == Status.FAILED_PRECONDITION and trailer is not None:
                _, _, address = str(trailer).partition("@")
                raise _NotLeaderError(e.message or "not the leader", address) from e
            retry_after = trailers.get(RETRY_AFTER)
            if e.status == Status.RESOURCE_EXHAUSTED and retry_after is not None:
                raise _BusyError(e.message or "the router is busy", _seconds(retry_after)) from e
            raise
        return reply

    def leader_stream(self, stub_class: type, method: str) -> LeaderStream | None:
        """A long-lived request/reply stream to the router this client last found leading (None: none
        found yet; `call` finds it)."""
        if self.leader_address is None:
            return None
        stub = stub_class(self.channel(self.leader_address))
        return LeaderStream(self, self.leader_address, getattr(stub, method))


class StreamEndedError(Exception):
    """A LeaderStream ended. The caller sends the request again with `RouterClient.call`, which follows
    the leader and reports a refusal exactly as a call does; `status` is the router's, when it gave one."""

    def __init__(self, message: str, status: Status | None = None) -> None:
        super().__init__(message)
        self.status = status


class LeaderStream:
    """One bidirectional stream to a router, used as a series of calls: each `exchange` sends one request
    and waits for its one reply. Any failure ends it with StreamEndedError: which router leads now, or why
    a request was refused, is left to the caller's next `call` (one extra call at a leader change, and
    one code path for the rules a call follows)."""

    def __init__(self, routers: RouterClient, address: str, method: Any) -> None:
        self.routers = routers
        self.address = address
        self._method = method
        self._stream: Any = None
        self.closed = False

    async def exchange(self, request: Any, timeout: float) -> Any:
        if self.closed:
            raise StreamEndedError(f"the stream to {self.address} is closed")
        try:
            async with asyncio.timeout(timeout):
                if self._stream is None:
                    self._stream = await self._method.open().__aenter__()
                    await self._stream.send_request()
                await self._stream.send_message(request)
                reply = await self._stream.recv_message()
        except GRPCError as e:  # the router refused the stream at once (trailers-only)
            await self.close()
            raise StreamEndedError(f"{self.address}: {_describe(e)}", e.status) from e
        except (*_RETRYABLE, ProtocolError) as e:
            status = await self._end(e)
            if isinstance(e, TimeoutError):  # do not wait for it again first: it may be cut off
                self.routers._forget_leader(self.address)
            reason = f"{status.name}" if status is not None else _describe(e)
            raise StreamEndedError(f"the stream to {self.address} ended: {reason}", status) from e
        except BaseException as e:
            await self._end(e)
            raise
        if reply is None:
            await self.close()
            raise StreamEndedError(f"{self.address} ended the stream")
        return reply

    async def close(self) -> None:
        """Reset the stream (the router's handler ends); idempotent."""
        await self._end(asyncio.CancelledError())

    async def _end(self, error: BaseException) -> Status | None:
        """Leave grpclib's stream context with `error`; the router's status when it sent one (grpclib
        turns a reset after trailers into the GRPCError they carry)."""
        if self.closed:
            return None
        self.closed = True
        stream, self._stream = self._stream, None
        if stream is None:
            return None
        try:
            await stream.__aexit__(type(error), error, error.__traceback__)
        except GRPCError as e:
            return e.status
        except Exception:
            pass  # the stream is gone either way; the caller reports `error`
        return None


class StreamedCall:
    """A unary method of the leader, sent on a long-lived stream of its streaming twin (same request and
    reply types, one reply per request) once a call found the leader: a router serves one more message on
    an open stream for much less than a new call (ADR 0010). When the stream ends — a leader change, a
    refusal, a router that does not have the streaming method — that request goes as a call, which
    follows the leader and raises exactly as `RouterClient.call` does, and the stream is opened again to
    the router that answered it (never again to one that answered UNIMPLEMENTED)."""

    def __init__(self, routers: RouterClient, stub_class: type, method: str, stream_method: str) -> None:
        self.routers = routers
        self.stub_class = stub_class
        self.method = method
        self.stream_method = stream_method
        self._stream: LeaderStream | None = None
        self._no_streams_at: str | None = None

    async def __call__(self, request: Any, timeout: float) -> Any:
        stream = self._stream
        if stream is not None:
            try:
                # Half the timeout: a router that stopped answering costs less before the call,
                # which gets the whole timeout, tries the others.
                return await stream.exchange(request, timeout / 2)
            except StreamEndedError as e:
                self._stream = None
                if e.status == Status.UNIMPLEMENTED:
                    log.info(
                        "router %s has no %s; calling %s", stream.address, self.stream_method, self.method
                    )
                    self._no_streams_at = stream.address
                else:
                    log.debug("%s stream ended: %s; this request goes as a call", self.stream_method, e)
        reply = await self.routers.call(self.stub_class, self.method, request, timeout=timeout)
        if self.routers.leader_address != self._no_streams_at:
            self._stream = self.routers.leader_stream(self.stub_class, self.stream_method)
        return reply

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()


class _BusyError(Exception):
    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _seconds(text: object) -> float:
    try:
        return min(max(float(str(text)), 0.05), 30.0)  # a hint from the network: bounded either way
    except ValueError:
        return 1.0


class _NoAnswerError(Exception):
    def __init__(self, address: str, timeout: float) -> None:
        super().__init__(f"{address} did not answer within {timeout:.1f} s")
        self.address = address
        self.timeout = timeout


class _NotLeaderError(Exception):
    def __init__(self, message: str, leader_address: str) -> None:
        super().__init__(message)
        self.leader_address = leader_address


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "no answer"
    if isinstance(error, GRPCError):
        return f"{error.status.name}: {error.message}"
    return repr(error)
