"""Routers, sidecars and services, each node in its own network namespace on one private bridge.

router-0..2 run `etlrouter router`; `sc-src` runs a generator source and its sidecar; `sc-sink-a` and
`sc-sink-b` each run a jsonl file sink named `out` and a sidecar (the leader places the one sink replica on
one of them and moves it when that sidecar goes silent); `client` runs the test's clients (a thread in its
namespace). Logs and data stay on the shared file system under `workdir`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from etlrouter.testing.netns import Topology

ROUTERS = ["router-0", "router-1", "router-2"]
SINKS = ["sc-sink-a", "sc-sink-b"]
SIDECARS = ["sc-src", *SINKS]
GRPC, HTTP, SIDECAR_GRPC, SIDECAR_HTTP, SERVICE = 7400, 7480, 7500, 7580, 50051
TICK_MS, ELECTION_TICKS = 50, 10
SIDECAR_HEARTBEAT_TIMEOUT_MS = 3000
PIPELINE = "pipeline flow { source orders (batch_size = 50) | sink out }\n"


class NetnsSystem:
    def __init__(self, workdir: Path, rate: int = 200) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.net = Topology()
        self.rate = rate
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.state_file = workdir / "generator.state"
        self.sink_files = {name: workdir / f"{name}.jsonl" for name in SINKS}

    # -- topology and processes -----------------------------------------------------------------------

    def create(self) -> None:
        self.net.create()
        for name in [*ROUTERS, *SIDECARS, "client"]:
            self.net.add(name)

    def address(self, node: str) -> str:
        return self.net.nodes[node].address

    def router_address(self, node: str) -> str:
        return f"{self.address(node)}:{GRPC}"

    @property
    def router_addresses(self) -> list[str]:
        return [self.router_address(n) for n in ROUTERS]

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return {**os.environ, "ETLROUTER_LOGGING__FORMAT": "json", **extra}

    def _start(self, node: str, name: str, args: list[str], env: dict[str, str]) -> None:
        log = str(self.workdir / f"{name}.log")
        self.procs[name] = self.net.popen(node, [sys.executable, *args], env=self._env(env), log_path=log)

    def start_router(self, node: str) -> None:
        env = {
            "ETLROUTER_ROUTER__GRPC__HOST": self.address(node),
            "ETLROUTER_ROUTER__RAFT__TICK_MS": str(TICK_MS),
            "ETLROUTER_ROUTER__RAFT__ELECTION_TICKS": str(ELECTION_TICKS),
            "ETLROUTER_ROUTER__RAFT__FSYNC": "false",
            "ETLROUTER_ROUTER__SIDECAR_HEARTBEAT_TIMEOUT_MS": str(SIDECAR_HEARTBEAT_TIMEOUT_MS),
            "ETLROUTER_ROUTER__LEADER_GRACE_MS": "3000",
        }
        peers = [arg for other in ROUTERS for arg in ("--peer", f"{other}={self.router_address(other)}")]
        ports = ["--grpc-port", str(GRPC), "--http-port", str(HTTP)]
        data = ["--data-dir", str(self.workdir / node)]
        self._start(node, node, ["-m", "etlrouter", "router", "--node-id", node, *ports, *data, *peers], env)

    def start_sidecar(self, node: str) -> None:
        env = {
            "ETLROUTER_SIDECAR__GRPC__HOST": self.address(node),
            "ETLROUTER_SIDECAR__DATA_DIR": str(self.workdir / node),
            "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500",
            "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
            "ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS": "3000",
        }
        routers = [arg for address in self.router_addresses for arg in ("--router", address)]
        ports = [
            "--scan-ports",
            str(SERVICE),
            "--grpc-port",
            str(SIDECAR_GRPC),
            "--http-port",
            str(SIDECAR_HTTP),
        ]
        self._start(node, node, ["-m", "etlrouter", "sidecar", "--id", node, *routers, *ports], env)

    def start(self) -> None:
        for node in ROUTERS:
            self.start_router(node)
        generator = ["--rate", str(self.rate), "--seed", "7", "--state-file", str(self.state_file)]
        self._start(
            "sc-src",
            "orders",
            ["-m", "etlrouter.connectors.generator", "--name", "orders", "--port", str(SERVICE), *generator],
            {},
        )
        for node in SINKS:
            sink = ["--path", str(self.sink_files[node])]
            args = ["-m", "etlrouter.connectors.jsonl_file_sink", "--name", "out", "--port", str(SERVICE)]
            self._start(node, f"out-{node}", [*args, *sink], {})
        self.wait_routers_ready(60)
        for node in SIDECARS:
            self.start_sidecar(node)
        deadline = time.monotonic() + 60
        while not all(self.http_ready(n, SIDECAR_HTTP) for n in SIDECARS):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sidecars not ready; logs in {self.workdir}")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=8)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            self.net.destroy()

    # -- observations ---------------------------------------------------------------------------------

    def http_ready(self, node: str, port: int) -> bool:
        def probe() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    return bool(json.loads(r.read()).get("ready"))
            except (OSError, urllib.error.HTTPError, ValueError):
                return False

        return self.net.run_in(node, probe)

    def wait_routers_ready(self, timeout: float) -> float:
        """Wait until every router is part of a cluster with a known leader; returns the seconds waited."""
        start = time.monotonic()
        while not all(self.http_ready(n, HTTP) for n in ROUTERS):
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"routers not ready after {timeout} s; logs in {self.workdir}")
            time.sleep(0.1)
        return time.monotonic() - start

    def acked_offset(self) -> int:
        try:
            return int(json.loads(self.state_file.read_text()).get("0", -1))
        except (OSError, ValueError):
            return -1

    def sink_offsets(self) -> dict[str, set[int]]:
        out: dict[str, set[int]] = {}
        for node, path in self.sink_files.items():
            lines = path.read_text().split("\n")[:-1] if path.exists() else []
            out[node] = {int(json.loads(line)["offset"]) for line in lines if line.strip()}
        return out

    def all_sink_offsets(self) -> set[int]:
        return set().union(*self.sink_offsets().values())

    def log_lines(self, name: str) -> list[dict[str, object]]:
        path = self.workdir / f"{name}.log"
        entries = []
        for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
            if line.startswith("{"):
                try:
                    entries.append(json.loads(line))
                except ValueError:
                    continue
        return entries

    def leadership_claims(self) -> list[tuple[float, str, int, str]]:
        """(wall time, node, term, leader) from every router's "raft role changed" log lines that name a
        leader: the complete record of who each node took as the leader of each term."""
        claims = []
        for node in ROUTERS:
            for entry in self.log_lines(node):
                if entry.get("msg") == "raft role changed" and entry.get("leader"):
                    ts, term = float(entry["ts"]), int(entry["term"])  # type: ignore[arg-type, call-overload]
                    claims.append((ts, node, term, str(entry["leader"])))
        return claims

    def running(self, sidecar: str) -> tuple[set[str], list[tuple[str, int]]]:
        """What a sidecar runs now (dag/stage#replica), from its own log, and the (dag, token) pairs it
        applied, in order."""
        local: dict[str, set[str]] = {}
        tokens: list[tuple[str, int]] = []
        for entry in self.log_lines(sidecar):
            if entry.get("msg") == "assignment applied":
                dag = str(entry["dag"])
                local[dag] = {str(s) for s in entry.get("local", [])}  # type: ignore[attr-defined]
                tokens.append((dag, int(entry["token"])))  # type: ignore[call-overload]
            elif entry.get("msg") == "revoked":
                dag = str(entry["dag"])
                stages = {str(s) for s in entry.get("stages", [])}  # type: ignore[attr-defined]
                local[dag] = {r for r in local.get(dag, set()) if r.split("#")[0] not in stages}
        return {f"{dag}/{r}" for dag, runs in local.items() for r in runs}, tokens
