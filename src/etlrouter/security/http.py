"""The HTTP side of authentication and authorization: an aiohttp middleware for every role's app.

With TLS on, a request is authenticated by its client certificate or `Authorization: Bearer TOKEN`, then
checked against the path's permission (security/authz.py). A 401 carries `WWW-Authenticate: Bearer`; a 403
names the missing permission. The GraphQL endpoint checks each root field on top (api/auth.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from etlrouter.security import authz
from etlrouter.security.context import CALLER, Security, Unauthenticated
from etlrouter.security.identity import ANONYMOUS, Identity

IDENTITY: web.RequestKey[Identity] = web.RequestKey("etlrouter_identity", Identity)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    # JSON errors shaped like GraphQL's, so the dashboard and curl read them the same way.
    return web.json_response(
        {"errors": [{"message": message, "extensions": {"code": code}}]}, status=status, headers=headers
    )


def unauthenticated(message: str) -> web.Response:
    return _error(401, "UNAUTHENTICATED", message, {"WWW-Authenticate": 'Bearer realm="etlrouter"'})


def forbidden(message: str) -> web.Response:
    return _error(403, "FORBIDDEN", message)


def peer_cert(request: web.Request) -> dict[str, Any] | None:
    transport = request.transport
    return transport.get_extra_info("peercert") if transport is not None else None


def is_websocket(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def make_guard(security: Security) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not security.enabled:
            return await handler(request)
        needed = authz.http_path_permission(request.path)
        if needed is None or (request.path == "/metrics" and security.auth_config.metrics_open):
            return await handler(request)
        what = f"{request.method} {request.path}"
        try:
            identity = security.authenticate(peer_cert(request), request.headers.get("Authorization"))
        except Unauthenticated as e:
            if is_websocket(request) and request.path == "/graphql":
                # Browsers cannot set headers on a WebSocket: the token comes in connection_init (api/ws.py).
                request[IDENTITY] = ANONYMOUS
                return await handler(request)
            authz.DENIALS.report(ANONYMOUS, what, str(e), api="http", reason="unauthenticated")
            return unauthenticated(f"{what}: {e}")
        if not authz.holds(identity, needed):
            authz.DENIALS.report(identity, what, f"permission {needed.value!r}", api="http")
            return forbidden(f"{what}: permission denied for {identity}: requires {needed.value!r}")
        request[IDENTITY] = identity
        token = CALLER.set(identity)
        try:
            return await handler(request)
        finally:
            CALLER.reset(token)

    return guard
