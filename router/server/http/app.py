"""create_app(config): the router as one ASGI callable, built from a Config.

Proxy routes go straight to the raw ASGI `Proxy` (the hot path); everything
else (listings, health, metrics, admin) is a Starlette app. All state lives
on one `RouterState` made per app, so a process can run many routers.
"""
from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import AsyncIterator, Optional, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from router import __version__
from router.config import Config
from router.engines import ENGINES
from router.server.fleet.models import Model, ModelTable
from router.server.fleet.report import model_report
from router.server.http.admin import admin_routes
from router.server.http.logs import log_routes
from router.server.http.ui import ui_routes
from router.server.proxy.affinity import RESPONSES_PATH
from router.server.proxy.auth import Guard
from router.server.proxy.errors import error_response
from router.server.proxy.forward import UPSTREAM_PREFIX, Proxy
from router.server.proxy.reply import Receive, Scope, Send, send_error
from router.server.state import RouterState

#: Longest silence on GET /events before a keep-alive comment line.
EVENTS_HEARTBEAT_SECONDS = 15.0

#: Every client path some engine kind serves: one no configured engine serves is a 404 that says so.
ENGINE_PATHS = frozenset(p for spec in ENGINES.values() for p in spec.client_paths)
STORED_RESPONSES = RESPONSES_PATH + "/"


class Serving(Protocol):
    """What the entry reads at each request: the router's own state, or a proxy worker's view."""

    guard: Guard
    table: ModelTable
    proxy: Proxy


class RouterApp:
    """The ASGI entry: a set lookup sends proxy paths to the hot path, the rest to `web` (Starlette
    in the router; in a proxy worker, the pass-through to its controller)."""

    def __init__(self, state: Serving, web: ASGIApp):
        self.state = state
        self.web = web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            state = self.state
            path = scope["path"]
            denied = state.guard.check(scope)
            if denied is not None:
                return await send_error(send, denied.status, denied.message, headers=denied.headers, path=path)
            if path in state.table.client_paths:
                if scope["method"] == "POST":
                    return await state.proxy(scope, receive, send)
                return await send_error(send, 405, f"Method {scope['method']} is not allowed on {path}; use POST.",
                                        headers=[(b"allow", b"POST")], path=path)
            if path in ENGINE_PATHS:
                return await send_error(send, 404, f"No configured engine serves {path}; the engine kinds that do "
                                        f"are {', '.join(n for n, s in ENGINES.items() if path in s.client_paths)}.",
                                        path=path)
            if path.startswith(STORED_RESPONSES):
                return await state.proxy.stored_response(scope, receive, send)
            if path.startswith(UPSTREAM_PREFIX):
                return await state.proxy.upstream(scope, receive, send)
        await self.web(scope, receive, send)


