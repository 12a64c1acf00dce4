"""Three Raft nodes in one process, talking gRPC over real loopback sockets, with real storage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from etlrouter.core.grpc import GrpcServer
from etlrouter.raft.node import NodeOptions, NotLeader, RaftNode
from etlrouter.testing.kv import KV, put
from tests.conftest import free_port

IDS = ["n1", "n2", "n3"]


class Cluster:
    def __init__(self, tmp: Path, snapshot_every: int = 10_000) -> None:
        self.tmp = tmp
        self.ports = {node: free_port() for node in IDS}
        self.addresses = {node: f"127.0.0.1:{port}" for node, port in self.ports.items()}
        self.snapshot_every = snapshot_every
        self.nodes: dict[str, RaftNode] = {}
        self.servers: dict[str, GrpcServer] = {}
        self.kvs: dict[str, KV] = {}

    async def start(self, node: str) -> None:
        kv = KV()
        raft = RaftNode(
            NodeOptions(
                node_id=node,
                cluster_id="test",
                data_dir=self.tmp / node,
                bootstrap_peers=self.addresses,
                tick_s=0.02,
                fsync=False,
                snapshot_every=self.snapshot_every,
            ),
            kv,
        )
        server = GrpcServer([raft.transport.service], host="127.0.0.1", port=self.ports[node])
        await server.start()
        await raft.start()
        self.nodes[node], self.servers[node], self.kvs[node] = raft, server, kv

    async def stop(self, node: str) -> None:
        await self.servers.pop(node).stop()
        await self.nodes.pop(node).stop()
        self.kvs.pop(node)

    async def leader(self, timeout: float = 10) -> RaftNode:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = [n for n in self.nodes.values() if n.is_leader()]
            if len(leaders) == 1:
                return leaders[0]
            await asyncio.sleep(0.02)
        raise TimeoutError("no single leader")

    async def converged(self, expected: dict[str, str], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(kv.data == expected for kv in self.kvs.values()):
                return
            await asyncio.sleep(0.02)
        diffs = {node: len(kv.data) for node, kv in self.kvs.items()}
        raise AssertionError(f"replicas did not converge on {len(expected)} keys: {diffs}")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    for node in list(c.nodes):
        await c.stop(node)


async def test_elects_a_leader_and_replicates_writes(cluster: Cluster) -> None:
    for node in IDS:
        await cluster.start(node)
    leader = await cluster.leader()
    results = await asyncio.gather(*(leader.propose(put(f"k{i}", f"v{i}")) for i in range(200)))
    assert results == sorted(results) and len(set(results)) == 200  # each write got its own log index
    await cluster.converged({f"k{i}": f"v{i}" for i in range(200)})
    follower = next(n for n in cluster.nodes.values() if not n.is_leader())
    with pytest.raises(NotLeader) as info:
        await follower.propose(put("x", "y"))
    assert info.value.leader_id == leader.id
    assert info.value.leader_address == cluster.addresses[leader.id]
    assert await leader.read_barrier() >= max(results)


async def test_leader_loss_new_leader_restart_catches_up(cluster: Cluster) -> None:
    for node in IDS:
        await cluster.start(node)
    leader = await cluster.leader()
    expected = {}
    for i in range(50):
        await leader.propose(put(f"a{i}", "1"))
        expected[f"a{i}"] = "1"
    old = leader.id
    await cluster.stop(old)
    new_leader = await cluster.leader()
    assert new_leader.id != old
    for i in range(50):
        await new_leader.propose(put(f"b{i}", "2"))
        expected[f"b{i}"] = "2"
    await cluster.start(old)  # restarts from its own data directory
    await cluster.converged(expected)
    assert cluster.nodes[old].status().term >= new_leader.status().term


async def test_lagging_follower_gets_a_snapshot(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, snapshot_every=20)
    try:
        for node in IDS:
            await cluster.start(node)
        leader = await cluster.leader()
        lagging = next(n for n in IDS if n != leader.id)
        await cluster.stop(lagging)
        expected = {}
        for i in range(100):
            await leader.propose(put(f"k{i}", str(i)))
            expected[f"k{i}"] = str(i)
        assert leader.status().snapshot_index >= 80  # the log behind the lagging node was compacted
        await cluster.start(lagging)
        await cluster.converged(expected)
        assert cluster.nodes[lagging].status().snapshot_index >= 20  # it caught up through InstallSnapshot
    finally:
        for node in list(cluster.nodes):
            await cluster.stop(node)


async def test_leadership_transfer(cluster: Cluster) -> None:
    for node in IDS:
        await cluster.start(node)
    leader = await cluster.leader()
    await leader.propose(put("k", "v"))
    target = next(n for n in IDS if n != leader.id)
    assert await leader.transfer_leadership(target) == target
    new_leader = await cluster.leader()
    assert new_leader.id == target
    await new_leader.propose(put("k2", "v2"))
    await cluster.converged({"k": "v", "k2": "v2"})
