"""How a follower serves GraphQL writes and linearizable reads: through the leader's gRPC admin API.

A router that is not the leader forwards `applyPipelines` and `deletePipeline` to the leader with a
`RouterClient` (which follows the `etlrouter-leader` trailer), and turns a linearizable read into a
linearizable `ListPipelines` on the leader, whose revision it then waits to have applied locally.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpclib.exceptions import GRPCError

from etlrouter._proto.v1 import admin_grpc, admin_pb2
from etlrouter.router.client import ClusterUnreachableError, RouterClient
from etlrouter.router.node import RouterNode

FORWARD_TIMEOUT_S = 10.0

_ACTIONS = {
    admin_pb2.PipelineChange.ACTION_CREATED: "created",
    admin_pb2.PipelineChange.ACTION_UPDATED: "updated",
    admin_pb2.PipelineChange.ACTION_UNCHANGED: "unchanged",
    admin_pb2.PipelineChange.ACTION_DELETED: "deleted",
}


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
                addresses, timeout=FORWARD_TIMEOUT_S, transport_config=self.node.config.transport
            )
            self._members = members
        elif status.leader_address and self._client.leader_address is None:
            self._client.leader_address = status.leader_address
        return self._client

    async def _call(self, method: str, request: Any, *, write: bool = False) -> tuple[Any, str]:
        client = self._current()
        try:
            reply = await client.call(admin_grpc.PipelineAdminStub, method, request, write=write)
        except GRPCError as e:
            raise ForwardError(e.status.name, e.message or f"the leader answered {e.status.name}") from None
        except ClusterUnreachableError as e:
            raise ForwardError("UNAVAILABLE", str(e)) from None
        return reply, client.leader_address or ""

    async def apply_pipelines(
        self, definition: str, filename: str, *, dry_run: bool, prune: bool
    ) -> tuple[admin_pb2.ApplyPipelinesResponse, str]:
        request = admin_pb2.ApplyPipelinesRequest(
            definition=definition, filename=filename, dry_run=dry_run, prune=prune
        )
        reply, served_by = await self._call("ApplyPipelines", request, write=not dry_run)
        return reply, served_by

    async def delete_pipeline(self, name: str, expected_generation: int) -> tuple[int, str]:
        request = admin_pb2.DeletePipelineRequest(name=name, expected_generation=expected_generation)
        reply, served_by = await self._call("DeletePipeline", request, write=True)
        return int(reply.revision), served_by

    async def linearizable_revision(self) -> int:
        """The leader's state revision after a read barrier: every acknowledged change is at or below it."""
        request = admin_pb2.ListPipelinesRequest(consistency=admin_pb2.READ_CONSISTENCY_LINEARIZABLE)
        reply, _ = await self._call("ListPipelines", request)
        return int(reply.revision)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def changes_from_proto(changes: Sequence[admin_pb2.PipelineChange]) -> list[dict[str, Any]]:
    return [
        {"name": c.name, "action": _ACTIONS.get(c.action, "unchanged"), "generation": c.generation}
        for c in changes
    ]


def diagnostics_from_proto(diagnostics: Sequence[admin_pb2.Diagnostic]) -> list[dict[str, Any]]:
    return [
        {
            "file": d.file,
            "line": d.line,
            "column": d.column,
            "message": d.message,
            "hint": d.hint,
            "excerpt": d.excerpt,
        }
        for d in diagnostics
    ]
