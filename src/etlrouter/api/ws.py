"""The graphql-transport-ws protocol on aiohttp WebSockets (github.com/enisdenjo/graphql-ws, PROTOCOL.md).

connection_init -> connection_ack, then any number of `subscribe` operations (subscriptions stream `next`
messages until `complete`; queries and mutations answer one `next` and `complete`), `complete` from the
client to stop one, ping/pong both ways. Bounds: message size (aiohttp closes with 1009 above it),
operations at once per connection, connections at once per router, time to send connection_init.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from ariadne import graphql, subscribe
from ariadne.format_error import format_error
from graphql import (
    DocumentNode,
    GraphQLError,
    GraphQLSchema,
    OperationType,
    get_operation_ast,
    parse,
)

from etlrouter.api.auth import denial
from etlrouter.api.limits import MAX_QUERY_CHARS, MAX_QUERY_TOKENS, QueryLimitsRule
from etlrouter.api.schema import ERROR_LOG, ApiContext
from etlrouter.security import authz
from etlrouter.security.context import Security, Unauthenticated
from etlrouter.security.http import IDENTITY
from etlrouter.security.identity import ANONYMOUS, Identity

log = logging.getLogger(__name__)

PROTOCOL = "graphql-transport-ws"
MAX_MESSAGE_BYTES = 1 << 20  # a subscribe message may carry a pipeline definition in its variables
MAX_OPERATIONS_PER_CONNECTION = 16
MAX_CONNECTIONS = 256
INIT_TIMEOUT_S = 10.0
MAX_ID_CHARS = 128

# Close codes of the protocol.
BAD_MESSAGE = 4400
UNAUTHORIZED = 4401
FORBIDDEN = 4403
SUBPROTOCOL_NOT_ACCEPTABLE = 4406
INIT_TIMEOUT = 4408
DUPLICATE_ID = 4409
TOO_MANY_INITS = 4429


class _Closing(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class GraphQLWebSockets:
    """Serves graphql-transport-ws connections for one schema; `close_all` on shutdown."""

    def __init__(
        self, schema: GraphQLSchema, context: Callable[[], ApiContext], security: Security | None = None
    ) -> None:
        self.schema = schema
        self.context = context
        self.security = security or Security.insecure()
        self.connections: set[web.WebSocketResponse] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if len(self.connections) >= MAX_CONNECTIONS:
            raise web.HTTPServiceUnavailable(
                text=f"too many GraphQL WebSocket connections (limit {MAX_CONNECTIONS}); retry later"
            )
        ws = web.WebSocketResponse(protocols=(PROTOCOL,), max_msg_size=MAX_MESSAGE_BYTES, heartbeat=30.0)
        await ws.prepare(request)
        if ws.ws_protocol != PROTOCOL:
            await ws.close(code=SUBPROTOCOL_NOT_ACCEPTABLE, message=f"use subprotocol {PROTOCOL}".encode())
            return ws
        self.connections.add(ws)
        try:
            await _Connection(self, ws, request.get(IDENTITY)).run()
        finally:
            self.connections.discard(ws)
        return ws

    async def close_all(self) -> None:
        for ws in list(self.connections):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"router shutting down")


class _Connection:
    def __init__(
        self, server: GraphQLWebSockets, ws: web.WebSocketResponse, identity: Identity | None
    ) -> None:
        self.server = server
        self.ws = ws
        # None: security off. ANONYMOUS: the upgrade carried no credentials; connection_init must.
        self.identity = identity
        self.acknowledged = False
        self.init_received = False
        self.operations: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self._closer: asyncio.Future[bool] | None = None

    async def run(self) -> None:
        timer = asyncio.get_running_loop().call_later(INIT_TIMEOUT_S, self._init_timeout)
        try:
            async for message in self.ws:
                if message.type == WSMsgType.TEXT:
                    try:
                        await self._on_message(message.data)
                    except _Closing as e:
                        await self.ws.close(code=e.code, message=e.reason.encode()[:120])
                        break
                elif message.type == WSMsgType.BINARY:
                    await self.ws.close(
                        code=BAD_MESSAGE, message=b"binary messages are not part of the protocol"
                    )
                    break
                elif message.type == WSMsgType.ERROR:
                    log.info("GraphQL WebSocket closed with an error: %s", self.ws.exception())
                    break
        finally:
            timer.cancel()
            for task in self.operations.values():
                task.cancel()
            for task in list(self.operations.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _init_timeout(self) -> None:
        if not self.acknowledged and not self.ws.closed:
            self._closer = asyncio.ensure_future(
                self.ws.close(code=INIT_TIMEOUT, message=b"Connection initialisation timeout")
            )

    async def send(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            if not self.ws.closed:
                await self.ws.send_str(json.dumps(message))

    async def _on_message(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError as e:
            raise _Closing(BAD_MESSAGE, f"Invalid message received: not JSON ({e})") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise _Closing(BAD_MESSAGE, "Invalid message received: no `type`")
        kind = message["type"]
        if kind == "connection_init":
            if self.init_received:
                raise _Closing(TOO_MANY_INITS, "Too many initialisation requests")
            self.init_received = True
            self._authenticate(message.get("payload"))
            self.acknowledged = True
            await self.send({"type": "connection_ack"})
        elif kind == "ping":
            await self.send({"type": "pong"})
        elif kind == "pong":
            pass
        elif kind == "subscribe":
            await self._subscribe(message)
        elif kind == "complete":
            # The id is free again at once, whenever the cancelled task gets to finish.
            task = self.operations.pop(str(message.get("id")), None)
            if task is not None:
                task.cancel()
        else:
            raise _Closing(BAD_MESSAGE, f"Invalid message received: unknown type {kind!r}")

    def _authenticate(self, payload: Any) -> None:
        """A browser's credentials arrive in connection_init: `{"authorization": "Bearer TOKEN"}`."""
        if self.identity is not ANONYMOUS:
            return
        authorization = payload.get("authorization") if isinstance(payload, dict) else None
        try:
            identity = self.server.security.authenticate(
                None, authorization if isinstance(authorization, str) else None
            )
        except Unauthenticated as e:
            authz.DENIALS.report(ANONYMOUS, "GraphQL WebSocket", str(e), api="http", reason="unauthenticated")
            raise _Closing(FORBIDDEN, f"Forbidden: {e}") from None
        if not authz.holds(identity, authz.Permission.VIEWER):
            authz.DENIALS.report(identity, "GraphQL WebSocket", "viewer", api="http")
            raise _Closing(FORBIDDEN, f"Forbidden: {identity} requires 'viewer'")
        self.identity = identity

    async def _subscribe(self, message: dict[str, Any]) -> None:
        if not self.acknowledged:
            raise _Closing(UNAUTHORIZED, "Unauthorized")
        op_id, payload = message.get("id"), message.get("payload")
        if not isinstance(op_id, str) or not op_id or len(op_id) > MAX_ID_CHARS:
            raise _Closing(
                BAD_MESSAGE, f"Invalid message received: `id` must be a string of 1..{MAX_ID_CHARS}"
            )
        if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
            raise _Closing(BAD_MESSAGE, "Invalid message received: `payload.query` must be a string")
        if op_id in self.operations:
            raise _Closing(DUPLICATE_ID, f"Subscriber for {op_id} already exists")
        if len(self.operations) >= MAX_OPERATIONS_PER_CONNECTION:
            await self._error(
                op_id,
                f"this connection already runs {MAX_OPERATIONS_PER_CONNECTION} operations, the limit;"
                " complete one first",
                "RESOURCE_EXHAUSTED",
            )
            return
        self._spawn(op_id, self._operation(op_id, payload))

    def _spawn(self, op_id: str, work: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await work
            finally:
                if self.operations.get(op_id) is task:
                    del self.operations[op_id]

        task = asyncio.ensure_future(run())
        self.operations[op_id] = task

    async def _error(self, op_id: str, message: str, code: str) -> None:
        await self.send(
            {"type": "error", "id": op_id, "payload": [{"message": message, "extensions": {"code": code}}]}
        )

    async def _operation(self, op_id: str, payload: dict[str, Any]) -> None:
        query: str = payload["query"]
        if len(query) > MAX_QUERY_CHARS:
            await self._error(
                op_id, f"query is {len(query)} characters; the limit is {MAX_QUERY_CHARS}", "BAD_REQUEST"
            )
            return
        try:
            document = parse(query, max_tokens=MAX_QUERY_TOKENS)
        except GraphQLError as e:
            await self.send({"type": "error", "id": op_id, "payload": [format_error(e)]})
            return
        operation_name = payload.get("operationName")
        name = operation_name if isinstance(operation_name, str) else None
        why = denial(self.identity, document, name)
        if why is not None:
            await self._error(op_id, why, "FORBIDDEN")
            return
        operation = get_operation_ast(document, name)
        try:
            if operation is not None and operation.operation == OperationType.SUBSCRIPTION:
                await self._stream(op_id, payload, document)
            else:
                await self._single(op_id, payload, document)
        except GraphQLError as e:
            await self.send({"type": "error", "id": op_id, "payload": [format_error(e)]})
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("GraphQL WebSocket operation %s failed", op_id)
            await self._error(op_id, f"internal error: {type(e).__name__}: {e}", "INTERNAL")

    async def _single(self, op_id: str, payload: dict[str, Any], document: DocumentNode) -> None:
        _, result = await graphql(
            self.server.schema,
            payload,
            context_value=self.server.context(),
            query_document=document,
            validation_rules=[QueryLimitsRule],
            logger=ERROR_LOG,
        )
        if "data" not in result:  # the request itself is wrong: no execution happened
            await self.send({"type": "error", "id": op_id, "payload": result.get("errors", [])})
            return
        await self.send({"type": "next", "id": op_id, "payload": result})
        await self.send({"type": "complete", "id": op_id})

    async def _stream(self, op_id: str, payload: dict[str, Any], document: DocumentNode) -> None:
        ok, result = await subscribe(
            self.server.schema,
            payload,
            context_value=self.server.context(),
            query_document=document,
            validation_rules=[QueryLimitsRule],
            logger=ERROR_LOG,
        )
        if not ok or isinstance(result, list):
            await self.send({"type": "error", "id": op_id, "payload": result})
            return
        try:
            async for item in result:
                body: dict[str, Any] = {"data": item.data}
                if item.errors:
                    body["errors"] = [format_error(e) for e in item.errors]
                await self.send({"type": "next", "id": op_id, "payload": body})
        finally:
            aclose = getattr(result, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        await self.send({"type": "complete", "id": op_id})
