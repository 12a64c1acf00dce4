"""Real `etlrouter router` processes on loopback, for integration tests (and reusable by later suites)."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port

TICK_MS = 50
ELECTION_TICKS = 10


class RouterProcesses:
    """N router processes forming one cluster. Logs go to files under `workdir` for post-mortems."""

    def __init__(
        self,
        workdir: Path,
        size: int = 3,
        *,
        fsync: bool = True,
        env_for: Callable[[str], dict[str, str]] | None = None,
        https: ssl.SSLContext | None = None,
    ) -> None:
        self.workdir = workdir
        # Extra environment per node (TLS settings: tests/security/pki.py), and how to reach HTTPS /readyz.
        self.env_for = env_for or (lambda node: {})
        self.https = https
        workdir.mkdir(parents=True, exist_ok=True)
        self.ids = [f"router-{i}" for i in range(size)]
        self.grpc_ports = {node: free_port() for node in self.ids}
        self.http_ports = {node: free_port() for node in self.ids}
        self.fsync = fsync
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def address(self, node: str) -> str:
        return f"127.0.0.1:{self.grpc_ports[node]}"

    @property
    def addresses(self) -> list[str]:
        return [self.address(node) for node in self.ids]

    def add_joining(self, node: str) -> None:
        """Start a new, empty router that joins the running cluster through the existing members."""
        existing = list(self.ids)
        self.ids.append(node)
        self.grpc_ports[node], self.http_ports[node] = free_port(), free_port()
        self.start(node, join=[self.address(n) for n in existing])

    def start(self, node: str, *, join: list[str] | None = None) -> None:
        env = {
            **os.environ,
            "ETLROUTER_ROUTER__RAFT__TICK_MS": str(TICK_MS),
            "ETLROUTER_ROUTER__RAFT__ELECTION_TICKS": str(ELECTION_TICKS),
            "ETLROUTER_ROUTER__RAFT__FSYNC": "true" if self.fsync else "false",
            "ETLROUTER_ROUTER__SIDECAR_HEARTBEAT_TIMEOUT_MS": "3000",
            "ETLROUTER_ROUTER__LEADER_GRACE_MS": "3000",
            **self.env_for(node),
        }
        if join:
            peers = [arg for address in join for arg in ("--join", address)]
        else:
            peers = [arg for other in self.ids for arg in ("--peer", f"{other}={self.address(other)}")]
        log = (self.workdir / f"{node}.log").open("ab")
        ports = ["--grpc-port", str(self.grpc_ports[node]), "--http-port", str(self.http_ports[node])]
        args = ["router", "--node-id", node, *ports, "--data-dir", str(self.workdir / node), *peers]
        self.procs[node] = subprocess.Popen(
            [sys.executable, "-m", "etlrouter", "--log-format", "json", *args],
            stdout=log,
            stderr=log,
            env=env,
        )

    def start_all(self) -> None:
        for node in self.ids:
            self.start(node)

    def kill(self, node: str) -> None:
        """kill -9: no drain, no fsync beyond what was already done."""
        proc = self.procs.pop(node)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def readyz(self, node: str) -> dict[str, object] | None:
        try:
            scheme = "https" if self.https else "http"
            url = f"{scheme}://127.0.0.1:{self.http_ports[node]}/readyz"
            with urllib.request.urlopen(url, timeout=2, context=self.https) as r:
                return dict(json.loads(r.read()))
        except (OSError, urllib.error.HTTPError, ValueError):
            return None

    def wait_ready(self, nodes: list[str] | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        pending = list(nodes or self.procs)
        while pending and time.monotonic() < deadline:
            pending = [n for n in pending if not (r := self.readyz(n)) or not r.get("ready")]
            time.sleep(0.1)
        if pending:
            raise TimeoutError(f"routers not ready after {timeout} s: {pending}; logs in {self.workdir}")

    def metric(self, node: str, name: str, token: str | None = None, **labels: str) -> float:
        """One sample of a router's /metrics (0 when it has none); `token` for a secured router."""
        scheme = "https" if self.https else "http"
        url = f"{scheme}://127.0.0.1:{self.http_ports[node]}/metrics"
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=5, context=self.https
        ) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return 0.0

    def log_of(self, node: str) -> str:
        return (self.workdir / f"{node}.log").read_text(errors="replace")
