"""Support for the router tests: a background event loop running the real
router on uvicorn and small aiohttp engines with precise misbehaviours.

The tests themselves are synchronous clients (the OpenAI SDK, urllib, raw
sockets) in the main thread, talking over loopback to servers on this loop.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Awaitable, Iterator, Optional, TypeVar

import orjson
import pytest
import uvicorn
import uvloop
from aiohttp import web
from helpers import PY, Proc, free_port, wait_http

from router.config import Config, load_config
from router.server.http.app import RouterApp, create_app
from router.server.http.fastserver import FastHttpProtocol

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread; `run` executes a coroutine on it and waits."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def close(self) -> None:
        """Cancel what is still pending (handlers of hung test engines), then stop the loop."""
        async def cancel_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        self.run(cancel_rest())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class Engine:
    """A tiny OpenAI-like engine; `behaviour` decides how each generation request is answered.

    Records every request body and whether a streaming client went away.
    """

    def __init__(self, behaviour: str = "ok", chunks: int = 5, interval: float = 0.0, health: int = 200,
                 keepalive: float = 75.0, host: str = "127.0.0.1", port: Optional[int] = None):
        self.behaviour = behaviour
        self.chunks = chunks
        self.interval = interval
        self.health_status = health
        self.keepalive = keepalive
        #: Another loopback address (127.0.0.2) and a shared port make replicas found by DNS.
        self.host = host
        self.port = port or free_port()
        self.bodies: list[bytes] = []
        self.headers: list[Any] = []
        self.disconnects = 0
        self.health_probes = 0
        self.chunk_times: list[float] = []
        #: Client addresses seen, one per connection the router opened.
        self.peers: set[Any] = set()
        self.runner: Optional[web.AppRunner] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> "Engine":
        app = web.Application()
        app.on_response_prepare.append(self.tag_response)
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_post("/v1/embeddings", self.generate)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, keepalive_timeout=self.keepalive)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        """Every answer names its request, as vLLM's --enable-request-id-headers does."""
        response.headers["X-Request-Id"] = f"req-{len(self.bodies)}"

    async def health(self, request: web.Request) -> web.Response:
        self.health_probes += 1
        return web.Response(status=self.health_status)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        self.headers.append(request.headers.copy())
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        payload = orjson.loads(body)
        if self.behaviour == "error400":
            return web.json_response({"error": {"message": "max_tokens is too large", "type": "BadRequestError",
                                                 "param": "max_tokens", "code": 400}}, status=400)
        if self.behaviour == "error503":
            return web.json_response({"error": {"message": "engine overloaded", "type": "ServiceUnavailable",
                                                 "param": None, "code": 503}}, status=503)
        if self.behaviour == "reset":  # the connection dies before any status line
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if self.behaviour == "hang":
            await asyncio.sleep(3600)
        if payload.get("stream"):
            return await self.stream(request, payload)
        if self.behaviour == "big":
            return web.json_response({**completion(payload, request.path), "padding": "x" * 2_000_000})
        if self.interval:
            await asyncio.sleep(self.interval)
        return web.json_response(completion(payload, request.path))

    async def stream(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        try:
            for i in range(self.chunks):
                if i and self.interval:
                    await asyncio.sleep(self.interval)
                if self.behaviour == "die" and i == 2:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if self.behaviour == "stall" and i == 2:
                    await asyncio.sleep(3600)
                self.chunk_times.append(time.monotonic())
                await resp.write(b"data: " + orjson.dumps(chunk(payload, request.path, i)) + b"\n\n")
            options = payload.get("stream_options")
            if isinstance(options, dict) and options.get("include_usage") is True:  # as vLLM: a last chunk
                await resp.write(b"data: " + orjson.dumps(usage_chunk(payload, request.path, self.chunks)) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except asyncio.CancelledError:
            self.disconnects += 1
            raise
        except ConnectionResetError:
            self.disconnects += 1
        return resp


def completion(payload: dict[str, Any], path: str) -> dict[str, Any]:
    if path.endswith("embeddings"):
        return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
                "model": payload["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    chat = "chat" in path
    choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "hello world"}
    else:
        choice["text"] = "hello world"
    return {"id": "cmpl-1", "object": "chat.completion" if chat else "text_completion", "created": 1,
            "model": payload["model"], "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}


def chunk(payload: dict[str, Any], path: str, i: int) -> dict[str, Any]:
    chat = "chat" in path
    choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None}
    if chat:
        choice["delta"] = {"content": f"t{i} "}
    else:
        choice["text"] = f"t{i} "
    return {"id": "cmpl-1", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
            "model": payload["model"], "choices": [choice]}


def write_config(tmp: Path, instances: list[dict[str, Any]], router: Optional[dict[str, Any]] = None) -> Path:
    """A YAML config whose instances are engines started elsewhere (launch: false)."""
    import yaml
    doc = {"router": {"router_port": free_port(), "access_log": False, **(router or {})},
           "instances": [{"engine": "vllm", "launch": False, **i} for i in instances]}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def instance(model: str, port: int, *args: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "engine_args": ["--host", "127.0.0.1", "--port", str(port), *args], **extra}


class RouterServer:
    """The real app on a real uvicorn (httptools), on the loop thread; with ``router.workers`` > 1,
    the real ``python -m router.serve`` (a controller and its proxy workers) as a subprocess."""

    def __init__(self, loop: LoopThread, config: Config):
        self.loop = loop
        self.config = config
        self.port = config.router.port
        self.process: Optional[Proc] = None
        if config.router.workers > 1:
            return
        self.app: RouterApp = create_app(config)
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, http=FastHttpProtocol, lifespan="on",
            access_log=False, log_level="warning", timeout_graceful_shutdown=2))
        self.task: Optional[asyncio.Task[None]] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "RouterServer":
        if self.config.router.workers > 1:
            self.process = Proc([PY, "-m", "router.serve", "--config", self.config.path],
                                log=str(Path(self.config.path).with_suffix(".router.log")))
            wait_http(self.url + "/health", timeout=30)
            return self

        async def go() -> None:
            self.task = asyncio.ensure_future(self.server.serve())
            while not self.server.started:
                if self.task.done():
                    self.task.result()
                await asyncio.sleep(0.01)
        self.loop.run(go())
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            return

        async def go() -> None:
            self.server.should_exit = True
            if self.task is not None:
                await self.task
        self.loop.run(go())


