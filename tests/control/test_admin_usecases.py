"""The admin use cases (router/admin.py) both APIs call, on a real ControlState behind a stand-in node: the
size limit, the leader check, diagnostics instead of an error, refusals with the state's code. The DSL work
runs in real worker processes."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any, cast

import pytest

from etlrouter.control import ClientSession, Command
from etlrouter.core.offload import WorkerPool
from etlrouter.raft.node import NotLeader
from etlrouter.router import admin
from etlrouter.router.node import RouterNode
from tests.control.helpers import ORDERS, Driver, register_all


class _Raft:
    def __init__(self, leader: bool) -> None:
        self.leader = leader

    def is_leader(self) -> bool:
        return self.leader


POOL = WorkerPool("test-admin", workers=1, queue=4, deadline_s=30)


@pytest.fixture(scope="module", autouse=True)
def _close_pool() -> Iterator[None]:
    yield
    asyncio.run(POOL.close())


class StandInNode:
    """What the use cases touch of a RouterNode: the state, propose, the leader check, the read barrier and
    the worker pool."""

    def __init__(self, *, leader: bool = True) -> None:
        self.work_pool = POOL  # real worker processes: the DSL work crosses to them as in a router
        self.driver = Driver()
        register_all(self.driver)
        self.state = self.driver.state
        self.raft = _Raft(leader)
        self.barriers = 0

    async def propose(self, command: Command, session: ClientSession | None = None) -> Any:
        self.require_leader()
        return self.driver.run(command, session)

    async def linearizable(self) -> None:
        self.barriers += 1

    def require_leader(self) -> None:
        if not self.raft.leader:
            raise NotLeader("r1", "r0", "10.0.0.1:7400")


def node(*, leader: bool = True) -> tuple[StandInNode, RouterNode]:
    stand_in = StandInNode(leader=leader)
    return stand_in, cast(RouterNode, stand_in)


def test_apply_then_preview_then_delete() -> None:
    stand_in, n = node()
    preview = asyncio.run(admin.apply_pipelines(n, ORDERS, "", dry_run=True))
    assert [c.action for c in preview.changes] == ["created", "created"] and not stand_in.state.pipelines()
    assert stand_in.barriers == 1  # a dry run answers from a linearizable view
    applied = asyncio.run(admin.apply_pipelines(n, ORDERS, "orders.etl"))
    assert sorted((c.name, c.action) for c in applied.changes) == [
        ("orders-to-ch", "created"),
        ("orders-to-s3", "created"),
    ]
    assert admin.pipeline(n, "orders-to-ch").filename == "orders.etl"
    revision = asyncio.run(admin.delete_pipeline(n, "orders-to-ch"))
    assert revision > applied.revision
    with pytest.raises(admin.NotFoundError, match=r"pipeline `orders-to-ch` does not exist"):
        admin.pipeline(n, "orders-to-ch")


def test_a_document_that_does_not_compile_answers_with_diagnostics_not_an_error() -> None:
    _, n = node()
    outcome = asyncio.run(admin.apply_pipelines(n, "pipeline p { source nope | sink clickhouse }", "p.etl"))
    [diagnostic] = outcome.diagnostics
    assert (diagnostic.file, diagnostic.message, outcome.changes) == ("p.etl", "unknown source `nope`", ())


def test_refusals_carry_the_states_code() -> None:
    _, n = node()
    with pytest.raises(admin.CommandRejectedError) as refused:
        asyncio.run(admin.delete_pipeline(n, "nope"))
    assert refused.value.code == "not_found"
    with pytest.raises(admin.CommandRejectedError) as refused:
        asyncio.run(admin.apply_pipelines(n, ORDERS, "", mode="update"))
    assert refused.value.code == "not_found"


def test_the_definition_limit_is_checked_before_anything_else() -> None:
    stand_in, n = node(leader=False)
    big = "#" * (admin.MAX_DEFINITION_BYTES + 1)
    with pytest.raises(admin.InvalidRequestError, match=rf"definition is {len(big)} bytes; the limit is"):
        asyncio.run(admin.apply_pipelines(n, big, "", dry_run=True))
    with pytest.raises(admin.InvalidRequestError):
        asyncio.run(admin.validate_pipelines(n, big, ""))
    assert stand_in.barriers == 0


def test_a_follower_says_not_leader_for_writes_and_dry_runs() -> None:
    _, n = node(leader=False)
    for call in (
        admin.apply_pipelines(n, ORDERS, ""),
        admin.apply_pipelines(n, ORDERS, "", dry_run=True),
        admin.delete_pipeline(n, "x"),
    ):
        with pytest.raises(NotLeader):
            asyncio.run(call)


def test_validate_and_explain_go_through_the_dsl_choke_point(monkeypatch: pytest.MonkeyPatch) -> None:
    _, n = node()
    seen: list[str] = []
    real = admin._dsl_work

    async def counting(node: Any, work: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(work.__name__)
        return await real(node, work, *args, **kwargs)

    monkeypatch.setattr(admin, "_dsl_work", counting)
    assert asyncio.run(admin.validate_pipelines(n, ORDERS, "")) == []
    explained = asyncio.run(admin.explain_pipelines(n, ORDERS, "", "tree"))
    assert explained.rendered and not explained.diagnostics
    asyncio.run(admin.apply_pipelines(n, ORDERS, "", dry_run=True))
    asyncio.run(admin.apply_pipelines(n, ORDERS, ""))
    # Apply and its dry run check the document in a worker before the state machine compiles it again.
    assert seen == ["validate", "explain", "precheck", "precheck"]
