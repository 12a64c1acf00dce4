"""A running local cluster for the dashboard's browser tests: 3 routers, the sample pipelines of
`etlrouter dev` (src/etlrouter/dev/sample.etl) plus a `guarded` pipeline whose filter dead-letters poison
records, real services and sidecars as processes, and headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import contextlib
import json
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, free_port, missing_dependency
from tests.e2e.processes import Processes, connector, ready, wait_until
from tests.e2e.test_backpressure import start_sidecar
from tests.e2e.test_pipeline import apply
from tests.integration.cluster import RouterProcesses

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
SAMPLE = ROOT / "src" / "etlrouter" / "dev" / "sample.etl"
POISON = "1 / (offset % 100) > 0"  # offsets 0, 100, 200 divide by zero: permanent per-record errors
GUARDED_RECORDS = 300
GUARDED = "pipeline guarded { source ticks (batch_size = 50) | transform guard | sink audit }\n"
# Small edge windows so that a stalled sink exhausts its edge's credits within a second or two.
SIDECAR_CONFIG = {"edge_buffer_records": "2000", "heartbeat_interval_ms": "500"}


def stallable_sink(procs: Processes, name: str, stall_file: Path) -> int:
    port = free_port()
    script = str(Path(__file__).with_name("stallable_sink.py"))
    procs.start(name, [script, "--name", name, "--port", str(port), "--stall-file", str(stall_file)])
    return port


def graphql(http_port: int, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """A plain HTTP POST, as curl would send: what the page shows can be had this way too."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/graphql", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        answer = json.loads(r.read())
    assert "errors" not in answer, answer
    data: dict[str, Any] = answer["data"]
    return data


@dataclass
class DashboardSystem:
    routers: RouterProcesses
    procs: Processes
    workdir: Path
    leader_http: int
    ports: dict[str, int]  # service name -> port

    def dag_of(self, service: str) -> dict[str, Any]:
        for dag in graphql(self.leader_http, "{ dags { id pipelines stages { id service } } }")["dags"]:
            if any(s["service"] == service for s in dag["stages"]):
                return dag  # type: ignore[no-any-return]
        raise AssertionError(f"no DAG runs {service}")

    def stage_id(self, service: str) -> str:
        return str(next(s["id"] for s in self.dag_of(service)["stages"] if s["service"] == service))

    def follower_http(self) -> int:
        """The HTTP port of a running router that is not the leader."""
        for node in self.routers.procs:
            port = self.routers.http_ports[node]
            if not graphql(port, "{ cluster { isLeader } }")["cluster"]["isLeader"]:
                return port
        raise AssertionError("no running router is a follower")


def _leader_http(routers: RouterProcesses) -> int | None:
    for node in routers.ids:
        try:
            if graphql(routers.http_ports[node], "{ cluster { isLeader } }")["cluster"]["isLeader"]:
                return routers.http_ports[node]
        except OSError:
            continue
    return None


@contextlib.contextmanager
def running_system(tmp: Path) -> Iterator[DashboardSystem]:
    """The whole system, stopped on exit; tests/api reuses it for GraphQL on followers."""
    routers = RouterProcesses(tmp / "routers", fsync=False)
    procs = Processes(tmp / "procs")
    routers.start_all()
    try:
        routers.wait_ready()
        ports = {
            "orders": connector(procs, "orders", "generator", "--seed", "7", "--rate", "1000"),
            "valid-orders": connector(procs, "valid-orders", "filter"),
            "archive": connector(procs, "archive", "jsonl_file_sink", "--path", str(tmp / "archive.jsonl")),
            # The sample's second sink, as a service the test can stall (see stallable_sink.py).
            "warehouse": stallable_sink(procs, "warehouse", tmp / "warehouse.stall"),
            "ticks": connector(procs, "ticks", "generator", "--limit", str(GUARDED_RECORDS), "--rate", "300"),
            "guard": connector(procs, "guard", "filter", "--expr", POISON),
            "audit": connector(procs, "audit", "jsonl_file_sink", "--path", str(tmp / "audit.jsonl")),
        }
        layout = {
            "sc-orders": ["orders", "ticks"],
            "sc-filter": ["valid-orders", "guard"],
            "sc-archive": ["archive", "audit"],
            "sc-warehouse": ["warehouse"],
        }
        sidecars = [
            start_sidecar(procs, sidecar_id, routers, [ports[s] for s in services], **SIDECAR_CONFIG)
            for sidecar_id, services in layout.items()
        ]
        wait_until(lambda: all(ready(s.http_port) for s in sidecars), 30, "sidecars registered")
        apply(routers, SAMPLE.read_text())
        apply(routers, GUARDED)
        wait_until(lambda: _leader_http(routers) is not None, 20, "a leader")
        leader = _leader_http(routers)
        assert leader is not None
        yield DashboardSystem(routers, procs, tmp, leader, ports)
    finally:
        procs.stop_all()
        routers.stop_all()


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardSystem]:
    with running_system(tmp_path_factory.mktemp("dashboard")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.access(CHROMIUM, os.X_OK):
        missing_dependency(f"{CHROMIUM} is missing: install Debian's chromium (scripts/system-deps.sh)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh 1280x800 page; its screenshot is saved under test-artifacts/dashboard/ whatever the outcome."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    try:
        yield page
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        try:
            page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-final.png"), full_page=True)
        finally:
            context.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
