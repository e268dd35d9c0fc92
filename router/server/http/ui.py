"""The dashboard: GET /ui serves one static page that drives the router's own JSON API.

The page is plain HTML/CSS/JS shipped in ``router/ui`` (package data, no build
step, nothing fetched from another host). It reads ``/health/all``,
``/traffic/stats`` and ``/events`` like any client and posts the admin actions,
so it can show nothing the API does not; this module only serves its files and
answers ``/ui/whoami``.

Files are served from a fixed list with their content types (no directory
listing, no path from the request ever touches the file system) and under a
strict Content-Security-Policy: the page may talk to this router and nothing
else.

``/ui/whoami`` tells the page whether *this* request would pass the admin
rule, judged by the router's own ``Guard`` on a copy of the request's scope
turned into an admin call. The page then shows the action buttons only when
they would work, and a typed admin key (sent as ``Authorization: Bearer``) is
checked exactly as the actions will check it.
"""
from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from router.server.state import RouterState

UI_DIR = Path(__file__).resolve().parents[2] / "ui"

#: Every file the page consists of, with its content type: anything else under /ui is a 404.
FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: The page talks to its own router only; inline scripts and styles are refused.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Small files: always revalidate, so an upgraded router never runs with a stale script.
    "cache-control": "no-cache",
}

#: A path the Guard treats as an admin call (the /action/ prefix, a POST): what whoami asks about.
PROBE_PATH = "/action/whoami"


def ui_routes(state: RouterState) -> list[BaseRoute]:
    """GET /ui (the page), /ui/{file} (its scripts and styles) and /ui/whoami."""

    def serve(name: str) -> Response:
        # Read on each request: a few kilobytes, and an edited page shows on reload during development.
        return Response((UI_DIR / name).read_bytes(), media_type=FILES[name], headers=HEADERS)

    async def page(request: Request) -> Response:
        return serve("index.html")

    async def slash(request: Request) -> Response:
        return RedirectResponse(request.url.replace(path="/ui"), status_code=308)

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in FILES:
            return Response(f"No file /ui/{name}.\n", status_code=404, media_type="text/plain; charset=utf-8",
                            headers=HEADERS)
        return serve(name)

    async def whoami(request: Request) -> Response:
        probe = {**request.scope, "path": PROBE_PATH, "raw_path": PROBE_PATH.encode(), "method": "POST"}
        denied = state.guard.check(probe)
        return JSONResponse({
            "admin": denied is None,
            # Whether typing a key can help: without one, only loopback clients are admins.
            "admin_key_configured": state.config.router.admin_api_key is not None,
            "reason": None if denied is None else denied.message,
        }, headers={"cache-control": "no-store"})

    return [
        Route("/ui", page, methods=["GET"]),
        Route("/ui/", slash, methods=["GET"]),
        Route("/ui/whoami", whoami, methods=["GET"]),
        Route("/ui/{name}", static, methods=["GET"]),
    ]
