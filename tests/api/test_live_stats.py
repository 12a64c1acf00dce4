"""Live statistics on every router, not only the leader: a real 3-router cluster with the dashboard's system
(sample pipelines, real services and sidecars, tests/dashboard/conftest.py). A follower's `stats` and
`sidecars` come from the leader over gRPC (GetLiveStats), its subscribers share one fetch per interval, and
when the leader dies the answer says so (or comes from the new leader) instead of hanging. Also: DLQ
arguments that name nothing get a clear error.

The tests run in file order on one system; the last one kills routers."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.dashboard.conftest import DashboardSystem, graphql, running_system

STATS = """{ stats { source message atMs
  cluster { nodeId leaderId isLeader }
  stages { dagId stageId replicas recordsIn recordsOutPerSecond }
  edges { dagId from to recordsSent recordsPerSecond backpressure }
  sidecars { id health silent registered lastHeartbeatAgeMs } } }"""
# A follower must answer within the forward deadline (2 s) plus a margin, whatever the leader does.
ANSWER_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DashboardSystem]:
    with running_system(tmp_path_factory.mktemp("live-stats")) as running:
        yield running


@pytest.fixture(scope="module")
def sample_edge(system: DashboardSystem) -> tuple[str, str]:
    """(orders, valid-orders) stage ids, asked while the first leader lives."""
    return system.stage_id("orders"), system.stage_id("valid-orders")


def post(http_port: int, query: str) -> tuple[dict[str, Any], float]:
    """A GraphQL POST that may fail; returns the body and how long the answer took."""
    body = json.dumps({"query": query}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/graphql", body, {"Content-Type": "application/json"}
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=30) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer, time.monotonic() - started


def stats_of(http_port: int) -> tuple[dict[str, Any], float]:
    answer, seconds = post(http_port, STATS)
    assert "errors" not in answer, answer
    stats: dict[str, Any] = answer["data"]["stats"]
    return stats, seconds


def poll(condition: Any, timeout: float, what: str) -> Any:
    """Call `condition` until it returns something truthy (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def edge_of(stats: dict[str, Any], src: str, dst: str) -> dict[str, Any] | None:
    return next((e for e in stats["edges"] if (e["from"], e["to"]) == (src, dst)), None)


def flowing(stats: dict[str, Any], sample_edge: tuple[str, str]) -> bool:
    """Records flow on the sample's orders -> valid-orders edge (the generator sends 1000/s)."""
    edge = edge_of(stats, *sample_edge)
    return edge is not None and edge["recordsPerSecond"] > 0


def shape(stats: dict[str, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str, str]]]:
    stages = {(s["dagId"], s["stageId"]) for s in stats["stages"]}
    return stages, {(e["dagId"], e["from"], e["to"]) for e in stats["edges"]}


