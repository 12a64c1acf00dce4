"""The dashboard: a single page of plain ES modules and SVG (static/dashboard/), shipped as package data and
served by the router at `/`; it talks only to the public GraphQL API at `graphql` relative to itself, so
it works behind a reverse proxy that serves the router under a path prefix. No build step, no CDN.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from aiohttp import web

# Nothing but this origin: scripts, styles, and the API (HTTP and WebSocket); the page is never framed.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidated on every load: a router upgrade serves its own page
}


def dashboard_dir() -> Path:
    return Path(str(resources.files("etlrouter.api").joinpath("static/dashboard")))


def mount_dashboard(app: web.Application) -> None:
    """Serve the dashboard page at `/` and its modules under `/dashboard/` on `app`."""
    root = dashboard_dir()
    index = (root / "index.html").read_bytes()

    async def page(_: web.Request) -> web.Response:
        return web.Response(body=index, content_type="text/html", charset="utf-8", headers=_HEADERS)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/dashboard/"):
            response.headers.update(_HEADERS)

    app.router.add_get("/", page)
    app.router.add_static("/dashboard/", root, show_index=False, follow_symlinks=False)
    app.on_response_prepare.append(on_prepare)