def create_app(config: Config, supervisor_socket: Optional[str] = None) -> RouterApp:
    """The router for `config`; with `supervisor_socket`, it follows supervisord's process states."""
    state = RouterState(config, supervisor_socket)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        state.control.open()
        if state.processes is not None:
            await state.processes.poll()  # know which engines run before the first probe
            state.processes.start()
        state.health.start()
        if state.leadership is not None:
            state.leadership.start(lambda: state.table)
        await state.idle.reconcile()  # ask the engines whether they sleep before the first request
        if state.workers is None:  # else when the first proxy worker connects (workers/controller_end.py)
            state.begin_serving()
        await state.dns.refresh()  # replicas found by DNS before the first request
        state.dns.start()
        hup = False
        with contextlib.suppress(ValueError, RuntimeError, NotImplementedError):  # only the main thread may
            loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(state.reload_logged()))
            hup = True
        try:
            yield
        finally:
            if hup:
                loop.remove_signal_handler(signal.SIGHUP)
            await state.dns.stop()
            await state.idle.stop()
            if state.leadership is not None:
                await state.leadership.stop()
            await asyncio.gather(*(m.lifecycle.close() for m in state.table))
            await state.health.stop()
            if state.processes is not None:
                await state.processes.stop()
            await state.control.close()
            for replica in state.table.replicas():
                replica.pool.close()
            if state.access_log is not None:
                state.access_log.flush()
            if state.traffic.activity is not None:
                state.traffic.activity.close()

    web = Starlette(routes=routes(state) + admin_routes(state) + log_routes(state) + ui_routes(state), lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    return RouterApp(state, web)


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

    def model_entry(name: str, model: Model) -> dict[str, object]:
        """One name's /v1/models entry: what its engine says of itself, under the name the client uses."""
        card = next((r.card for r in model.replicas if r.card is not None), None) or {}
        entry = {**card, "id": name, "object": "model", "created": card.get("created", int(state.started_at)),
                 "owned_by": card.get("owned_by", model.replicas[0].instance.engine),
                 "root": card.get("root", model.name), "residency": model.lifecycle.state}
        adapter = state.table.adapter(name)
        if adapter is not None:  # as vLLM lists its adapters: root is the adapter's path, parent its base
            entry.update(root=adapter.path, parent=model.name)
        return entry

    async def list_models(request: Request) -> Response:
        table = state.table
        tenants = state.proxy.tenants
        data = []
        for name in table.names:
            model = table.get(name)
            assert model is not None
            adapter = table.adapter(name)
            if tenants is None or tenants.may_use(request.scope, adapter.name if adapter else model.name):
                data.append(model_entry(name, model))
        return JSONResponse({"object": "list", "data": data})

    async def retrieve_model(request: Request) -> Response:
        name = request.path_params["model"]
        model = state.table.get(name)
        if model is None:
            return error_response(404, f"The model '{name}' does not exist. Known models: "
                                       f"{', '.join(state.table.names)}.", param="model")
        tenants = state.proxy.tenants
        adapter = state.table.adapter(name)
        asked = adapter.name if adapter else model.name
        if tenants is not None and not tenants.may_use(request.scope, asked):
            return error_response(403, f"This key may not use model '{asked}'.", param="model")
        return JSONResponse(model_entry(name, model))

    async def kvcached_models(request: Request) -> Response:
        return JSONResponse({"models": {m.name: {"endpoint": m.replicas[0].url, "state": m.lifecycle.state,
                                                 "endpoints": [r.url for r in m.replicas]} for m in state.table}})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "healthy"})

    async def health_all(request: Request) -> Response:
        settings = state.config.router
        reports = await asyncio.gather(*(model_report(state.control, m, settings) for m in state.table))
        ok = all(r["status"] in ("healthy", "sleeping") for r in reports)
        body: dict[str, object] = {"status": "healthy" if ok else "degraded", "models": {r["model"]: r for r in reports}}
        if state.workers is not None:  # the table generation each proxy worker has acknowledged
            body["generation"] = state.workers.generation
            body["workers"] = state.workers.report()
        return JSONResponse(body)

    async def health_model(request: Request) -> Response:
        name = request.path_params["model"]
        table = state.table
        model = table.get(name)
        if model is None:
            return error_response(404, f"The model '{name}' does not exist. Known models: {', '.join(table.names)}.",
                                  param="model")
        report = await model_report(state.control, model, state.config.router)
        return JSONResponse(report, status_code=503 if report["status"] == "unhealthy" else 200)

    async def server_info(request: Request) -> Response:
        return JSONResponse(server_information(state))

    async def metrics(request: Request) -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def events(request: Request) -> Response:
        """Server-sent events: the recent history, then every state change as it happens."""
        async def lines() -> AsyncIterator[bytes]:
            sub = state.events.subscribe()  # before the history is read, so nothing falls between
            try:
                for event in state.events.recent():
                    yield b"data: " + event.json() + b"\n\n"
                while True:
                    news = await sub.next(EVENTS_HEARTBEAT_SECONDS)
                    # A comment line on silence keeps proxies from closing an idle stream.
                    yield b": keep-alive\n\n" if news is None else b"data: " + news.json() + b"\n\n"
            finally:
                sub.close()
        return StreamingResponse(lines(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/models", kvcached_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/all", health_all, methods=["GET"]),
        Route("/health/{model:path}", health_model, methods=["GET"]),
        Route("/get_server_info", server_info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/events", events, methods=["GET"]),
    ]


def server_information(state: RouterState) -> dict[str, object]:
    """What /get_server_info reports: never a secret, only whether one is set."""
    config = state.config
    table = state.table
    settings = {k: v for k, v in config.router.__dict__.items() if k not in ("api_keys", "admin_api_key")}
    settings["api_keys_configured"] = len(config.router.api_keys)
    settings["admin_api_key_configured"] = config.router.admin_api_key is not None
    settings["tracing"] = dict(config.router.tracing.__dict__)
    return {
        "version": __version__,
        "config_path": config.path,
        "started_at": state.started_at,
        "uptime_seconds": round(time.monotonic() - state.started_monotonic, 3),
        "router": settings,
        "sleep_manager": dict(config.sleep.__dict__),
        "cluster": None if state.leadership is None else {
            "leading": state.leadership.local(), "leader": state.leadership.elector.leader(),
            "identity": state.leadership.elector.holder},
        "models": {m.name: {
            "aliases": table.aliases(m),
            "state": m.lifecycle.state,
            "endpoints": [{"instance": r.name, "endpoint": r.url, "engine": r.instance.engine,
                           "served_names": list(r.instance.served_names), "health": r.health,
                           "outstanding": r.outstanding} for r in m.replicas],
        } for m in table},
    }
