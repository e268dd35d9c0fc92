"""GET /usage: requests, prompt and completion tokens, errors and 429s over a window, by client key
name or by model (router/observe/usage.py keeps the counts).

An admin endpoint (router/server/proxy/auth.py): key names and usage are the
operator's business. Under ``router.workers`` a worker passes it to the
controller, after the controller has applied every request the worker finished
(the workers' pass-through syncs first), so the counts are the whole router's.
"""
from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from router.observe.usage import FIELDS, GROUPS, MAX_WINDOW_SECONDS
from router.server.http.admin import BadQuery, _guard, _query_number
from router.server.state import RouterState

#: The window when the query names none: the last hour, as the page's panel shows.
DEFAULT_WINDOW_SECONDS = 3600.0


def usage_routes(state: RouterState) -> list[BaseRoute]:
    async def usage(request: Request) -> Response:
        window = _query_number(request, "window", DEFAULT_WINDOW_SECONDS, 0.0, MAX_WINDOW_SECONDS, strict_min=True)
        by = request.query_params.get("by", "key")
        if by not in GROUPS:
            raise BadQuery("by", f"query parameter 'by' must be one of {', '.join(GROUPS)}, not {by!r}")
        rows = state.traffic.usage_window(window, by)
        total = {field: sum(row[field] for row in rows.values()) for field in FIELDS}
        return Response(orjson.dumps({"window_seconds": window, "by": by, "usage": rows, "total": total}),
                        media_type="application/json", headers={"cache-control": "no-store"})

    return [Route("/usage", _guard(usage), methods=["GET"])]
