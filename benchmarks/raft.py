#!/usr/bin/env python3
"""Raft commit throughput and latency: etlrouter.raft vs PySyncObj, same workload, same run.

    python benchmarks/raft.py [--seconds 5] [--clients 1,64] [--skip-pysyncobj]

Three node processes on loopback per configuration. The workload runs inside the leader's process (as
PySyncObj's own benchmark does): C concurrent clients each propose a small key/value write, wait until it
is committed and applied, and immediately propose the next. Reported per configuration: commits/s, p50 and
p99 commit latency, and the ratio of our throughput to PySyncObj's with fsync off (PySyncObj never fsyncs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VALUE = "x" * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarize(latencies: list[float], elapsed: float) -> dict[str, float]:
    latencies.sort()
    n = len(latencies)
    return {
        "commits_per_s": n / elapsed,
        "p50_ms": 1000 * latencies[n // 2] if n else float("nan"),
        "p99_ms": 1000 * latencies[max(0, int(n * 0.99) - 1)] if n else float("nan"),
        "commits": n,
    }


# -------------------------------------------------------------------------------------------------------
# Node processes. Each reads commands on stdin ("role", "run CLIENTS SECONDS", "quit") and answers on stdout.


def etlrouter_node(node: str, peers: dict[str, str], data_dir: str, fsync: bool) -> None:
    from etlrouter.core.grpc import GrpcServer
    from etlrouter.core.lifecycle import run_loop
    from etlrouter.raft.node import NodeOptions, RaftNode
    from etlrouter.testing.kv import KV, put

    async def main() -> None:
        raft = RaftNode(
            NodeOptions(
                node_id=node,
                cluster_id="bench",
                data_dir=Path(data_dir),
                bootstrap_peers=peers,
                fsync=fsync,
                snapshot_every=100_000,
            ),
            KV(),
        )
        host, port = peers[node].rsplit(":", 1)
        server = GrpcServer([raft.transport.service], host=host, port=int(port))
        await server.start()
        await raft.start()
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().split():
            if line[0] == "role":
                print("leader" if raft.is_leader() else "follower", flush=True)
            elif line[0] == "run":
                print(json.dumps(await workload(raft, int(line[1]), float(line[2]))), flush=True)
            elif line[0] == "quit":
                break
        await raft.stop()
        await server.stop()

    async def workload(raft: RaftNode, clients: int, seconds: float) -> dict[str, float]:
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def client(c: int) -> None:
            i = 0
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await raft.propose(put(f"c{c}-{i}", VALUE))
                latencies.append(time.perf_counter() - t0)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return summarize(latencies, time.perf_counter() - t0)

    run_loop(main)


def pysyncobj_workload(kv: Any, clients: int, seconds: float) -> dict[str, float]:
    """C clients, each issuing its next write from the previous one's commit callback."""
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    done = threading.Event()
    active = [clients]

    def issue(c: int, i: int) -> None:
        if time.perf_counter() >= deadline:
            with lock:
                active[0] -= 1
                if active[0] == 0:
                    done.set()
            return
        t0 = time.perf_counter()

        def callback(result: Any, error: Any) -> None:
            with lock:
                latencies.append(time.perf_counter() - t0)
            issue(c, i + 1)

        kv.set(f"c{c}-{i}", VALUE, callback=callback)

    t0 = time.perf_counter()
    for c in range(clients):
        issue(c, 0)
    done.wait(seconds + 30)
    return summarize(latencies, time.perf_counter() - t0)


def pysyncobj_node(node: str, peers: dict[str, str], data_dir: str, fsync: bool) -> None:
    from pysyncobj import SyncObj, SyncObjConf, replicated

    class KV(SyncObj):  # type: ignore[misc]
        def __init__(self) -> None:
            others = [addr for n, addr in peers.items() if n != node]
            super().__init__(peers[node], others, SyncObjConf(dynamicMembershipChange=False))
            self._data: dict[str, str] = {}

        @replicated  # type: ignore[misc]
        def set(self, key: str, value: str) -> None:
            self._data[key] = value

    kv = KV()
    print("ready", flush=True)
    for raw in sys.stdin:
        line = raw.split()
        if not line:
            continue
        if line[0] == "role":
            print("leader" if kv._isLeader() else "follower", flush=True)
        elif line[0] == "run":
            print(json.dumps(pysyncobj_workload(kv, int(line[1]), float(line[2]))), flush=True)
        elif line[0] == "quit":
            break
    kv.destroy()


# -------------------------------------------------------------------------------------------------------


class Cluster:
    def __init__(self, impl: str, fsync: bool) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"raftbench-{impl}-")
        self.peers = {f"n{i}": f"127.0.0.1:{free_port()}" for i in range(1, 4)}
        self.procs = {
            node: subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--node",
                    node,
                    "--impl",
                    impl,
                    "--fsync",
                    str(int(fsync)),
                    *self._args(node),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for node in self.peers
        }
        for proc in self.procs.values():
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"

    def _args(self, node: str) -> list[str]:
        return ["--peers", json.dumps(self.peers), "--data-dir", os.path.join(self.dir, node)]

    def ask(self, node: str, command: str) -> str:
        proc = self.procs[node]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        return proc.stdout.readline().strip()

    def leader(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leaders = [n for n in self.procs if self.ask(n, "role") == "leader"]
            if len(leaders) == 1:
                return leaders[0]
            time.sleep(0.2)
        raise TimeoutError("no leader")

    def close(self) -> None:
        for proc in self.procs.values():
            try:
                assert proc.stdin is not None
                proc.stdin.write("quit\n")
                proc.stdin.flush()
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def measure(impl: str, fsync: bool, clients: int, seconds: float) -> dict[str, float]:
    cluster = Cluster(impl, fsync)
    try:
        leader = cluster.leader()
        cluster.ask(leader, f"run {clients} 0.5")  # warm-up
        result: dict[str, float] = json.loads(cluster.ask(leader, f"run {clients} {seconds}"))
        return result
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", default="1,64")
    parser.add_argument("--skip-pysyncobj", action="store_true")
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="etlrouter", help=argparse.SUPPRESS)
    parser.add_argument("--peers", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--fsync", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.node:
        run = etlrouter_node if args.impl == "etlrouter" else pysyncobj_node
        run(args.node, json.loads(args.peers), args.data_dir, bool(args.fsync))
        return

    configs = [("etlrouter", False), ("etlrouter", True)]
    if not args.skip_pysyncobj:
        configs.insert(0, ("pysyncobj", False))
    rows = []
    for clients in (int(c) for c in args.clients.split(",")):
        for impl, fsync in configs:
            rows.append((impl, fsync, clients, measure(impl, fsync, clients, args.seconds)))

    print(f"3 nodes on loopback, {os.cpu_count()} cores, {args.seconds:.0f} s per row, 64-byte values")
    header = f"{'implementation':<12}{'fsync':>6}{'clients':>8}{'commits/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
    print(header + f"{'vs PySyncObj':>14}")
    baseline = {c: r["commits_per_s"] for impl, f, c, r in rows if impl == "pysyncobj"}
    for impl, fsync, clients, r in rows:
        ratio = f"{r['commits_per_s'] / baseline[clients]:.1f}x" if clients in baseline else "-"
        print(
            f"{impl:<12}{'on' if fsync else 'off':>6}{clients:>8}{r['commits_per_s']:>11.0f}"
            f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{ratio:>14}"
        )


if __name__ == "__main__":
    main()
