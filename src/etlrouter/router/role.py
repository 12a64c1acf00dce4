"""The router role: the shared servers (gRPC, HTTP) around a RouterNode."""

from __future__ import annotations

import asyncio
import logging

from etlrouter.api import mount_graphql
from etlrouter.api.dashboard import mount_dashboard
from etlrouter.core.config import Config
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
            security=self.node.security,
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
            if not await self._a_voter_listens():
                log.info("no other voter is listening (the whole cluster stops?): no leadership transfer")
                return
            try:
                await self.node.raft.transfer_leadership(timeout=3.0)
            except Exception as e:  # a single-node cluster, or no voter caught up: stop anyway
                log.info("no leadership transfer before stopping: %s", e)

    async def _a_voter_listens(self) -> bool:
        """Whether another voter accepts connections: a hand-over to routers that already stopped (`etlrouter
        dev` stops the followers before the leader) would only wait out its timeout."""
        status = self.node.raft.status()
        others = [m.address for m in status.members if m.voter and m.id != status.node_id and m.address]

        async def listens(address: str) -> bool:
            host, _, port = address.rpartition(":")
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 0.5)
            except (OSError, ValueError, TimeoutError):
                return False
            writer.close()
            return True

        return not others or any(await asyncio.gather(*(listens(a) for a in others)))

    async def stop(self) -> None:
        await self.node.stop()
        await self.runtime.stop()
