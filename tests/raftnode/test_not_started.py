"""A router whose Raft node is not started (or has failed) answers UNAVAILABLE, not an application error:
a sidecar that registers while the router is still starting tries another router."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from etlrouter.core.config import Config
from etlrouter.raft.node import NodeUnavailableError
from etlrouter.router.node import RouterNode
from etlrouter.router.services import _map_errors


def test_a_node_that_is_not_started_is_unavailable(tmp_path: Path) -> None:
    config = Config()
    router = msgspec.structs.replace(config.router, data_dir=str(tmp_path / "r0"))
    node = RouterNode(msgspec.structs.replace(config, router=router))
    with pytest.raises(NodeUnavailableError, match="is not started"):
        node.raft.leader()


async def test_the_grpc_answer_is_unavailable() -> None:
    async def handler(self: Any, stream: Any) -> None:
        raise NodeUnavailableError("raft node 'router-1' is not started")

    with pytest.raises(GRPCError) as answer:
        await _map_errors(handler, None, None)  # type: ignore[arg-type]
    assert answer.value.status is Status.UNAVAILABLE
    assert "not started" in (answer.value.message or "")
