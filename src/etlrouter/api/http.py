"""`/graphql` on the router's aiohttp app: POST for queries and mutations,
and GET with a WebSocket upgrade for subscriptions (graphql-transport-ws, see ws.py).

POST bodies are JSON objects `{"query", "variables"?, "operationName"?}`, bounded by the app's
client_max_size (1 MiB). A malformed request or a query that fails validation (syntax, unknown field,
the limits in limits.py) answers 400 with `errors`; an executed one answers 200 with `data` and, when a
resolver failed, `errors` whose `extensions.code` names the kind of problem.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web
from ariadne import graphql
from ariadne.format_error import format_error
from graphql import GraphQLError, GraphQLSchema, parse

from etlrouter.api.auth import denial
from etlrouter.api.dlq import SidecarAdmins
from etlrouter.api.forward import LeaderForwarder
from etlrouter.api.limits import MAX_QUERY_CHARS, MAX_QUERY_TOKENS, QueryLimitsRule
from etlrouter.api.schema import ERROR_LOG, ApiContext, build_schema
from etlrouter.api.ws import GraphQLWebSockets
from etlrouter.router.node import RouterNode
from etlrouter.security.http import IDENTITY, forbidden

log = logging.getLogger(__name__)

PATH = "/graphql"


def _bad_request(message: str, status: int = 400) -> web.Response:
    return web.json_response(
        {"errors": [{"message": message, "extensions": {"code": "BAD_REQUEST"}}]}, status=status
    )


class GraphQLEndpoint:
    def __init__(self, node: RouterNode) -> None:
        self.node = node
        self.schema: GraphQLSchema = build_schema()
        self.forwarder = LeaderForwarder(node)
        self.admins = SidecarAdmins(node.config.transport, node.security)
        self.websockets = GraphQLWebSockets(self.schema, self.context, node.security)

    def context(self) -> ApiContext:
        return ApiContext(node=self.node, forwarder=self.forwarder, admins=self.admins)

    async def get(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self.websockets.handle(request)
        # No in-browser explorer: GraphiQL loads its scripts from a CDN, and nothing here may fetch from one.
        return web.Response(
            status=405,
            text="POST GraphQL queries as JSON to this URL; subscriptions: a WebSocket speaking "
            "graphql-transport-ws\n",
            headers={"Allow": "POST"},
        )

    async def post(self, request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return _bad_request(
                f"Content-Type must be application/json, got {request.content_type or 'none'}", 415
            )
        body = await request.read()  # raises 413 above client_max_size
        try:
            data: Any = json.loads(body)
        except ValueError as e:
            return _bad_request(f"the body is not JSON: {e}")
        if not isinstance(data, dict):
            return _bad_request(
                "the body must be a JSON object with `query` (batched requests are not supported)"
            )
        query = data.get("query")
        if not isinstance(query, str):
            return _bad_request("`query` must be a string")
        if len(query) > MAX_QUERY_CHARS:
            return _bad_request(
                f"query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}"
                " (pass large values as variables)",
                413,
            )
        try:
            document = parse(query, max_tokens=MAX_QUERY_TOKENS)
        except GraphQLError as e:
            return web.json_response({"errors": [format_error(e)]}, status=400)
        name = data.get("operationName")
        why = denial(request.get(IDENTITY), document, name if isinstance(name, str) else None)
        if why is not None:
            return forbidden(why)
        _, result = await graphql(
            self.schema,
            data,
            context_value=self.context(),
            query_document=document,
            validation_rules=[QueryLimitsRule],
            logger=ERROR_LOG,
        )
        return web.json_response(result, status=200 if "data" in result else 400)

    async def on_shutdown(self, _: web.Application) -> None:
        await self.websockets.close_all()
        self.forwarder.close()


GRAPHQL_ENDPOINT = web.AppKey("graphql_endpoint", GraphQLEndpoint)


def mount_graphql(app: web.Application, node: RouterNode) -> GraphQLEndpoint:
    """Serve the GraphQL API of `node` at /graphql on `app` (call before the app starts)."""
    endpoint = GraphQLEndpoint(node)
    app.router.add_get(PATH, endpoint.get, allow_head=False)
    app.router.add_post(PATH, endpoint.post)
    app.on_shutdown.append(endpoint.on_shutdown)
    app[GRAPHQL_ENDPOINT] = endpoint
    return endpoint
