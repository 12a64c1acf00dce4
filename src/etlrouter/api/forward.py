"""How a follower serves GraphQL writes and linearizable reads: through the leader's gRPC admin API.

A router that is not the leader forwards `applyPipelines` and `deletePipeline` to the leader with a
`RouterClient` (which follows the `etlrouter-leader` trailer), and turns a linearizable read into a
linearizable `ListPipelines` on the leader, whose revision it then waits to have applied locally.

Live statistics exist only on the leader: a follower fetches them with `GetLiveStats` under a short deadline,
and every reader on the follower (each open dashboard, each query) shares one fetch per interval
(`SharedFetch`), so open pages do not multiply the load on the leader.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.client.router import ClusterUnreachableError, RouterClient
from etlrouter.router.admin import ApplyOutcome
from etlrouter.router.convert import change_from_proto, diagnostic_from_proto, live_stats_from_proto
from etlrouter.router.node import RouterNode
from etlrouter.router.stats import LiveStats

FORWARD_TIMEOUT_S = 10.0
# Short: a page must learn within a tick or two that the leader is gone, not hang for the write timeout.
LIVE_STATS_TIMEOUT_S = 2.0


class ForwardError(Exception):
    """The leader refused a forwarded request, or no router answered. `code` is a GraphQL error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class LeaderForwarder:
    """One RouterClient to the cluster's members, recreated when the membership changes."""

    def __init__(self, node: RouterNode) -> None:
        self.node = node
        self._client: RouterClient | None = None
        self._members: tuple[str, ...] = ()
        # Every GraphQL reader on this router shares it (ApiContext holds this forwarder).
        self.shared_live_stats = SharedFetch(self.live_stats)

    def _current(self) -> RouterClient:
        status = self.node.raft.status()
        members = tuple(sorted(m.address for m in status.members if m.address))
        if self._client is None or members != self._members:
            if self._client is not None:
                self._client.close()
            addresses: list[str] = [a for a in (status.leader_address, *members) if a]
            if not addresses:
                raise ForwardError("UNAVAILABLE", "this router knows neither a leader nor any member to ask")
            self._client = RouterClient(
                addresses,
                timeout=FORWARD_TIMEOUT_S,
                transport_config=self.node.config.transport,
                security=self.node.security,
            )
            self._members = members
        elif status.leader_address and self._client.leader_address is None:
            self._client.leader_address = status.leader_address
        return self._client

    async def _call(
        self, method: str, request: Any, *, write: bool = False, timeout: float | None = None
    ) -> tuple[Any, str]:
        client = self._current()
        try:
            reply = await client.call(
                admin_grpc.PipelineAdminStub, method, request, write=write, timeout=timeout
            )
        except GRPCError as e:
            raise ForwardError(e.status.name, e.message or f"the leader answered {e.status.name}") from None
        except ClusterUnreachableError as e:
            raise ForwardError("UNAVAILABLE", str(e)) from None
        return reply, client.leader_address or ""

    async def apply_pipelines(
        self, definition: str, filename: str, *, dry_run: bool, prune: bool
    ) -> tuple[ApplyOutcome, str]:
        """The leader's outcome, as `admin.apply_pipelines` there returned it, and who served it."""
        request = admin_pb2.ApplyPipelinesRequest(
            definition=definition, filename=filename, dry_run=dry_run, prune=prune
        )
        reply, served_by = await self._call("ApplyPipelines", request, write=not dry_run)
        outcome = ApplyOutcome(
            changes=tuple(change_from_proto(c) for c in reply.changes),
            diagnostics=tuple(diagnostic_from_proto(d) for d in reply.diagnostics),
            revision=reply.revision,
        )
        return outcome, served_by

    async def delete_pipeline(self, name: str, expected_generation: int) -> tuple[int, str]:
        request = admin_pb2.DeletePipelineRequest(name=name, expected_generation=expected_generation)
        reply, served_by = await self._call("DeletePipeline", request, write=True)
        return int(reply.revision), served_by

    async def linearizable_revision(self) -> int:
        """The leader's state revision after a read barrier: every acknowledged change is at or below it."""
        request = admin_pb2.ListPipelinesRequest(consistency=admin_pb2.READ_CONSISTENCY_LINEARIZABLE)
        reply, _ = await self._call("ListPipelines", request)
        return int(reply.revision)

    async def live_stats(self) -> LiveFetch:
        """The leader's live statistics, or why they could not be had within LIVE_STATS_TIMEOUT_S."""
        try:
            reply, served_by = await self._call(
                "GetLiveStats", admin_pb2.GetLiveStatsRequest(), timeout=LIVE_STATS_TIMEOUT_S
            )
            return LiveFetch(live_stats_from_proto(reply), served_by, "")
        except ForwardError as e:
            return LiveFetch(None, "", f"{e.code}: {e}")
        except ValueError as e:  # a reply beyond the bounds in router/convert.py
            return LiveFetch(None, "", f"the leader's answer was refused: {e}")

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


@dataclass(frozen=True, slots=True)
class LiveFetch:
    """One attempt at the leader's live statistics: the snapshot and who served it, or why there is none."""

    stats: LiveStats | None
    served_by: str  # the leader's gRPC address
    error: str


class SharedFetch:
    """One fetch shared by every concurrent caller, its result reused while younger than the caller's
    `max_age_s` (failures too: an unreachable leader is asked once per interval, not once per reader)."""

    def __init__(
        self, fetch: Callable[[], Awaitable[LiveFetch]], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._last: tuple[float, LiveFetch] | None = None
        self._running: asyncio.Future[LiveFetch] | None = None
        self.fetches = 0  # how many fetches were started (for tests and logs)

    async def get(self, max_age_s: float) -> LiveFetch:
        if self._last is not None and self._clock() - self._last[0] < max_age_s:
            return self._last[1]
        if self._running is None:
            self.fetches += 1
            self._running = asyncio.ensure_future(self._run())
        # Shielded: a reader that goes away (a closed page) does not cancel the others' fetch.
        return await asyncio.shield(self._running)

    async def _run(self) -> LiveFetch:
        try:
            result = await self._fetch()
            self._last = (self._clock(), result)
            return result
        finally:
            self._running = None
