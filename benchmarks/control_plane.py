#!/usr/bin/env python3
"""Control-plane cost with 1000 simulated sidecars heartbeating against a real 3-node router cluster.

    .venv/bin/python benchmarks/control_plane.py [--sidecars 1000] [--interval 5] [--timeout 15]
                                                 [--window 20] [--fsync on|off|both] [--generators 2]
                                                 [--heartbeats stream|call]

Three `etlrouter router` processes on loopback (production Raft timing; fsync as asked), and
`--generators` load-generator processes (asyncio) that register the sidecars and then heartbeat each of
them every `--interval` seconds at its own random phase (spread over time, not in lockstep): on a
HeartbeatStream per sidecar, as `etlrouter sidecar` does (the client's StreamedCall), or with
`--heartbeats call` one Heartbeat call each (the way before streams); 50 sidecars share a connection.
A simulated sidecar behaves as a real one does towards the router: it applies the Assign and Revoke
commands it is sent, reports the fencing tokens it applied, its running stages and its load.

The layout: `--sidecars` sidecars, each fronting one of 20 services (10 sources, 5 transforms, 5 sinks;
round-robin, so 50 sidecars per service at 1000), and `--pipelines` pipelines
`source | transform (parallelism 2-8) | transform (parallelism 4) | sink` in one document: at 200 the
optimizer merges them into 10 DAGs of 460 stages, 1335 replicas, so a transform sidecar holds 4-5.

Phases, and what each measures:

1. idle, no sidecars: the leader's CPU with an empty registry (baseline of the baseline);
2. register the sidecars, apply the pipelines, wait until every pipeline is `running`;
3. loaded window (`--window` s, after one interval of warm-up): leader CPU, heartbeats served (the
   leader's `etlrouter_sidecar_heartbeats_total`), heartbeat latency seen by the sidecars, and
   GetClusterStatus latency probed at 10/s from a generator in the same window;
4. idle window: every sidecar pauses: the leader's CPU with the same registry and no heartbeats; then 200
   sequential GetClusterStatus calls (the unloaded floor). The window is at most timeout - interval - 4 s,
   and sidecars that missed a beat send it within 2 s of resuming, so none expires;
5. reassignment: the sidecar holding the most replicas falls silent; from the reply to its last heartbeat to
   (i) its deletion arriving on a Watch stream from the leader (the DeregisterSidecar entry applied) and
   (ii) ListSidecars (polled every 50 ms) showing all its replicas on other sidecars; then the heartbeats
   of the next interval, which carry the changed DAG to the sidecars that run it. Half the sidecars (every
   other block of 20, one per service) report the spec generations they hold, so their Assigns come
   without the DagSpec; the other half emulate sidecars from before that change: the row "bytes to ..."
   compares the two within the same run;
6. churn: `--churn` pipelines applied and deleted one after the other; the state's size (a backup snapshot)
   and the largest fencing-token table of any sidecar, before and three intervals after.

Leader CPU is utime + stime from /proc/<pid>/stat (10 ms ticks); the leader is asked at the start and end
of every window and a window with an election is flagged. Machine-wide CPU (/proc/stat) is printed beside
the benchmark's own, to show other work on a shared machine. Every process started here is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etlrouter._proto.v1 import admin_grpc, admin_pb2, control_grpc, control_pb2
from etlrouter.client.router import RouterClient, StreamedCall

SOURCES, TRANSFORMS, SINKS = 10, 5, 5
KIND_OF = {
    "source": control_pb2.SERVICE_KIND_SOURCE,
    "transform": control_pb2.SERVICE_KIND_TRANSFORM,
    "sink": control_pb2.SERVICE_KIND_SINK,
}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROBE_RATE = 10.0  # GetClusterStatus probes per second during the loaded window
FLOOR_CALLS = 200
CATCH_UP_SPREAD = 2.0  # seconds over which sidecars that missed a heartbeat in a pause send it
SIDECARS_PER_CONNECTION = 50  # simulated sidecars sharing one heartbeat connection
SCRIPT = str(Path(__file__).resolve())


def service_kinds() -> dict[str, str]:
    return {
        **{f"src-{i}": "source" for i in range(SOURCES)},
        **{f"tf-{i}": "transform" for i in range(TRANSFORMS)},
        **{f"sink-{i}": "sink" for i in range(SINKS)},
    }


def pipelines_document(count: int) -> str:
    rng = random.Random(20261126)
    kinds = service_kinds()
    sources = [n for n, k in kinds.items() if k == "source"]
    transforms = [n for n, k in kinds.items() if k == "transform"]
    sinks = [n for n, k in kinds.items() if k == "sink"]
    texts = []
    for i in range(count):
        first, second = rng.sample(transforms, 2)
        texts.append(
            f"pipeline p{i:04d} {{\n"
            f"  source {sources[i % len(sources)]}\n"
            f"  | transform {first} (parallelism = {2 + 2 * (i % 4)})\n"
            f"  | transform {second} (parallelism = 4)\n"
            f"  | sink {rng.choice(sinks)}\n"
            "}\n"
        )
    return "".join(texts)


def sidecar_id(i: int) -> str:
    return f"sc-{i:04d}"


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p * len(ordered)) - 1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# -------------------------------------------------------------------------------------------------------
# Load generator: a separate process; reads JSON commands on stdin, answers one JSON line each on stdout.


@dataclass
class SimSidecar:
    index: int
    service: str
    kind: str
    load: float
    tokens: dict[str, int] = field(default_factory=dict)
    local: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    silenced: bool = False
    missed: bool = False
    inflight: asyncio.Future[None] | None = None
    last_ok: float = 0.0
    # Reports the spec generations it holds (heartbeat spec_generations), so an Assign of a generation it
    # has comes without the DagSpec; False emulates a sidecar before that change (full DAG every time).
    reports_specs: bool = True
    specs: dict[str, int] = field(default_factory=dict)
    # How it heartbeats: on a HeartbeatStream as a sidecar does (StreamedCall), or by call only.
    heartbeats: StreamedCall | None = None
    client: RouterClient | None = None

    @property
    def id(self) -> str:
        return sidecar_id(self.index)

    def apply(self, commands: Any) -> None:
        for command in commands:
            token = int(command.fencing_token)
            if command.HasField("assign"):
                dag = command.assign.dag_id or command.assign.dag.id
                if token < self.tokens.get(dag, 0):
                    continue
                self.tokens[dag] = token
                if command.assign.HasField("dag"):
                    self.specs[dag] = command.assign.dag.generation
                self.local[dag] = {(p.stage_id, p.replica) for p in command.assign.local}
            elif command.HasField("revoke"):
                dag = command.revoke.dag_id
                if token < self.tokens.get(dag, 0):
                    continue
                self.tokens[dag] = token
                if command.revoke.stage_ids:
                    gone = set(command.revoke.stage_ids)
                    self.local[dag] = {r for r in self.local.get(dag, set()) if r[0] not in gone}
                else:
                    self.local.pop(dag, None)

    def forget(self, dags: Any) -> None:
        """As sidecar/cluster.py does: drop the tokens of DAGs the router keeps nothing for, unless run."""
        for dag in dags:
            if not self.local.get(dag):
                self.tokens.pop(dag, None)
                self.specs.pop(dag, None)

    def heartbeat_request(self) -> control_pb2.SidecarHeartbeatRequest:
        running = sum(len(replicas) for replicas in self.local.values())
        request = control_pb2.SidecarHeartbeatRequest(
            sidecar_id=self.id,
            health=control_pb2.HEALTH_SERVING,
            load=control_pb2.SidecarLoad(
                records_per_second=1000.0 * running,
                buffer_utilization=self.load,
                cpu_seconds=0.5,
                rss_bytes=200 << 20,
                running_stages=running,
            ),
            applied_tokens=self.tokens,
            spec_generations=self.specs if self.reports_specs else {},
        )
        for dag, replicas in sorted(self.local.items()):
            for stage_id, _ in sorted(replicas):
                request.stages.append(
                    control_pb2.StageReport(
                        dag_id=dag,
                        stage_id=stage_id,
                        records_in=1000,
                        records_out=1000,
                        fencing_token=self.tokens.get(dag, 0),
                        health=control_pb2.HEALTH_SERVING,
                    )
                )
        return request


@dataclass
class Sample:
    started: float
    latency: float
    ok: bool
    commands: int
    reply_bytes: int
    reregister: bool
    reports_specs: bool = True


class Generator:
    def __init__(
        self,
        addresses: list[str],
        first: int,
        count: int,
        interval: float,
        seed: int,
        *,
        streams: bool = True,
        per_connection: int = SIDECARS_PER_CONNECTION,
    ) -> None:
        self.client = RouterClient(addresses, timeout=10)  # registrations, probes
        # Heartbeats over one connection per `per_connection` sidecars (a real sidecar has its own; one
        # for all would queue thousands of streams behind HTTP/2's concurrent-stream limit).
        self.heartbeat_clients = [
            RouterClient(addresses, timeout=10) for _ in range(math.ceil(count / per_connection))
        ]
        self.interval = interval
        rng = random.Random(seed)
        names = list(service_kinds().items())
        self.sidecars = {
            # Every other block of 20 (one sidecar per service) emulates a sidecar without spec diffs: the
            # same layout on both sides, so the reassignment burst compares the two in one run.
            sidecar_id(i): SimSidecar(
                i,
                *names[i % len(names)],
                load=rng.uniform(0.05, 0.3),
                reports_specs=(i // len(names)) % 2 == 0,
            )
            for i in range(first, first + count)
        }
        for j, sc in enumerate(self.sidecars.values()):
            sc.client = self.heartbeat_clients[j // per_connection]
            if streams:
                sc.heartbeats = StreamedCall(
                    sc.client, control_grpc.SidecarCoordinatorStub, "Heartbeat", "HeartbeatStream"
                )
        self.rng = rng
        self.samples: list[Sample] = []
        self.paused = False
        self.tasks: list[asyncio.Task[None]] = []
        self.probes: list[float] = []
        self.probe_task: asyncio.Task[None] | None = None

    async def register(self, concurrency: int = 32) -> float:
        started = time.monotonic()
        gate = asyncio.Semaphore(concurrency)
        stub = control_grpc.SidecarCoordinatorStub

        async def one(sc: SimSidecar) -> None:
            async with gate:
                request = control_pb2.RegisterSidecarRequest(
                    sidecar_id=sc.id,
                    data_address=f"127.0.0.1:{20000 + sc.index}",
                    services=[
                        control_pb2.ServiceInstance(
                            name=sc.service, kind=KIND_OF[sc.kind], endpoint="127.0.0.1:50051"
                        )
                    ],
                    version="bench",
                )
                # write=False: one RouterClient's sessions allow one write in flight (a higher sequence
                # applied first makes a lower one fail as "superseded"); re-registering is idempotent.
                reply = await self.client.call(stub, "RegisterSidecar", request, timeout=60)
                sc.apply(reply.commands)
                sc.last_ok = time.monotonic()
            # Heartbeats start at a random phase within one interval of the registration.
            self.tasks.append(asyncio.ensure_future(self.heartbeat_loop(sc)))

        await asyncio.gather(*(one(sc) for sc in self.sidecars.values()))
        return time.monotonic() - started

    async def heartbeat_loop(self, sc: SimSidecar) -> None:
        next_at = time.monotonic() + self.rng.uniform(0, self.interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += self.interval
            if self.paused:
                sc.missed = True
            elif not sc.silenced:
                await self.beat(sc)

    async def catch_up(self, sc: SimSidecar, delay: float) -> None:
        """After a pause: one heartbeat soon, so the pause cannot add a whole interval of silence."""
        await asyncio.sleep(delay)
        if sc.inflight is None and not sc.silenced:
            await self.beat(sc)

    async def beat(self, sc: SimSidecar) -> None:
        stub = control_grpc.SidecarCoordinatorStub
        started = time.monotonic()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sc.inflight = done
        try:
            request = sc.heartbeat_request()
            if sc.heartbeats is not None:
                reply = await sc.heartbeats(request, 10)
            else:
                assert sc.client is not None
                reply = await sc.client.call(stub, "Heartbeat", request, timeout=10)
        except Exception:
            self.samples.append(Sample(started, time.monotonic() - started, False, 0, 0, False))
        else:
            ended = time.monotonic()
            sc.last_ok = ended
            sc.apply(reply.commands)
            sc.forget(reply.forget_dags)
            self.samples.append(
                Sample(
                    started,
                    ended - started,
                    True,
                    len(reply.commands),
                    reply.ByteSize(),
                    reply.reregister,
                    sc.reports_specs,
                )
            )
        finally:
            sc.inflight = None
            done.set_result(None)

    async def cluster_status(self) -> float:
        started = time.perf_counter()
        await self.client.call(
            admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
        )
        return time.perf_counter() - started

    async def probe_loop(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += 1 / PROBE_RATE
            self.probes.append(await self.cluster_status())
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "register":
            return {"seconds": await self.register()}
        if op == "stats":
            lo, hi = command["from"], command["to"]
            window = [s for s in self.samples if lo <= s.started < hi]
            return {
                "latencies": [s.latency for s in window if s.ok],
                "errors": sum(not s.ok for s in window),
                "with_commands": sum(s.commands > 0 for s in window),
                "reply_bytes": sum(s.reply_bytes for s in window),
                "reregister": sum(s.reregister for s in window),
                # Split by sidecar kind: spec diffs on / off (the before and after of one run).
                "diff_bytes": sum(s.reply_bytes for s in window if s.reports_specs),
                "diff_answers": sum(1 for s in window if s.reports_specs and s.ok),
                "full_bytes": sum(s.reply_bytes for s in window if not s.reports_specs),
                "full_answers": sum(1 for s in window if not s.reports_specs and s.ok),
            }
        if op == "pause":
            self.paused = True
            pending = [sc.inflight for sc in self.sidecars.values() if sc.inflight is not None]
            await asyncio.gather(*pending)
            return {}
        if op == "resume":
            self.paused = False
            for sc in self.sidecars.values():
                if sc.missed:
                    sc.missed = False
                    delay = self.rng.uniform(0, CATCH_UP_SPREAD)
                    self.tasks.append(asyncio.ensure_future(self.catch_up(sc, delay)))
            return {}
        if op == "probe_start":
            self.probes = []
            self.probe_task = asyncio.ensure_future(self.probe_loop())
            return {}
        if op == "probe_stop":
            if self.probe_task is not None:
                self.probe_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self.probe_task
            return {"latencies": self.probes}
        if op == "floor":
            return {"latencies": [await self.cluster_status() for _ in range(command["calls"])]}
        if op == "tables":
            return {"max_tokens": max(len(sc.tokens) for sc in self.sidecars.values())}
        if op == "silence":
            sc = self.sidecars[command["sidecar"]]
            sc.silenced = True
            if sc.inflight is not None:
                await sc.inflight
            return {"last_ok": sc.last_ok}
        raise ValueError(f"unknown op {op!r}")

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        try:
            while line := await reader.readline():
                command = json.loads(line)
                if command["op"] == "quit":
                    break
                reply = await self.handle(command)
                sys.stdout.write(json.dumps(reply) + "\n")
                sys.stdout.flush()
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            for sc in self.sidecars.values():
                if sc.heartbeats is not None:
                    await sc.heartbeats.close()
            for client in (self.client, *self.heartbeat_clients):
                client.close()


def worker_main(args: argparse.Namespace) -> None:
    def generator() -> Generator:
        return Generator(
            args.addresses.split(","),
            args.first,
            args.count,
            args.interval,
            args.first,
            streams=args.heartbeats == "stream",
        )

    try:
        import uvloop

        uvloop.run(generator().serve())
    except ImportError:
        asyncio.run(generator().serve())


# -------------------------------------------------------------------------------------------------------
# The orchestrator.


class Routers:
    """Three router processes on loopback; logs in the work directory."""

    def __init__(self, workdir: Path, *, fsync: bool, timeout_ms: int, interval_ms: int) -> None:
        self.workdir = workdir
        self.ids = [f"router-{i}" for i in range(3)]
        self.grpc = {n: free_port() for n in self.ids}
        self.http = {n: free_port() for n in self.ids}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "ETLROUTER_ROUTER__RAFT__FSYNC": "true" if fsync else "false",
            "ETLROUTER_ROUTER__SIDECAR_HEARTBEAT_TIMEOUT_MS": str(timeout_ms),
            "ETLROUTER_ROUTER__LEADER_GRACE_MS": str(timeout_ms),
            "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": str(interval_ms),
        }

    def address(self, node: str) -> str:
        return f"127.0.0.1:{self.grpc[node]}"

    def start(self) -> None:
        peers = [arg for n in self.ids for arg in ("--peer", f"{n}={self.address(n)}")]
        for node in self.ids:
            log = (self.workdir / f"{node}.log").open("ab")
            self.procs[node] = subprocess.Popen(
                [
                    *(sys.executable, "-m", "etlrouter", "--log-format", "json", "router"),
                    *("--node-id", node, "--data-dir", str(self.workdir / node), *peers),
                    *("--grpc-port", str(self.grpc[node]), "--http-port", str(self.http[node])),
                ],
                stdout=log,
                stderr=log,
                env=self.env,
            )

    def ready(self, node: str) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http[node]}/readyz", timeout=2) as r:
                return bool(json.loads(r.read()).get("ready"))
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not all(self.ready(n) for n in self.ids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"routers not ready after {timeout} s; logs in {self.workdir}")
            time.sleep(0.1)

    def heartbeats_served(self, node: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http[node]}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith("etlrouter_sidecar_heartbeats_total "):
                    return float(line.split()[1])
        return 0.0

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()


class WorkerProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def spawn(
        cls, workdir: Path, addresses: list[str], first: int, count: int, interval: float, heartbeats: str
    ) -> WorkerProcess:
        log = (workdir / f"generator-{first}.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--worker",
            "--addresses",
            ",".join(addresses),
            "--first",
            str(first),
            "--count",
            str(count),
            "--interval",
            str(interval),
            "--heartbeats",
            heartbeats,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            limit=64 << 20,  # a stats reply is one line of every latency sample: > 64 KiB at 2,000 sidecars
        )
        return cls(proc)

    async def request(self, op: str, **kwargs: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kwargs}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited (code {await self.proc.wait()}); see its log")
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"op": "quit"}\n')
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


SPLIT_KEYS = ("diff_bytes", "diff_answers", "full_bytes", "full_answers")


async def gather_stats(workers: list[WorkerProcess], lo: float, hi: float) -> dict[str, Any]:
    parts = await asyncio.gather(*(w.request("stats", **{"from": lo, "to": hi}) for w in workers))
    return {
        "latencies": [x for p in parts for x in p["latencies"]],
        "errors": sum(p["errors"] for p in parts),
        "with_commands": sum(p["with_commands"] for p in parts),
        "reply_bytes": sum(p["reply_bytes"] for p in parts),
        "reregister": sum(p["reregister"] for p in parts),
        **{
            key: sum(p[key] for p in parts)
            for key in ("diff_bytes", "diff_answers", "full_bytes", "full_answers")
        },
    }


@dataclass
class CpuWindow:
    seconds: float
    leader: str  # at the start of the window
    leader_cpu: float
    follower_cpu: float  # mean of the other two
    routers_cpu: float  # all three
    heartbeats: float  # served by whichever router led
    elections: int  # term changes during the window
    machine_busy: float  # CPU seconds the whole machine spent (all processes, /proc/stat)
    bench_cpu: float  # of which this benchmark's processes: routers, generators, this script

    @property
    def leader_share(self) -> float:
        return self.leader_cpu / self.seconds


def machine_busy_seconds() -> float:
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / CLK_TCK  # minus idle and iowait


async def cpu_window(
    routers: Routers, client: RouterClient, workers: list[WorkerProcess], seconds: float
) -> CpuWindow:
    leader, term = await leader_of(client)
    pids = {n: routers.procs[n].pid for n in routers.ids}
    others = [os.getpid(), *(w.proc.pid for w in workers)]
    hb0 = sum(routers.heartbeats_served(n) for n in routers.ids)
    t0 = time.monotonic()
    cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
    other0, machine0 = sum(cpu_seconds(pid) for pid in others), machine_busy_seconds()
    await asyncio.sleep(seconds)
    cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
    other1, machine1 = sum(cpu_seconds(pid) for pid in others), machine_busy_seconds()
    elapsed = time.monotonic() - t0
    hb1 = sum(routers.heartbeats_served(n) for n in routers.ids)
    _, term1 = await leader_of(client)
    delta = {n: cpu1[n] - cpu0[n] for n in routers.ids}
    return CpuWindow(
        seconds=elapsed,
        leader=leader,
        leader_cpu=delta[leader],
        follower_cpu=sum(v for n, v in delta.items() if n != leader) / (len(delta) - 1),
        routers_cpu=sum(delta.values()),
        heartbeats=hb1 - hb0,
        elections=term1 - term,
        machine_busy=machine1 - machine0,
        bench_cpu=sum(delta.values()) + other1 - other0,
    )


async def leader_of(client: RouterClient) -> tuple[str, int]:
    status = await client.call(
        admin_grpc.PipelineAdminStub, "GetClusterStatus", admin_pb2.GetClusterStatusRequest()
    )
    return str(status.leader_id), int(status.term)


async def holdings(client: RouterClient) -> dict[str, set[tuple[str, int]]]:
    reply = await client.call(admin_grpc.PipelineAdminStub, "ListSidecars", admin_pb2.ListSidecarsRequest())
    return {s.sidecar_id: {(p.stage_id, p.replica) for p in s.stages} for s in reply.sidecars}


async def run(args: argparse.Namespace, fsync: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="etlrouter-cp-bench-"))
    routers = Routers(
        workdir, fsync=fsync, timeout_ms=int(args.timeout * 1000), interval_ms=int(args.interval * 1000)
    )
    workers: list[WorkerProcess] = []
    client: RouterClient | None = None
    out: dict[str, Any] = {"fsync": fsync, "workdir": str(workdir)}
    try:
        routers.start()
        await asyncio.to_thread(routers.wait_ready)
        client = RouterClient([routers.address(n) for n in routers.ids], timeout=30)
        _, first_term = await leader_of(client)
        await asyncio.sleep(1.0)
        out["idle_empty"] = await cpu_window(routers, client, workers, args.idle_empty)

        # -- register, apply, place ---------------------------------------------------------------------
        addresses = [routers.address(n) for n in routers.ids]
        share = math.ceil(args.sidecars / args.generators)
        for g in range(args.generators):
            first = g * share
            count = min(share, args.sidecars - first)
            if count > 0:
                workers.append(
                    await WorkerProcess.spawn(
                        workdir, addresses, first, count, args.interval, args.heartbeats
                    )
                )
        started = time.monotonic()
        await asyncio.gather(*(w.request("register") for w in workers))
        out["register_s"] = time.monotonic() - started
        started = time.monotonic()
        document = pipelines_document(args.pipelines)
        await client.call(
            admin_grpc.PipelineAdminStub,
            "ApplyPipelines",
            admin_pb2.ApplyPipelinesRequest(definition=document, filename="bench.etl"),
            write=True,
            timeout=60,
        )
        out["apply_s"] = time.monotonic() - started
        while True:
            listing = await client.call(
                admin_grpc.PipelineAdminStub, "ListPipelines", admin_pb2.ListPipelinesRequest()
            )
            if listing.pipelines and all(
                p.phase == admin_pb2.PIPELINE_PHASE_RUNNING for p in listing.pipelines
            ):
                break
            if time.monotonic() - started > 60:
                raise TimeoutError("pipelines not running after 60 s")
            await asyncio.sleep(0.1)
        out["placed_s"] = time.monotonic() - started
        out["dags"] = len(listing.dags)
        out["stages"] = sum(len(d.stages) for d in listing.dags)
        out["replicas"] = sum(max(1, s.parallelism) for d in listing.dags for s in d.stages)
        out["pipelines"] = len(listing.pipelines)

        # -- (a) loaded window, then idle window ---------------------------------------------------------
        await asyncio.sleep(args.interval + 1.0)  # every sidecar has fetched its Assign
        await workers[0].request("probe_start")
        lo = time.monotonic()
        out["loaded"] = await cpu_window(routers, client, workers, args.window)
        hi = time.monotonic()
        out["probe"] = (await workers[0].request("probe_stop"))["latencies"]
        out["hb"] = await gather_stats(workers, lo, hi)

        await asyncio.gather(*(w.request("pause") for w in workers))
        await asyncio.sleep(0.3)
        # Nobody may expire: the longest silence is one interval + this window + the floor calls + the
        # catch-up spread after resuming.
        idle_s = min(args.idle, args.timeout - args.interval - CATCH_UP_SPREAD - 2.0)
        out["idle"] = await cpu_window(routers, client, workers, idle_s)
        out["floor"] = (await workers[0].request("floor", calls=FLOOR_CALLS))["latencies"]
        await asyncio.gather(*(w.request("resume") for w in workers))
        resumed = time.monotonic()
        await asyncio.sleep(args.interval + 1.0)
        out["after_pause"] = await gather_stats(workers, resumed, time.monotonic())

        # -- (b) a sidecar holding several replicas falls silent -----------------------------------------
        held = await holdings(client)
        victim = max(sorted(held), key=lambda s: len(held[s]))
        replicas = held[victim]
        owner = workers[int(victim.removeprefix("sc-")) // share]
        out["victim"], out["victim_replicas"] = victim, len(replicas)
        leader, term_before = await leader_of(client)
        leader_address = routers.address(leader)
        watch_stub = control_grpc.ServiceRegistryStub(client.channel(leader_address))
        deregistered = asyncio.get_running_loop().create_future()
        listed = asyncio.get_running_loop().create_future()

        async def watch() -> None:
            async with watch_stub.Watch.open() as stream:
                await stream.send_message(control_pb2.WatchRequest(kinds=["sidecars"]), end=True)
                while (event := await stream.recv_message()) is not None:
                    if event.type == control_pb2.WatchEvent.TYPE_BOOKMARK and not listed.done():
                        listed.set_result(None)
                    if event.type == control_pb2.WatchEvent.TYPE_DELETE and event.name == victim:
                        deregistered.set_result(time.monotonic())

        watcher = asyncio.ensure_future(watch())
        await asyncio.wait_for(listed, 10)
        last_ok = (await owner.request("silence", sidecar=victim))["last_ok"]
        silent_at = time.monotonic()
        t_dereg = await asyncio.wait_for(deregistered, args.timeout + 30)
        polls = 0
        while True:
            now_held = await holdings(client)
            polls += 1
            t_poll = time.monotonic()
            others = set().union(*(v for k, v in now_held.items() if k != victim))
            if victim not in now_held and replicas <= others:
                break
            if t_poll - t_dereg > 30:
                raise TimeoutError(f"replicas of {victim} not reassigned 30 s after its deregistration")
            await asyncio.sleep(0.05)
        out["silence_lag"] = silent_at - last_ok
        out["dereg"] = t_dereg - last_ok
        out["reassigned"] = t_poll - last_ok
        out["new_holders"] = sorted(k for k, v in now_held.items() if v & replicas)
        _, term_after = await leader_of(client)
        watcher.cancel()  # a server stream: leaving it normally would wait for trailers that never come
        await asyncio.gather(watcher, return_exceptions=True)
        # The next interval: every sidecar of a changed DAG fetches it again.
        burst_lo = t_poll
        burst = await cpu_window(routers, client, workers, args.interval + 0.5)
        out["burst_cpu"] = burst
        out["burst"] = await gather_stats(workers, burst_lo, burst_lo + args.interval)
        out["b_elections"] = term_after - term_before
        out["churn"] = await churn(client, workers, args)
        _, last_term = await leader_of(client)
        out["elections"] = last_term - first_term
        out["expired_in_log"] = [
            json.loads(line).get("sidecar", "?")
            for node in routers.ids
            for line in (workdir / f"{node}.log").read_text(errors="replace").splitlines()
            if "sidecar silent past the timeout" in line
        ]
        return out
    finally:
        await asyncio.gather(*(w.quit() for w in workers), return_exceptions=True)
        if client is not None:
            client.close()
        await asyncio.to_thread(routers.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


async def snapshot_bytes(client: RouterClient) -> int:
    """The size of the replicated state: a backup snapshot from the leader (BackupService)."""
    channel = client.channel(client.leader_address or client.addresses[0])
    total = 0
    async with admin_grpc.BackupServiceStub(channel).CreateSnapshot.open() as stream:
        await stream.send_message(admin_pb2.CreateSnapshotRequest(), end=True)
        async for chunk in stream:
            total += len(chunk.data)
    return total


async def largest_token_table(workers: list[WorkerProcess]) -> int:
    """The most fencing tokens any simulated sidecar keeps."""
    return max(int(t["max_tokens"]) for t in await asyncio.gather(*(w.request("tables") for w in workers)))


async def churn(
    client: RouterClient, workers: list[WorkerProcess], args: argparse.Namespace
) -> dict[str, Any]:
    """6. churn: apply and delete `--churn` pipelines of their own DAG one after the other (the sidecars go
    on heartbeating), wait three intervals, and compare the state's size and the largest fencing-token
    table of any sidecar with before."""
    stub = admin_grpc.PipelineAdminStub
    before = await snapshot_bytes(client)
    tables_before = await largest_token_table(workers)
    for i in range(args.churn):
        text = f"pipeline churn-{i} {{ source src-0 (batch_size = {1 + i}) | sink sink-0 }}\n"
        await client.call(
            stub, "ApplyPipelines", admin_pb2.ApplyPipelinesRequest(definition=text, filename="churn.etl")
        )
        await client.call(stub, "DeletePipeline", admin_pb2.DeletePipelineRequest(name=f"churn-{i}"))
    peak = await snapshot_bytes(client)
    await asyncio.sleep(3 * args.interval + 2)
    after = await snapshot_bytes(client)
    tables_after = await largest_token_table(workers)
    return {
        "before": before,
        "peak": peak,
        "after": after,
        "tokens_before": tables_before,
        "tokens_after": tables_after,
    }


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def report(args: argparse.Namespace, r: dict[str, Any]) -> None:
    loaded, idle, empty = r["loaded"], r["idle"], r["idle_empty"]
    hb, probe, floor = r["hb"], r["probe"], r["floor"]
    hb_rate = loaded.heartbeats / loaded.seconds
    extra_share = loaded.leader_share - idle.leader_share
    per_hb = extra_share / hb_rate if hb_rate else float("nan")
    all_per_hb = (loaded.routers_cpu / loaded.seconds - idle.routers_cpu / idle.seconds) / max(hb_rate, 1e-9)
    lat = hb["latencies"]
    burst, burst_cpu = r["burst"], r["burst_cpu"]
    blat = burst["latencies"]
    cores = os.cpu_count() or 1

    def flag(*windows: CpuWindow) -> str:
        n = sum(w.elections for w in windows)
        return f" **{n} election(s) in the window: leader figures invalid**" if n else ""

    def pct(share: float) -> str:
        return f"{100 * share:.1f} %"

    print(
        f"\n## fsync {'on' if r['fsync'] else 'off'}: {args.sidecars} sidecars, {r['pipelines']} pipelines"
        f" -> {r['dags']} DAGs, {r['stages']} stages, {r['replicas']} replicas; heartbeat interval"
        f" {args.interval:g} s, timeout {args.timeout:g} s; heartbeats by {args.heartbeats}"
    )
    print(
        f"setup: register {args.sidecars} sidecars {r['register_s']:.1f} s"
        f" ({args.sidecars / r['register_s']:.0f}/s), ApplyPipelines {r['apply_s']:.2f} s,"
        f" all pipelines running {r['placed_s']:.2f} s after the apply"
    )
    rows = [
        (
            f"leader CPU, heartbeats running ({hb_rate:.0f} hb/s, {loaded.seconds:.0f} s){flag(loaded)}",
            f"{pct(loaded.leader_share)} of a core",
            f"{pct(idle.leader_share)}: same registry, no heartbeats ({idle.seconds:.0f} s){flag(idle)}",
            f"+{pct(extra_share)}",
        ),
        (
            "leader CPU per heartbeat (difference / heartbeats)",
            f"{per_hb * 1e6:.0f} µs",
            "",
            f"one core: ~{1 / per_hb:.0f} hb/s"
            f" = ~{args.interval / per_hb:.0f} sidecars at {args.interval:g} s",
        ),
        ("all 3 routers' CPU per heartbeat (same, summed)", f"{all_per_hb * 1e6:.0f} µs", "", ""),
        (
            f"leader CPU idle, {args.sidecars} sidecars + pipelines",
            pct(idle.leader_share),
            f"{pct(empty.leader_share)}: empty registry ({empty.seconds:.0f} s){flag(empty)}",
            f"{idle.leader_share / max(empty.leader_share, 1e-9):.1f}x",
        ),
        (
            "follower CPU (mean of 2), heartbeats running",
            pct(loaded.follower_cpu / loaded.seconds),
            f"{pct(idle.follower_cpu / idle.seconds)} idle",
            "",
        ),
        (
            f"heartbeat latency p50 / p99 ({len(lat)} samples, {hb['errors']} errors)",
            f"{ms(percentile(lat, 0.5))} / {ms(percentile(lat, 0.99))} ms",
            f"GetClusterStatus, same window, {PROBE_RATE:g}/s ({len(probe)}):"
            f" {ms(percentile(probe, 0.5))} / {ms(percentile(probe, 0.99))} ms",
            f"{percentile(lat, 0.5) / percentile(probe, 0.5):.1f}x /"
            f" {percentile(lat, 0.99) / percentile(probe, 0.99):.1f}x",
        ),
        (
            f"GetClusterStatus p50 / p99, no load ({len(floor)} sequential)",
            f"{ms(percentile(floor, 0.5))} / {ms(percentile(floor, 0.99))} ms",
            "",
            f"heartbeat p50 = {percentile(lat, 0.5) / percentile(floor, 0.5):.1f}x this",
        ),
        (
            "heartbeat answers carrying commands, steady state",
            f"{hb['with_commands']} of {len(lat)}",
            "",
            f"{hb['reply_bytes'] / max(1, len(lat)):.0f} B per answer",
        ),
        (
            f"(b) {r['victim']} ({r['victim_replicas']} replicas): last heartbeat -> deregistered"
            " (Watch on the leader)",
            f"{r['dereg']:.2f} s",
            f"heartbeat timeout {args.timeout:g} s",
            f"+{r['dereg'] - args.timeout:.2f} s",
        ),
        (
            f"(b) last heartbeat -> all {r['victim_replicas']} replicas held by others (ListSidecars, 50 ms)",
            f"{r['reassigned']:.2f} s",
            f"deregistration {r['dereg']:.2f} s",
            f"+{1000 * (r['reassigned'] - r['dereg']):.0f} ms",
        ),
        (
            f"next {args.interval:g} s: answers carrying commands",
            f"{burst['with_commands']} of {len(blat)}",
            f"steady: {hb['with_commands']} of {len(lat)}",
            f"{burst['reply_bytes'] / max(1, len(blat)):.0f} B per answer",
        ),
        (
            f"next {args.interval:g} s: bytes to the half of the sidecars that report the specs they hold"
            " (Assign diffs) vs the half that do not (full DAG, the old behaviour)",
            f"{burst['diff_bytes'] / 1024:.1f} KiB ({burst['diff_answers']} answers)",
            f"full: {burst['full_bytes'] / 1024:.1f} KiB ({burst['full_answers']} answers)",
            f"{burst['diff_bytes'] / max(1, burst['full_bytes']):.2f}x",
        ),
        (
            f"next {args.interval:g} s: heartbeat p50 / p99; leader CPU{flag(burst_cpu)}",
            f"{ms(percentile(blat, 0.5))} / {ms(percentile(blat, 0.99))} ms; {pct(burst_cpu.leader_share)}",
            f"steady {ms(percentile(lat, 0.5))} / {ms(percentile(lat, 0.99))} ms; {pct(loaded.leader_share)}",
            "",
        ),
        (
            "machine CPU busy during the loaded window (/proc/stat)",
            f"{loaded.machine_busy / loaded.seconds:.2f} of {cores} cores",
            f"this benchmark's processes: {loaded.bench_cpu / loaded.seconds:.2f} cores",
            f"other work: {(loaded.machine_busy - loaded.bench_cpu) / loaded.seconds:.2f} cores",
        ),
    ]
    c = r["churn"]
    rows.append(
        (
            f"6. churn: {args.churn} pipelines applied and deleted; the state (a backup) 3 intervals on",
            f"{c['after']} B (peak {c['peak']} B)",
            f"before: {c['before']} B",
            f"largest sidecar token table {c['tokens_after']} (before {c['tokens_before']})",
        )
    )
    print("\n| measurement | value | baseline | ratio / difference |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(
        f"\nnew holders: {', '.join(r['new_holders'])}; the silence began {1000 * r['silence_lag']:.0f} ms"
        f" after the last answer; after the idle pause: {r['after_pause']['reregister']} answers said"
        f" `reregister`, {r['after_pause']['errors']} errors; sidecars expired (router logs):"
        f" {', '.join(r['expired_in_log']) or 'none'}; elections (term changes) during the run:"
        f" {r['elections']}, during (b): {r['b_elections']}"
    )
    if args.keep:
        print(f"logs: {r['workdir']}")


async def main_async(args: argparse.Namespace) -> None:
    print(
        f"machine: {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable),"
        f" load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {args.generators} load generators;"
        " routers, generators and this script share the cores"
    )
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.fsync]
    for fsync in modes:
        started = time.monotonic()
        result = await run(args, fsync)
        report(args, result)
        print(f"(run took {time.monotonic() - started:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sidecars", type=int, default=1000)
    parser.add_argument("--pipelines", type=int, default=200)
    parser.add_argument("--interval", type=float, default=5.0, help="heartbeat interval, seconds")
    parser.add_argument("--timeout", type=float, default=15.0, help="router's sidecar heartbeat timeout, s")
    parser.add_argument("--window", type=float, default=20.0, help="loaded measurement window, seconds")
    parser.add_argument("--idle", type=float, default=6.0, help="idle window (capped at timeout-interval-4)")
    parser.add_argument("--idle-empty", type=float, default=5.0, help="idle window before registration")
    parser.add_argument("--generators", type=int, default=2)
    parser.add_argument("--churn", type=int, default=200, help="pipelines applied and deleted in phase 6")
    parser.add_argument("--fsync", choices=["on", "off", "both"], default="on")
    parser.add_argument(
        "--heartbeats",
        choices=["stream", "call"],
        default="stream",
        help="sidecars heartbeat on a HeartbeatStream (as etlrouter sidecar does) or by one call each",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (router logs)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--addresses", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.timeout - args.interval - CATCH_UP_SPREAD - 2.0 < 1.0:
        parser.error("--timeout must exceed --interval by at least 5 s (the idle window must fit)")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
