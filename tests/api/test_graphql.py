"""/graphql on real `etlrouter router` processes: queries over HTTP (aiohttp and curl), mutations with
diagnostics, follower forwarding, and subscriptions through the independent `gql` client."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from typing import Any

import pytest
from gql import Client, GraphQLRequest, gql
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport

from tests.api.conftest import TWO_PIPELINES, GraphQLHttp
from tests.integration.cluster import RouterProcesses

APPLY = """
mutation Apply($definition: String!, $filename: String, $dryRun: Boolean) {
  applyPipelines(definition: $definition, filename: $filename, dryRun: $dryRun) {
    applied revision servedBy
    changes { name action generation }
    diagnostics { file line column message hint excerpt }
  }
}
"""
DAGS = """
{
  dags {
    id generation pipelines
    stages { id kind service parallelism pipelines parent children options { name value }
             placements { sidecarId replica address } }
    edges { from to pipelines policy { mode shedAfterMs } }
    placements { stageId sidecarId replica address }
  }
}
"""
PIPELINE_NAMES = "query Names($c: Consistency) { pipelines(consistency: $c) { name generation phase } }"


async def test_query_returns_cluster_state_and_merged_dag_of_two_pipelines(
    routers: RouterProcesses, http: GraphQLHttp, sidecars: list[str]
) -> None:
    leader, followers = await http.roles()
    applied = (await http.data(leader, APPLY, {"definition": TWO_PIPELINES, "filename": "orders.etl"}))[
        "applyPipelines"
    ]
    assert applied["applied"] is True and applied["diagnostics"] == []
    assert sorted((c["name"], c["action"]) for c in applied["changes"]) == [
        ("audit", "CREATED"),
        ("orders", "CREATED"),
    ]
    assert applied["servedBy"] == routers.address(leader)

    cluster = (
        await http.data(
            followers[0],
            "{ cluster { nodeId leaderId leaderAddress isLeader term commitIndex appliedIndex"
            " members { id address voter leader matchIndex lag reachable } } }",
        )
    )["cluster"]
    assert cluster["nodeId"] == followers[0] and cluster["isLeader"] is False
    assert cluster["leaderId"] == leader and cluster["leaderAddress"] == routers.address(leader)
    assert cluster["term"] >= 1 and cluster["commitIndex"] >= applied["revision"]
    assert sorted(m["id"] for m in cluster["members"]) == sorted(routers.ids)
    assert [m["id"] for m in cluster["members"] if m["leader"]] == [leader]
    assert all(m["voter"] for m in cluster["members"])

    # The leader places every stage once the sidecars heartbeat; wait for it.
    deadline = time.monotonic() + 15
    while True:
        (dag,) = (await http.data(leader, DAGS))["dags"]
        if len(dag["placements"]) == 4 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    by_service = {s["service"]: s for s in dag["stages"]}
    assert set(by_service) == {"orders-src", "clean", "audit-log", "warehouse"}
    source, clean = by_service["orders-src"], by_service["clean"]
    assert dag["id"] == source["id"] and dag["stages"][0]["id"] == source["id"]
    assert sorted(dag["pipelines"]) == ["audit", "orders"]
    assert source["kind"] == "SOURCE" and clean["kind"] == "TRANSFORM" and source["parent"] is None
    # The shared prefix is one chain of stages used by both pipelines, fanning out after `clean`.
    assert sorted(source["pipelines"]) == sorted(clean["pipelines"]) == ["audit", "orders"]
    assert sorted(clean["children"]) == sorted([by_service["warehouse"]["id"], by_service["audit-log"]["id"]])
    assert by_service["warehouse"]["pipelines"] == ["orders"]
    edges = {(e["from"], e["to"]): e for e in dag["edges"]}
    assert sorted(edges[(source["id"], clean["id"])]["pipelines"]) == ["audit", "orders"]
    audit_edge = edges[(clean["id"], by_service["audit-log"]["id"])]
    assert audit_edge["pipelines"] == ["audit"]
    assert audit_edge["policy"] == {"mode": "SHED", "shedAfterMs": 5000}
    assert edges[(clean["id"], by_service["warehouse"]["id"])]["policy"]["mode"] == "BLOCK"
    # Placements: the sidecar offering each service runs its stage.
    holders = {p["stageId"]: p["sidecarId"] for p in dag["placements"]}
    assert holders == {
        source["id"]: "sc-src",
        clean["id"]: "sc-clean",
        by_service["warehouse"]["id"]: "sc-warehouse",
        by_service["audit-log"]["id"]: "sc-audit",
    }
    assert clean["placements"] == [{"sidecarId": "sc-clean", "replica": 0, "address": "127.0.0.1:51101"}]

    # Pipelines, services and sidecars in one request, on a follower (linearizable by default).
    data = await http.data(
        followers[1],
        "{ pipelines { name phase dagId stageIds conditions definition stages { service } }"
        '  pipeline(name: "orders") { name generation }'
        "  services { name kind sidecarId }"
        "  sidecars { id address health lastHeartbeatAgeMs stages { stageId } services { name } } }",
    )
    pipelines = {p["name"]: p for p in data["pipelines"]}
    assert set(pipelines) == {"audit", "orders"}
    assert pipelines["orders"]["dagId"] == dag["id"]
    assert [s["service"] for s in pipelines["orders"]["stages"]] == ["orders-src", "clean", "warehouse"]
    assert pipelines["orders"]["definition"].startswith("pipeline orders {")
    assert data["pipeline"] == {"name": "orders", "generation": 1}
    assert {s["name"]: s["kind"] for s in data["services"]} == {
        "orders-src": "SOURCE",
        "clean": "TRANSFORM",
        "warehouse": "SINK",
        "audit-log": "SINK",
    }
    # Liveness is kept by the leader: a follower fetches it from there (GetLiveStats).
    assert {s["id"] for s in data["sidecars"]} == set(sidecars)
    assert all(s["health"] == "SERVING" and 0 <= s["lastHeartbeatAgeMs"] < 3000 for s in data["sidecars"])
    on_leader = (await http.data(leader, "{ sidecars { id health lastHeartbeatAgeMs stages { stageId } } }"))[
        "sidecars"
    ]
    assert all(s["health"] == "SERVING" and 0 <= s["lastHeartbeatAgeMs"] < 3000 for s in on_leader)
    assert {s["id"]: [x["stageId"] for x in s["stages"]] for s in on_leader}["sc-clean"] == [clean["id"]]


async def test_invalid_definition_returns_diagnostics_and_changes_nothing(
    routers: RouterProcesses, http: GraphQLHttp, sidecars: list[str]
) -> None:
    leader, followers = await http.roles()
    await http.data(leader, APPLY, {"definition": TWO_PIPELINES, "filename": "orders.etl"})
    before = await http.data(leader, "{ pipelines { name generation revision definition } }")
    broken = "pipeline orders {\n  source orders-src | transform clen | sink warehouse\n}\n"
    for node in (leader, followers[0]):  # the follower forwards to the leader: same answer
        result = (await http.data(node, APPLY, {"definition": broken, "filename": "broken.etl"}))[
            "applyPipelines"
        ]
        assert result["applied"] is False and result["changes"] == []
        (diagnostic,) = result["diagnostics"]
        assert diagnostic["file"] == "broken.etl"
        assert (diagnostic["line"], diagnostic["column"]) == (2, 33)
        assert "clen" in diagnostic["message"]
        assert "clean" in diagnostic["hint"]
        assert diagnostic["excerpt"].splitlines()[-1].strip() == "^"
    assert await http.data(leader, "{ pipelines { name generation revision definition } }") == before


async def test_follower_forwards_mutations_to_the_leader(
    routers: RouterProcesses, http: GraphQLHttp, sidecars: list[str]
) -> None:
    leader, (follower, other) = await http.roles()
    one = "pipeline orders {\n  source orders-src | transform clean | sink warehouse\n}\n"

    dry = (await http.data(follower, APPLY, {"definition": one, "dryRun": True}))["applyPipelines"]
    assert dry["applied"] is False and [(c["name"], c["action"]) for c in dry["changes"]] == [
        ("orders", "CREATED")
    ]
    assert (await http.data(other, PIPELINE_NAMES))["pipelines"] == []

    applied = (await http.data(follower, APPLY, {"definition": one}))["applyPipelines"]
    assert applied["applied"] is True and applied["servedBy"] == routers.address(leader)
    # Linearizable reads on the *other* follower see the write at once (it waits for the leader's revision).
    names = (await http.data(other, PIPELINE_NAMES))["pipelines"]
    assert [p["name"] for p in names] == ["orders"]

    deleted = (
        await http.data(follower, 'mutation { deletePipeline(name: "orders") { name revision servedBy } }')
    )["deletePipeline"]
    assert deleted["servedBy"] == routers.address(leader) and deleted["revision"] > applied["revision"]
    assert (await http.data(other, PIPELINE_NAMES))["pipelines"] == []

    status, body = await http.post(follower, 'mutation { deletePipeline(name: "orders") { revision } }')
    assert status == 200 and body["data"] is None
    (error,) = body["errors"]
    assert error["extensions"]["code"] == "NOT_FOUND" and "orders" in error["message"]
    assert error["path"] == ["deletePipeline"]


async def _next(iterator: Any, timeout: float = 10.0) -> Any:
    return await asyncio.wait_for(iterator.__anext__(), timeout)


async def test_gql_subscription_receives_live_updates(
    routers: RouterProcesses, http: GraphQLHttp, sidecars: list[str]
) -> None:
    leader, (follower, _) = await http.roles()
    transport = WebsocketsTransport(
        url=f"ws://127.0.0.1:{routers.http_ports[follower]}/graphql",
        subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
    )
    async with Client(transport=transport, fetch_schema_from_transport=True) as session:
        assert transport.subprotocol == "graphql-transport-ws"
        pipelines = session.subscribe(gql("subscription { pipelinesChanged { name phase generation } }"))
        registry = session.subscribe(
            GraphQLRequest(
                "subscription Reg($kinds: [String!]) {"
                " registryChanged(kinds: $kinds) { type revision kind name json } }",
                variable_values={"kinds": ["pipelines"]},
            )
        )
        assert await _next(pipelines) == {"pipelinesChanged": []}
        first = await _next(registry)
        assert first["registryChanged"]["type"] == "BOOKMARK"

        applied = (await http.data(leader, APPLY, {"definition": TWO_PIPELINES}))["applyPipelines"]
        update = await _next(pipelines)
        assert sorted(p["name"] for p in update["pipelinesChanged"]) == ["audit", "orders"]
        puts: dict[str, Any] = {}
        while len(puts) < 2:
            event = (await _next(registry))["registryChanged"]
            if event["type"] == "PUT":
                assert event["kind"] == "pipeline" and event["revision"] >= applied["revision"]
                puts[event["name"]] = json.loads(event["json"])
        assert puts["orders"]["name"] == "orders"

        await http.data(leader, 'mutation { deletePipeline(name: "audit") { revision } }')
        while True:
            event = (await _next(registry))["registryChanged"]
            if event["type"] == "DELETE":
                assert (event["kind"], event["name"]) == ("pipeline", "audit")
                break
        while True:  # phase changes of `orders` may come first
            names = [p["name"] for p in (await _next(pipelines))["pipelinesChanged"]]
            if names == ["orders"]:
                break

        # Queries and mutations over the same connection; a bad kind fails that subscription only.
        result = await session.execute(gql("{ cluster { nodeId isLeader } }"))
        assert result == {"cluster": {"nodeId": follower, "isLeader": False}}
        with pytest.raises(TransportQueryError, match="unknown registry kinds"):
            async for _ in session.subscribe(
                gql('subscription { registryChanged(kinds: ["nodes"]) { type } }')
            ):
                pass
        await pipelines.aclose()
        await registry.aclose()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed on this machine")
async def test_curl_posts_a_query(single_router: RouterProcesses) -> None:
    (node,) = single_router.ids
    body = json.dumps({"query": "{ cluster { nodeId isLeader members { id } } pipelines { name } }"})
    process = await asyncio.create_subprocess_exec(
        "curl",
        "--silent",
        "--show-error",
        "--fail-with-body",
        "-H",
        "Content-Type: application/json",
        "--data",
        body,
        f"http://127.0.0.1:{single_router.http_ports[node]}/graphql",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, err.decode()
    assert json.loads(out) == {
        "data": {"cluster": {"nodeId": node, "isLeader": True, "members": [{"id": node}]}, "pipelines": []}
    }
