"""Whole-system fixtures: user services, sidecars and routers as separate processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import free_port
from tests.integration.cluster import RouterProcesses


class Processes:
    """Named child processes with their logs in `workdir`; everything is killed at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.commands: dict[str, tuple[list[str], dict[str, str]]] = {}

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        self.commands[name] = (args, env or {})
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=log, env={**os.environ, **(env or {})}
        )

    def restart(self, name: str) -> None:
        args, env = self.commands[name]
        self.start(name, args, env)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self, name: str, timeout: float = 15) -> int:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    def stop_all(self) -> None:
        for name in list(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.stop(name, timeout=10)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def connector(procs: Processes, name: str, kind: str, *args: str) -> int:
    port = free_port()
    procs.start(name, ["-m", f"etlrouter.connectors.{kind}", "--name", name, "--port", str(port), *args])
    return port


def sidecar(procs: Processes, sidecar_id: str, routers: RouterProcesses, ports: list[int]) -> int:
    """Start a sidecar scanning `ports`; returns its HTTP port."""
    http_port = free_port()
    env = {
        "ETLROUTER_SIDECAR__DATA_DIR": str(procs.workdir / sidecar_id),
        "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS": "5000",
        "ETLROUTER_LOGGING__FORMAT": "json",
    }
    routers_args = [arg for address in routers.addresses for arg in ("--router", address)]
    scan = ",".join(str(p) for p in ports)
    ports_args = ["--scan-ports", scan, "--grpc-port", str(free_port()), "--http-port", str(http_port)]
    procs.start(
        sidecar_id, ["-m", "etlrouter", "sidecar", "--id", sidecar_id, *routers_args, *ports_args], env
    )
    return http_port


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def ready(http_port: int, https: ssl.SSLContext | None = None) -> bool:
    try:
        url = f"{'https' if https else 'http'}://127.0.0.1:{http_port}/readyz"
        with urllib.request.urlopen(url, timeout=2, context=https) as r:
            return bool(json.loads(r.read())["ready"])
    except OSError:
        return False


def jsonl_offsets(path: Path) -> list[int]:
    """Source offsets of the records a jsonl-file sink wrote (with repeats, if any)."""
    if not path.exists():
        return []
    # The sink may be appending while we read: a last line without its newline is not complete yet.
    complete = path.read_text().split("\n")[:-1]
    return [json.loads(line)["offset"] for line in complete if line.strip()]
