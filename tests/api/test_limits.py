"""Bad requests and the bounds of /graphql, on one real router process: HTTP status codes and messages,
query depth and size limits, and the graphql-transport-ws protocol rules (subprotocol, init, ids,
operations per connection, message size, ping, complete)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from etlrouter.api.limits import MAX_DEPTH, MAX_FIELDS
from etlrouter.api.ws import MAX_MESSAGE_BYTES, MAX_OPERATIONS_PER_CONNECTION
from tests.integration.cluster import RouterProcesses

SUBSCRIBE = {"query": "subscription { registryChanged { type revision } }"}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


def url(routers: RouterProcesses, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{routers.http_ports[routers.ids[0]]}/graphql"


async def post(session: aiohttp.ClientSession, target: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with session.post(target, **kwargs) as response:
        return response.status, await response.json()


async def receive(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    message = await asyncio.wait_for(ws.receive(), 10)
    assert message.type == aiohttp.WSMsgType.TEXT, (message.type, message.data, message.extra)
    body: dict[str, Any] = json.loads(message.data)
    return body


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    message = await asyncio.wait_for(ws.receive(), 10)
    assert message.type == aiohttp.WSMsgType.CLOSE, (message.type, message.data)
    return ws.close_code, str(message.extra or "")


async def test_bad_http_requests_are_refused_with_reasons(
    single_router: RouterProcesses, session: aiohttp.ClientSession
) -> None:
    target = url(single_router)
    status, body = await post(session, target, data=b"{ cluster { nodeId } }")
    assert status == 415 and "application/json" in body["errors"][0]["message"]
    status, body = await post(
        session, target, data=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert status == 400 and "not JSON" in body["errors"][0]["message"]
    status, body = await post(session, target, json=[{"query": "{ cluster { nodeId } }"}])
    assert status == 400 and "batched" in body["errors"][0]["message"]
    status, body = await post(session, target, json={"query": "{ cluster { nodeId "})
    assert status == 400 and body["errors"][0]["locations"] == [{"line": 1, "column": 20}]
    status, body = await post(session, target, json={"query": "{ clusters { nodeId } }"})
    assert status == 400 and "clusters" in body["errors"][0]["message"]
    status, body = await post(session, target, json={"query": SUBSCRIBE["query"]})
    assert status == 400 and "data" not in body
    async with session.post(target, json={"query": "{ cluster { nodeId } }", "pad": "x" * (1 << 20)}) as r:
        assert r.status == 413
    # GET without a WebSocket upgrade says how to use the endpoint (no explorer: it would need a CDN).
    async with session.get(target) as r:
        assert r.status == 405 and "graphql-transport-ws" in await r.text()


async def test_query_depth_and_field_count_are_bounded(
    single_router: RouterProcesses, session: aiohttp.ClientSession
) -> None:
    target = url(single_router)
    deep = "{ __schema { types { " + "ofType { " * MAX_DEPTH + "name" + " }" * MAX_DEPTH + " } } }"
    status, body = await post(session, target, json={"query": deep})
    assert status == 400 and f"the limit is {MAX_DEPTH}" in body["errors"][0]["message"]
    wide = "{ " + " ".join(f"a{i}: cluster {{ nodeId }}" for i in range(MAX_FIELDS // 2 + 1)) + " }"
    status, body = await post(session, target, json={"query": wide})
    assert status == 400 and f"the limit is {MAX_FIELDS}" in body["errors"][0]["message"]
    # Fragments that spread each other twice per level: 2^20 fields, measured without expanding them.
    levels = 20
    fragments = " ".join(
        f"fragment F{i} on Query {{ ...F{i + 1} a{i}: __typename ...F{i + 1} }}" for i in range(levels)
    )
    bomb = f"{{ ...F0 }} {fragments} fragment F{levels} on Query {{ __typename }}"
    status, body = await post(session, target, json={"query": bomb})
    assert status == 400 and "fields" in body["errors"][0]["message"]
    # A normal query with many fields is fine.
    status, body = await post(
        session, target, json={"query": "{ a: cluster { nodeId } b: cluster { term } }"}
    )
    assert status == 200 and body["data"]["a"]["nodeId"] == single_router.ids[0]


async def test_websocket_protocol_rules(
    single_router: RouterProcesses, session: aiohttp.ClientSession
) -> None:
    target = url(single_router, "ws")
    async with session.ws_connect(target, protocols=("graphql-ws",)) as ws:
        assert await closed_with(ws) == (4406, "use subprotocol graphql-transport-ws")

    async with session.ws_connect(target, protocols=("graphql-transport-ws",)) as ws:
        await ws.send_json({"type": "subscribe", "id": "1", "payload": SUBSCRIBE})
        assert await closed_with(ws) == (4401, "Unauthorized")

    async with session.ws_connect(target, protocols=("graphql-transport-ws",)) as ws:
        await ws.send_json({"type": "connection_init"})
        assert await receive(ws) == {"type": "connection_ack"}
        await ws.send_json({"type": "ping"})
        assert await receive(ws) == {"type": "pong"}
        await ws.send_json({"type": "connection_init"})
        assert await closed_with(ws) == (4429, "Too many initialisation requests")

    async with session.ws_connect(target, protocols=("graphql-transport-ws",)) as ws:
        await ws.send_json({"type": "connection_init"})
        await receive(ws)
        for i in range(MAX_OPERATIONS_PER_CONNECTION + 1):
            await ws.send_json({"type": "subscribe", "id": str(i), "payload": SUBSCRIBE})
        seen: dict[str, list[dict[str, Any]]] = {}
        while len(seen) < MAX_OPERATIONS_PER_CONNECTION + 1:
            message = await receive(ws)
            seen.setdefault(message["id"], []).append(message)
        refused = seen[str(MAX_OPERATIONS_PER_CONNECTION)][0]
        assert (
            refused["type"] == "error" and refused["payload"][0]["extensions"]["code"] == "RESOURCE_EXHAUSTED"
        )
        assert all(seen[str(i)][0]["type"] == "next" for i in range(MAX_OPERATIONS_PER_CONNECTION))
        # `complete` stops one; its id is free again, and a query runs on the same connection.
        await ws.send_json({"type": "complete", "id": "0"})
        await ws.send_json({"type": "subscribe", "id": "q", "payload": {"query": "{ cluster { nodeId } }"}})
        while (message := await receive(ws))["id"] != "q":
            pass
        assert message == {
            "type": "next",
            "id": "q",
            "payload": {"data": {"cluster": {"nodeId": "router-0"}}},
        }
        assert await receive(ws) == {"type": "complete", "id": "q"}
        await ws.send_json({"type": "subscribe", "id": "1", "payload": SUBSCRIBE})
        assert await closed_with(ws) == (4409, "Subscriber for 1 already exists")

    async with session.ws_connect(target, protocols=("graphql-transport-ws",)) as ws:
        await ws.send_json({"type": "connection_init"})
        await receive(ws)
        await ws.send_str(
            json.dumps({"type": "subscribe", "id": "big", "payload": {"query": "x" * MAX_MESSAGE_BYTES}})
        )
        code, _ = await closed_with(ws)
        assert code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

    async with session.ws_connect(target, protocols=("graphql-transport-ws",)) as ws:
        await ws.send_json({"type": "connection_init"})
        await receive(ws)
        await ws.send_json({"type": "subscribe", "id": "bad", "payload": {"query": "subscription { nope }"}})
        error = await receive(ws)
        assert error["type"] == "error" and "nope" in error["payload"][0]["message"]
        await ws.send_json({"type": "unknown"})
        code, reason = await closed_with(ws)
        assert code == 4400 and "unknown type" in reason