def metric(http_port: int, name: str, labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{re.escape(name)}\{{{labels}\}} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_follower_serves_the_same_stages_edges_and_rates_as_the_leader(
    system: DashboardSystem, sample_edge: tuple[str, str]
) -> None:
    follower = system.follower_http()

    def leader_flowing() -> dict[str, Any] | None:
        stats = stats_of(system.leader_http)[0]
        return stats if flowing(stats, sample_edge) else None

    leader_stats = poll(leader_flowing, 30, "rates on the leader")
    assert leader_stats["source"] == "LEADER" and leader_stats["message"] == ""

    def forwarded() -> dict[str, Any] | None:
        stats, seconds = stats_of(follower)
        assert seconds < ANSWER_WITHIN_S
        return stats if stats["source"] == "FORWARDED" and flowing(stats, sample_edge) else None

    stats = poll(forwarded, 15, "forwarded stats with rates on the follower")
    assert stats["cluster"]["isLeader"] is False
    leader_id = leader_stats["cluster"]["nodeId"]
    assert leader_id in stats["message"] and "forwarded from the leader" in stats["message"]
    # The leader's stages and edges: the sample's DAG (orders -> valid-orders -> archive, warehouse) and
    # `guarded`, the same ids on both routers.
    assert shape(stats) == shape(leader_stats)
    src = sample_edge[0]
    edge = edge_of(stats, *sample_edge)
    assert edge is not None and edge["recordsPerSecond"] > 0 and edge["recordsSent"] > 0
    assert any(s["recordsOutPerSecond"] > 0 for s in stats["stages"] if s["stageId"] == src)
    # Sidecar liveness too, in `stats` and in the `sidecars` query.
    assert {s["id"] for s in stats["sidecars"]} >= {"sc-orders", "sc-filter", "sc-archive", "sc-warehouse"}
    assert all(s["health"] == "SERVING" and not s["silent"] for s in stats["sidecars"]), stats["sidecars"]
    sidecars = graphql(follower, "{ sidecars { id health silent lastHeartbeatAgeMs } }")["sidecars"]
    assert all(s["health"] == "SERVING" and s["lastHeartbeatAgeMs"] is not None for s in sidecars), sidecars


async def test_subscribers_on_a_follower_share_one_fetch_per_interval(system: DashboardSystem) -> None:
    follower = system.follower_http()
    subscribers, interval_ms, seconds = 6, 500, 3.0
    calls = 'method="GetLiveStats",status="OK"'
    before = metric(system.leader_http, "etlrouter_api_request_seconds_count", calls)
    received = [0] * subscribers

    async def subscribe(i: int, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(
            f"http://127.0.0.1:{follower}/graphql", protocols=("graphql-transport-ws",)
        ) as ws:
            await ws.send_json({"type": "connection_init"})
            assert (await ws.receive_json(timeout=10))["type"] == "connection_ack"
            query = f"subscription {{ stats(intervalMs: {interval_ms}) {{ source }} }}"
            await ws.send_json({"id": "1", "type": "subscribe", "payload": {"query": query}})
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                message = await ws.receive_json(timeout=10)
                assert message["type"] == "next", message
                assert message["payload"]["data"]["stats"]["source"] == "FORWARDED", message
                received[i] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(subscribe(i, session) for i in range(subscribers)))
    fetches = metric(system.leader_http, "etlrouter_api_request_seconds_count", calls) - before
    # Every subscriber got about seconds / interval snapshots; the leader was asked about that many times in
    # all, not that many times per subscriber (6x as many).
    per_subscriber = seconds * 1000 / interval_ms
    print(f"\n{subscribers} subscribers got {received} snapshots; the leader answered {fetches:.0f} fetches")
    assert min(received) >= per_subscriber - 1, received
    assert 1 <= fetches <= per_subscriber + 3, (fetches, received)


def error_of(http_port: int, query: str) -> dict[str, Any]:
    answer, _ = post(http_port, query)
    assert answer.get("data") is None or not any(answer["data"].values()), answer
    [error] = answer["errors"]
    return error  # type: ignore[no-any-return]


def test_dlq_arguments_that_name_nothing_get_a_clear_error(system: DashboardSystem) -> None:
    port = system.follower_http()
    guard = system.stage_id("guard")
    error = error_of(port, '{ deadLetters(pipeline: "gaurded") { total } }')
    assert error["extensions"]["code"] == "NOT_FOUND"
    assert "pipeline 'gaurded' does not exist" in error["message"] and "guarded" in error["message"]
    assert error["path"] == ["deadLetters"]
    error = error_of(port, '{ deadLetters(stage: "no-such-stage") { total } }')
    assert error["extensions"]["code"] == "NOT_FOUND" and "'no-such-stage' is not a stage" in error["message"]
    error = error_of(port, "{ deadLetters(limit: 0) { total } }")
    assert error["extensions"]["code"] == "INVALID_ARGUMENT" and "limit must be 1..1000" in error["message"]
    error = error_of(port, 'mutation { redriveDeadLetters(pipeline: "nope") { redriven } }')
    assert error["extensions"]["code"] == "NOT_FOUND" and "pipeline 'nope' does not exist" in error["message"]
    error = error_of(
        port, f'mutation {{ redriveDeadLetters(stage: "{guard}", targetStage: "gone") {{ redriven }} }}'
    )
    assert error["extensions"]["code"] == "NOT_FOUND" and "targetStage: stage 'gone'" in error["message"]
    error = error_of(port, 'mutation { redriveDeadLetters(sidecar: "sc-nope", ids: ["x"]) { redriven } }')
    assert (
        error["extensions"]["code"] == "NOT_FOUND"
        and "sidecar 'sc-nope' is not registered" in error["message"]
    )
    # Known names still work, and the router kept serving throughout.
    page = graphql(
        port,
        f'{{ deadLetters(pipeline: "guarded", stage: "{guard}") {{ total unreachable {{ sidecar }} }} }}',
    )
    assert page["deadLetters"]["unreachable"] == []
    assert graphql(port, "{ cluster { nodeId } }")["cluster"]["nodeId"]


def test_when_the_leader_dies_a_follower_says_so_or_forwards_to_the_new_leader(
    system: DashboardSystem, sample_edge: tuple[str, str]
) -> None:
    routers = system.routers
    [old] = [n for n in routers.procs if stats_of(routers.http_ports[n])[0]["source"] == "LEADER"]
    routers.kill(old)
    survivors = list(routers.procs)
    seen: set[str] = set()

    def new_leader_forwarded() -> tuple[str, dict[str, Any]] | None:
        for node in survivors:
            stats, seconds = stats_of(routers.http_ports[node])
            assert seconds < ANSWER_WITHIN_S, f"{node} took {seconds:.1f} s"
            seen.add(stats["source"])
            if stats["source"] == "UNAVAILABLE":
                assert (
                    stats["stages"] == []
                    and stats["edges"] == []
                    and "could not get them" in stats["message"]
                )
            leader = stats["cluster"]["leaderId"]
            if stats["source"] == "FORWARDED" and leader not in ("", old) and flowing(stats, sample_edge):
                return node, stats
        return None

    follower, stats = poll(new_leader_forwarded, 30, "a follower forwarding the new leader's stats")
    new = stats["cluster"]["leaderId"]
    assert new in stats["message"] and old not in stats["message"]
    print(f"\nafter killing {old}: sources seen {sorted(seen)}; {follower} forwards from {new}")

    # Now no quorum: the last router cannot get live stats from anyone and says so, within the deadline.
    routers.kill(new)
    stats, seconds = poll(
        lambda: (a := stats_of(routers.http_ports[follower]))[0]["source"] == "UNAVAILABLE" and a,
        15,
        "UNAVAILABLE on the last router",
    )
    assert seconds < ANSWER_WITHIN_S
    assert stats["stages"] == [] and stats["edges"] == []
    assert "could not get them" in stats["message"] and follower in stats["message"]
    assert all(s["health"] == "UNKNOWN" and s["lastHeartbeatAgeMs"] is None for s in stats["sidecars"])
    sidecars, seconds = post(routers.http_ports[follower], "{ sidecars(consistency: STALE) { id health } }")
    assert seconds < ANSWER_WITHIN_S and "errors" not in sidecars, sidecars
    assert {s["health"] for s in sidecars["data"]["sidecars"]} == {"UNKNOWN"}
