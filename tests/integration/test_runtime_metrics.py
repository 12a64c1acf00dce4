"""Every role reports its event-loop lag, and a Raft leader how regularly it sends heartbeats."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.e2e.processes import Processes, ready, wait_until
from tests.integration.cluster import TICK_MS, RouterProcesses


def scrape(http_port: int) -> dict[str, float]:
    """Sample name (with labels) -> value from a process's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.fixture
def system(tmp_path: Path) -> Iterator[tuple[RouterProcesses, int]]:
    routers = RouterProcesses(tmp_path / "routers", fsync=False)
    procs = Processes(tmp_path / "procs")
    routers.start_all()
    try:
        routers.wait_ready()
        http_port = free_port()
        args = ["-m", "etlrouter", "sidecar", "--id", "sc", "--scan-ports", str(free_port())]
        args += [arg for address in routers.addresses for arg in ("--router", address)]
        args += ["--grpc-port", str(free_port()), "--http-port", str(http_port)]
        procs.start("sc", args, {"ETLROUTER_SIDECAR__DATA_DIR": str(tmp_path / "sc")})
        wait_until(lambda: ready(http_port), 30, "the sidecar to be ready")
        yield routers, http_port
    finally:
        procs.stop_all()
        routers.stop_all()


def test_event_loop_lag_and_heartbeat_interval_series(system: tuple[RouterProcesses, int]) -> None:
    routers, sidecar_http = system
    time.sleep(1.0)  # a few lag probes (every 0.25 s) and many heartbeat rounds (every tick)
    for port in [*routers.http_ports.values(), sidecar_http]:
        samples = scrape(port)
        assert samples["etlrouter_event_loop_lag_seconds_count"] >= 2, port
        assert (
            0
            <= samples["etlrouter_event_loop_lag_seconds_sum"]
            < samples["etlrouter_event_loop_lag_seconds_count"]
        )
        assert "etlrouter_event_loop_lag_seconds_bucket{le=+Inf}" in samples

    def heartbeat_counts() -> dict[str, float]:
        return {
            node: scrape(port)["etlrouter_raft_heartbeat_interval_seconds_count"]
            for node, port in routers.http_ports.items()
        }

    leaders = [
        node for node, port in routers.http_ports.items() if scrape(port)["etlrouter_raft_is_leader"] == 1
    ]
    assert len(leaders) == 1
    before = heartbeat_counts()
    time.sleep(0.5)
    after = heartbeat_counts()
    # The leader heartbeats once per tick (heartbeat_ticks = 1); followers send none.
    assert after[leaders[0]] - before[leaders[0]] >= 0.5 / (TICK_MS / 1000) / 2
    assert all(after[node] == before[node] for node in after if node != leaders[0])
    leader = scrape(routers.http_ports[leaders[0]])
    mean = (
        leader["etlrouter_raft_heartbeat_interval_seconds_sum"]
        / leader["etlrouter_raft_heartbeat_interval_seconds_count"]
    )
    assert TICK_MS / 1000 / 2 < mean < TICK_MS / 1000 * 4
