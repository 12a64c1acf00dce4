"""The numbers agree record for record: after a known number of records moved through a fan-out DAG, each
sidecar's /metrics, the GraphQL `stats` (what the dashboard reads) and the records the sinks wrote say the
same thing, every record counted once per stage (and once per edge)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from tests.dashboard.conftest import graphql
from tests.e2e.processes import Processes, connector, jsonl_offsets, ready, sidecar, wait_until
from tests.e2e.test_pipeline import PIPELINES, apply
from tests.integration.cluster import RouterProcesses

TOTAL = 3000
STATS = "{ stats { stages { dagId stageId recordsIn recordsOut } edges { dagId from to recordsSent } } }"


def metrics(http_port: int, name: str) -> dict[str, float]:
    """A sidecar's samples of one counter, by stage."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            stage = labels.split('stage="', 1)[1].split('"', 1)[0]
            out[stage] = out.get(stage, 0.0) + float(value)
    return out


def test_metrics_graphql_stats_and_sinks_count_every_record_once(
    system: tuple[RouterProcesses, Processes, Path],
) -> None:
    routers, procs, tmp = system
    state, left, right = tmp / "generator.state", tmp / "left.jsonl", tmp / "right.jsonl"
    src = connector(procs, "orders", "generator", "--limit", str(TOTAL), "--state-file", str(state))
    mid = connector(procs, "clean", "filter")
    sink_l = connector(procs, "left", "jsonl_file_sink", "--path", str(left))
    sink_r = connector(procs, "right", "jsonl_file_sink", "--path", str(right))
    http = [
        sidecar(procs, "sc-src", routers, [src]),
        sidecar(procs, "sc-mid", routers, [mid]),
        sidecar(procs, "sc-sink", routers, [sink_l, sink_r]),
    ]
    wait_until(lambda: all(ready(p) for p in http), 30, "sidecars registered")
    apply(routers, PIPELINES)  # two pipelines: orders | clean, fanning out to left and right
    wait_until(
        lambda: state.exists() and json.loads(state.read_text()).get("0") == TOTAL - 1,
        60,
        "the source acknowledged up to its last offset",
    )
    # Exactly once in each sink: no retry happened, so every counter below must be exact too.
    assert sorted(jsonl_offsets(left)) == sorted(jsonl_offsets(right)) == list(range(TOTAL))

    router_http = routers.http_ports[routers.ids[0]]
    (dag,) = graphql(router_http, "{ dags { id stages { id service } } }")["dags"]
    stage = {s["service"]: s["id"] for s in dag["stages"]}
    expected_stages = {stage[name]: (TOTAL, TOTAL) for name in ("orders", "clean", "left", "right")}
    expected_edges = {
        (stage["orders"], stage["clean"]): TOTAL,
        (stage["clean"], stage["left"]): TOTAL,
        (stage["clean"], stage["right"]): TOTAL,
    }

    def counted() -> tuple[dict[str, tuple[int, int]], dict[tuple[str, str], int]]:
        stats = graphql(router_http, STATS)["stats"]
        stages = {s["stageId"]: (s["recordsIn"], s["recordsOut"]) for s in stats["stages"]}
        edges = {(e["from"], e["to"]): e["recordsSent"] for e in stats["edges"]}
        return stages, edges

    # The router knows the final counts after the sidecars' next heartbeats.
    deadline = time.monotonic() + 20
    while counted() != (expected_stages, expected_edges) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert counted() == (expected_stages, expected_edges)

    received: dict[str, float] = {}
    sent: dict[str, float] = {}
    for port in http:
        received.update(metrics(port, "etlrouter_component_received_events_total"))
        sent.update(metrics(port, "etlrouter_component_sent_events_total"))
    want = {stage_id: float(TOTAL) for stage_id in expected_stages}
    # The transform fans out to two sinks and still sent each record once (its edges carry one copy each).
    assert received == want and sent == want
    for port in http:
        acked = metrics(port, "etlrouter_source_acked_events_total")
        assert acked in ({}, {stage["orders"]: float(TOTAL)})
    for name in ("sc-src", "sc-mid", "sc-sink"):
        assert "Traceback" not in procs.log(name), procs.log(name)[-3000:]
