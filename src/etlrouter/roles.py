"""Role entry points: thin wiring from a validated Config to the components that run."""

from __future__ import annotations

import logging

from etlrouter.api import mount_graphql
from etlrouter.api.dashboard import mount_dashboard
from etlrouter.core.config import Config
from etlrouter.core.lifecycle import run_loop, serve
from etlrouter.core.runtime import RoleRuntime
from etlrouter.router.node import RouterNode
from etlrouter.router.services import router_services

log = logging.getLogger(__name__)


class RouterRole:
    """A router process: the shared servers plus a RouterNode (Raft + control state + leader duties)."""

    def __init__(self, config: Config) -> None:
        self.node = RouterNode(config)
        self.runtime = RoleRuntime(
            "router",
            grpc_listen=config.router.grpc,
            http_listen=config.router.http,
            transport_config=config.transport,
            grpc_services=router_services(self.node),
            readiness=self.node.ready,
        )
        mount_graphql(self.runtime.app, self.node)  # /graphql: queries, mutations, subscriptions
        mount_dashboard(self.runtime.app)  # /: the dashboard, a client of /graphql only

    async def start(self) -> None:
        await self.runtime.grpc.start()  # bound first: peers must reach Raft as soon as it runs
        await self.node.start(self.runtime.grpc.address)
        await self.runtime.start_http()

    async def wait(self) -> None:
        await self.runtime.wait()

    async def drain(self) -> None:
        self.runtime.grpc.set_serving(False)
        if self.node.raft.is_leader():
            try:
                await self.node.raft.transfer_leadership(timeout=3.0)
            except Exception as e:  # a single-node cluster, or no voter caught up: stop anyway
                log.info("no leadership transfer before stopping: %s", e)

    async def stop(self) -> None:
        await self.node.stop()
        await self.runtime.stop()


def run_role(role: str, config: Config) -> int:
    """Run a long-lived role until SIGTERM/SIGINT; returns the process exit code."""
    run_loop(lambda: _serve_role(role, config))
    return 0


async def _serve_role(role: str, config: Config) -> None:
    if role == "router":
        await serve(RouterRole(config), drain_deadline_s=5.0)
        return
    if role == "sidecar":
        from etlrouter.sidecar.role import SidecarRole

        await serve(SidecarRole(config), drain_deadline_s=config.sidecar.drain_timeout_ms / 1000)
        return
    if role == "operator":
        from etlrouter.operator.role import OperatorRole

        await serve(OperatorRole(config), drain_deadline_s=5.0)
        return
    raise ValueError(f"{role!r} is not a long-running role")
