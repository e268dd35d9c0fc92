"""SimEngine: one simulated engine (vLLM, SGLang, any OpenAI server) on loopback HTTP, runnable many
times in one loop.

It joins the parts: the engine's dialect (its routes, *_api.py, and the
words of its answers, dialects.py), one `SimCore` behind them, and the HTTP
server (http.py). Here live only the API key check, the route lookup and
FastAPI's 404/405 answers.
"""
from __future__ import annotations

import asyncio

from router.engines import ENGINES

from .api import EngineApi, RouteTable
from .core import Counters, SimCore
from .dialects import Dialect
from .errors import ApiError
from .http import HttpServer, Request, Responder
from .openai_api import OpenaiApi
from .options import SimOptions
from .sglang_api import SglangApi
from .vllm_api import VllmApi

#: Each dialect's API, by the name its engine's `EngineSpec.sim_dialect` gives (dialects.DIALECTS' keys).
APIS: dict[str, type[EngineApi]] = {api.wording.name: api for api in (VllmApi, SglangApi, OpenaiApi)}


class SimEngine:
    """A simulated engine serving `options` on loopback HTTP.

    ``await start()`` waits the startup delay, then listens (like vLLM, which
    only opens its port once the model is loaded); ``await stop()`` closes it.
    """

    def __init__(self, options: SimOptions):
        self.options = options
        api_class = APIS[ENGINES[options.engine].sim_dialect]
        self.core = SimCore(options, api_class.wording(options))
        self.api = api_class(self.core)
        self._http = HttpServer(self._handle)
        self._bearer = f"Bearer {options.api_key}" if options.api_key else ""
        self._routes: RouteTable = self.api.routes()
        # A health path naming another route (an openai instance's /v1/models) leaves that route be.
        self._routes.setdefault(("GET", options.health_path), self.api.health)

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        if self.options.startup_s:
            await asyncio.sleep(self.options.startup_s)
        self.core.port = await self._http.listen(self.options.host, self.options.port)

    async def stop(self) -> None:
        await self._http.close()

    @property
    def port(self) -> int:
        return self.core.port

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "", "localhost") else self.options.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    # ------------------------------------------------ state tests read directly
    @property
    def dialect(self) -> Dialect:
        return self.core.dialect

    @property
    def counters(self) -> Counters:
        return self.core.counters

    @property
    def created(self) -> int:
        return self.core.created

    @property
    def asleep(self) -> bool:
        return self.core.memory.asleep

    @property
    def sleep_level(self) -> int:
        return self.core.memory.level

    @property
    def calls(self) -> list[str]:
        """The sleep-API calls received, in order (also at GET /sim/state)."""
        return self.core.calls

    def metrics_text(self) -> str:
        return self.api.metrics_text()

    # ---------------------------------------------------------------- routing
    async def _handle(self, req: Request, resp: Responder) -> None:
        if self._bearer and self.dialect.key_guards(req.path) and req.headers.get("authorization") != self._bearer:
            resp.send(401, b'{"error":"Unauthorized"}')
            return
        route = self._routes.get((req.method, req.path)) or self.api.prefixed(req.method, req.path)
        if route is None:
            allowed = [m for m, path in self._routes if path == req.path]
            if allowed:
                resp.send(405, b'{"detail":"Method Not Allowed"}', headers=b"allow: %s\r\n" % ", ".join(allowed).encode())
            else:
                resp.send(404, b'{"detail":"Not Found"}')
            return
        try:
            await route(req, resp)
        except ApiError as e:
            resp.send(e.status, self.dialect.error(e.status, e.message, e.err_type, e.param))
