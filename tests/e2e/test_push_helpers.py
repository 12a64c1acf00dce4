"""Helpers of the push-source system tests (no tests here): a sidecar whose data-plane port is known (a push
source must be told where its sidecar is), HTTP calls, metrics."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from typing import Any

from tests.conftest import free_port
from tests.e2e.processes import Processes
from tests.integration.cluster import RouterProcesses


def push_sidecar(
    procs: Processes, sidecar_id: str, routers: RouterProcesses, ports: list[int], **env: str
) -> tuple[int, str]:
    """Start a sidecar scanning `ports`; returns (its HTTP port, its data-plane address)."""
    http_port, grpc_port = free_port(), free_port()
    environment = {
        "ETLROUTER_SIDECAR__DATA_DIR": str(procs.workdir / sidecar_id),
        "ETLROUTER_SIDECAR__HEARTBEAT_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__SCAN_INTERVAL_MS": "500",
        "ETLROUTER_SIDECAR__DRAIN_TIMEOUT_MS": "5000",
        "ETLROUTER_LOGGING__FORMAT": "json",
        **{f"ETLROUTER_SIDECAR__{k.upper()}": v for k, v in env.items()},
    }
    routers_args = [arg for address in routers.addresses for arg in ("--router", address)]
    scan = ",".join(str(p) for p in ports)
    args = ["--scan-ports", scan, "--grpc-port", str(grpc_port), "--http-port", str(http_port)]
    procs.start(
        sidecar_id, ["-m", "etlrouter", "sidecar", "--id", sidecar_id, *routers_args, *args], environment
    )
    return http_port, f"127.0.0.1:{grpc_port}"


def post(url: str, body: bytes, timeout: float = 30) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST; returns (status, JSON body, headers), for error statuses too."""
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read()), dict(reply.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def metric(http_port: int, name: str, **labels: str) -> float:
    """Sum of a metric's samples on a process's /metrics whose labels include `labels`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total