def config_from(tmp: Path, instances: list[dict[str, Any]], router: Optional[dict[str, Any]] = None) -> Config:
    return load_config(write_config(tmp, instances, router), sim=True)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def stack(loop: LoopThread, tmp_path: Path) -> Iterator["Stack"]:
    s = Stack(loop, tmp_path)
    yield s
    s.close()


class Stack:
    """Engines and routers of one test, all stopped at its end."""

    def __init__(self, loop: LoopThread, tmp: Path):
        self.loop = loop
        self.tmp = tmp
        self.engines: list[Engine] = []
        self.routers: list[RouterServer] = []

    def engine(self, **kw: Any) -> Engine:
        e = self.loop.run(Engine(**kw).start())
        self.engines.append(e)
        return e

    def router(self, instances: list[dict[str, Any]], **router: Any) -> RouterServer:
        r = RouterServer(self.loop, config_from(self.tmp, instances, router)).start()
        self.routers.append(r)
        return r

    def close(self) -> None:
        for r in self.routers:
            r.stop()
        for e in self.engines:
            self.loop.run(e.stop())


def usage_chunk(payload: dict[str, Any], path: str, chunks: int) -> dict[str, Any]:
    """The last chunk of a stream that asked `stream_options.include_usage`: one prompt token, a
    completion token per chunk."""
    return {"id": "cmpl-1", "object": "chat.completion.chunk" if "chat" in path else "text_completion", "created": 1,
            "model": payload["model"], "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": chunks, "total_tokens": 1 + chunks}}
