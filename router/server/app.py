"""create_app(config): the router as one ASGI callable, built from a Config.

Proxy routes go straight to the raw ASGI `Proxy` (the hot path); everything
else (listings, health, metrics, admin) is a Starlette app. All state lives
on one `RouterState` made per app, so a process can run many routers.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Optional

import aiohttp
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from router import __version__
from router.observe.accesslog import AccessLog
from router.server.admin import admin_routes
from router.server.auth import Guard
from router.server.replicas import ModelTable
from router.config import Config
from router.server.errors import error_response
from router.server.health import HealthChecker, model_report
from router.server.lifecycle import SleepManager
from router.observe.metrics import Metrics
from router.server.proxy import Proxy, Receive, Scope, Send, send_error
from router.observe.traffic import Traffic

PROXY_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})


class RouterState:
    """Everything one router app owns; handed to routes, admin routes and the sleep manager."""

    def __init__(self, config: Config):
        self.config = config
        self.table = ModelTable(config)
        self.traffic = Traffic([m.name for m in self.table])
        self.metrics = Metrics(self.table)
        self.health = HealthChecker(self.table, config.router)
        self.sleep_manager = SleepManager(self)
        self.access_log: Optional[AccessLog] = AccessLog() if config.router.access_log else None
        #: The aiohttp session for health probes, sleep/wake and admin calls (the proxy
        #: uses each backend's own pool); exists between lifespan start and end.
        self.session: Optional[aiohttp.ClientSession] = None
        self.started_at = time.time()
        self.started_monotonic = time.monotonic()


def new_session() -> aiohttp.ClientSession:
    """Pooled keep-alive connections with no cap; bodies relayed as the engine encoded them."""
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


class RouterApp:
    """The ASGI entry: a set lookup sends proxy paths to the hot path, the rest to Starlette."""

    def __init__(self, state: RouterState, proxy: Proxy, web: Starlette):
        self.state = state
        self.web = web
        self.proxy = proxy
        self._guard = Guard(state.config.router)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            denied = self._guard.check(scope)
            if denied is not None:
                return await send_error(send, denied.status, denied.message, headers=denied.headers)
            if scope["path"] in PROXY_PATHS:
                if scope["method"] == "POST":
                    return await self.proxy(scope, receive, send)
                return await send_error(send, 405, f"Method {scope['method']} is not allowed on {scope['path']}; use POST.",
                                        headers=[(b"allow", b"POST")])
        await self.web(scope, receive, send)


def create_app(config: Config) -> RouterApp:
    state = RouterState(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.session = new_session()
        state.health.start(state.session)
        await state.sleep_manager.start()
        try:
            yield
        finally:
            await state.sleep_manager.stop()
            await state.health.stop()
            await state.session.close()
            for backend in state.table.backends():
                backend.pool.close()
            if state.access_log is not None:
                state.access_log.flush()

    web = Starlette(routes=routes(state) + admin_routes(state), lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    return RouterApp(state, Proxy(state), web)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in the OpenAI error shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No route for {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}."
    else:
        message = exc.detail
    return error_response(exc.status_code, message, headers=exc.headers)


def routes(state: RouterState) -> list[BaseRoute]:
    """The router's own endpoints (everything but the proxy and admin routes)."""
    table = state.table
    config = state.config

    async def list_models(request: Request) -> Response:
        created = int(state.started_at)
        data = []
        for name in table.names:
            model = table.get(name)
            assert model is not None
            data.append({"id": name, "object": "model", "created": created,
                         "owned_by": model.backends[0].instance.engine, "root": model.name})
        return JSONResponse({"object": "list", "data": data})

    async def kvcached_models(request: Request) -> Response:
        return JSONResponse({"models": {m.name: {"endpoint": m.backends[0].url,
                                                 "endpoints": [b.url for b in m.backends]} for m in table}})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "healthy"})

    async def health_all(request: Request) -> Response:
        reports = await asyncio.gather(*(model_report(state.session, m, config.router) for m in table))
        ok = all(r["status"] in ("healthy", "sleeping") for r in reports)
        return JSONResponse({"status": "healthy" if ok else "degraded", "models": {r["model"]: r for r in reports}})

    async def health_model(request: Request) -> Response:
        name = request.path_params["model"]
        model = table.get(name)
        if model is None:
            return error_response(404, f"The model '{name}' does not exist. Known models: {', '.join(table.names)}.",
                                  param="model")
        report = await model_report(state.session, model, config.router)
        return JSONResponse(report, status_code=503 if report["status"] == "unhealthy" else 200)

    async def server_info(request: Request) -> Response:
        return JSONResponse(server_information(state))

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/models", kvcached_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/all", health_all, methods=["GET"]),
        Route("/health/{model:path}", health_model, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]


def server_information(state: RouterState) -> dict[str, Any]:
    """What /get_server_info reports: never a secret, only whether one is set."""
    config = state.config
    settings = {k: v for k, v in config.router.__dict__.items() if k not in ("api_keys", "admin_api_key")}
    settings["api_keys_configured"] = len(config.router.api_keys)
    settings["admin_api_key_configured"] = config.router.admin_api_key is not None
    return {
        "version": __version__,
        "config_path": config.path,
        "started_at": state.started_at,
        "uptime_seconds": round(time.monotonic() - state.started_monotonic, 3),
        "router": settings,
        "sleep_manager": dict(config.sleep.__dict__),
        "models": {m.name: {
            "aliases": [n for n in state.table.names if state.table.get(n) is m and n != m.name],
            "state": m.lifecycle.state,
            "endpoints": [{"instance": b.name, "endpoint": b.url, "engine": b.instance.engine,
                           "served_names": list(b.instance.served_names), "health": b.health,
                           "outstanding": b.outstanding} for b in m.backends],
        } for m in state.table},
    }
