"""SimEngine: one simulated engine (vLLM, SGLang, any OpenAI server), runnable many times in one loop.

Everything a request goes through lives here: validation (the engine's own
errors), the fault knobs, the sleep gate, the concurrency queue, and token
by token generation with client-disconnect checks. Response shapes come from
dialects.py, the text from textgen.py, the HTTP plumbing from http.py.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

import orjson

from router.engines import ENGINES

from . import textgen
from .apis import PathApis
from .dialects import DIALECTS, Choice, CompletionShape, Dialect, Shape
from .errors import ApiError
from .http import HttpServer, Request, Responder
from .options import SimOptions

SLEEP_MODES = ("abort", "wait", "keep")
#: A non-streaming request checks for disconnects and sleep at least this often.
ANSWER_SLICE_S = 0.05
#: What vLLM's /wake_up must restore before the engine runs again.
VLLM_WAKE_TAGS = frozenset({"weights", "kv_cache"})
Route = Callable[[Request, Responder], Awaitable[None]]


@dataclass
class Counters:
    """What /metrics reports; tests read these names (see the package docstring)."""

    requests: int = 0
    started: int = 0
    disconnects: int = 0
    sleep_calls: int = 0
    wake_calls: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    running: int = 0
    waiting: int = 0


@dataclass
class Generation:
    """A validated generation request."""

    chat: bool
    model: str
    prompts: list[str]
    prompt_tokens: int
    n: int
    max_tokens: int
    stop: list[str]
    stream: bool
    include_usage: bool
    echo: bool
    #: How the answer is worded (None: the dialect's completion or chat answer).
    shape: Optional[Shape] = None
    choices: list[list[str]] = field(default_factory=list)
    finish: list[str] = field(default_factory=list)
    stop_reason: list[Optional[str]] = field(default_factory=list)


class SimEngine:
    """A simulated engine serving `options` on loopback HTTP.

    ``await start()`` waits the startup delay, then listens (like vLLM, which
    only opens its port once the model is loaded); ``await stop()`` closes it.
    """

    def __init__(self, options: SimOptions):
        self.options = options
        self.dialect: Dialect = DIALECTS[ENGINES[options.engine].sim_dialect](options)
        self.counters = Counters()
        self.port = options.port
        self.created = int(time.time())
        self._random = random.Random(options.seed)
        self._http = HttpServer(self._handle)
        self._bearer = f"Bearer {options.api_key}" if options.api_key else ""
        self._slots = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
        #: Open while new generations may start (closed asleep, released, or draining for sleep).
        self._gate = asyncio.Event()
        self._gate.set()
        #: Set while running generations may proceed (cleared by sleep mode=keep).
        self._awake = asyncio.Event()
        self._awake.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.asleep = False
        self.sleep_level = 0
        #: Parts woken by ``/wake_up?tags=`` while still asleep.
        self._woken: set[str] = set()
        #: Bumped by sleep mode=abort: generations started before it finish with "abort".
        self._abort_epoch = 0
        self._control = asyncio.Lock()
        self.apis = PathApis(self)
        self._routes: dict[tuple[str, str], Route] = {
            ("GET", "/v1/models"): self._models,
            ("GET", "/metrics"): self._metrics,
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat,
            **self._dialect_routes(),
            **self.apis.routes(),
        }
        if self.dialect.serves_embeddings:
            self._routes[("POST", "/v1/embeddings")] = self._embeddings
        # A health path naming another route (an openai instance's /v1/models) leaves that route be.
        self._routes.setdefault(("GET", options.health_path), self._health)

    def _dialect_routes(self) -> dict[tuple[str, str], Route]:
        """The engine's own routes beyond the OpenAI API: vLLM's and SGLang's sleep APIs and info."""
        if self.dialect.name == "vllm":
            return {
                ("GET", "/version"): self._version,
                ("POST", "/sleep"): self._vllm_sleep,
                ("POST", "/wake_up"): self._vllm_wake,
                ("GET", "/is_sleeping"): self._vllm_is_sleeping,
            }
        if self.dialect.name == "sglang":
            return {
                **{(method, "/release_memory_occupation"): self._sglang_release for method in ("GET", "POST")},
                **{(method, "/resume_memory_occupation"): self._sglang_resume for method in ("GET", "POST")},
                ("GET", "/get_server_info"): self._sglang_server_info,
                ("GET", "/get_model_info"): self._sglang_model_info,
                ("GET", "/health_generate"): self._sglang_health_generate,
            }
        return {}

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        if self.options.startup_s:
            await asyncio.sleep(self.options.startup_s)
        self.port = await self._http.listen(self.options.host, self.options.port)

    async def stop(self) -> None:
        await self._http.close()

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.options.host in ("0.0.0.0", "", "localhost") else self.options.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    # ---------------------------------------------------------------- routing
    async def _handle(self, req: Request, resp: Responder) -> None:
        if self._bearer and self.dialect.key_guards(req.path) and req.headers.get("authorization") != self._bearer:
            resp.send(401, b'{"error":"Unauthorized"}')
            return
        route = self._routes.get((req.method, req.path)) or self.apis.prefixed(req.method, req.path)
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

    def _invalid(self, loc: str, kind: str, msg: str, value: Any, ctx: str = "") -> ApiError:
        """A request-validation error worded as FastAPI/pydantic word it in the engines."""
        shown = value if isinstance(value, str) else f"<{type(value).__name__}>"
        return ApiError(400, f"1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': {msg!r}, "
                             f"'input': {shown!r}{ctx}}}", self.dialect.validation_type, loc)

    def _json_body(self, req: Request, allow_empty: bool = False) -> dict[str, Any]:
        if allow_empty and not req.body.strip():
            return {}
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as e:
            raise self._invalid(f"body.{e.pos}", "json_invalid", "JSON decode error", "<dict of 0 items>",
                                f", 'ctx': {{'error': {e.msg!r}}}") from None
        if not isinstance(body, dict):
            size = f" of {len(body)} items" if isinstance(body, list) else ""
            raise self._invalid("body", "model_attributes_type",
                                "Input should be a valid dictionary or object to extract fields from",
                                f"<{type(body).__name__}{size}>")
        return body

    # ----------------------------------------------------------- plain routes
    async def _health(self, req: Request, resp: Responder) -> None:
        resp.send(200, b"", None)

    async def _version(self, req: Request, resp: Responder) -> None:
        resp.send(200, b'{"version":"0.32.0"}')

    async def _models(self, req: Request, resp: Responder) -> None:
        resp.send(200, self.dialect.models(self.created))

    async def _metrics(self, req: Request, resp: Responder) -> None:
        resp.send(200, self.metrics_text().encode(), b"text/plain; version=1.0.0; charset=utf-8")

    def metrics_text(self) -> str:
        d, c, labels = self.dialect, self.counters, self.dialect.metric_labels()
        rows = [
            (d.metric_running, "gauge", "Number of requests in model execution batches.", c.running),
            (d.metric_waiting, "gauge", "Number of requests waiting to be processed.", c.waiting),
            (d.metric_prompt_tokens, "counter", "Number of prefill tokens processed.", c.prompt_tokens),
            (d.metric_generation_tokens, "counter", "Number of generation tokens processed.", c.generation_tokens),
        ]
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(value)}"]
        if self.dialect.sleep_state_metric:
            name = "vllm:engine_sleep_state"
            lines += [f"# HELP {name} Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means "
                      "engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
                      f"# TYPE {name} gauge"]
            states = {"awake": not self.asleep, "weights_offloaded": self.asleep and self.sleep_level == 1,
                      "discard_all": self.asleep and self.sleep_level == 2}
            lines += [f'{name}{{{labels},sleep_state="{k}"}} {float(v)}' for k, v in states.items()]
        sim_rows = [
            ("sim_requests_total", "Generation requests received.", c.requests),
            ("sim_client_disconnects_total", "Clients that went away before their answer ended.", c.disconnects),
            ("sim_sleep_calls_total", "Sleep / release_memory_occupation calls received.", c.sleep_calls),
            ("sim_wake_calls_total", "Wake_up / resume_memory_occupation calls received.", c.wake_calls),
        ]
        for name, help_text, value in sim_rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {float(value)}"]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ vLLM sleep
    async def _vllm_sleep(self, req: Request, resp: Responder) -> None:
        params = req.params()
        level_text, mode = params.get("level", "1"), params.get("mode", "abort")
        try:
            level = int(level_text)
        except ValueError:
            raise self._invalid("query.level", "int_parsing",
                                "Input should be a valid integer, unable to parse string as an integer", level_text) from None
        if level > 2:
            raise self._invalid("query.level", "less_than_equal", "Input should be less than or equal to 2",
                                level_text, ", 'ctx': {'le': 2}")
        if level < 0:
            raise self._invalid("query.level", "greater_than_equal", "Input should be greater than or equal to 0",
                                level_text, ", 'ctx': {'ge': 0}")
        if mode not in SLEEP_MODES:
            raise self._invalid("query.mode", "literal_error", "Input should be 'abort', 'wait' or 'keep'", mode,
                                ", 'ctx': {'expected': \"'abort', 'wait' or 'keep'\"}")
        self.counters.sleep_calls += 1
        async with self._control:
            if not self.asleep:
                await self._fall_asleep(mode)
            self.asleep, self.sleep_level = True, level
        resp.send(200, orjson.dumps({"status": "sleeping", "level": level}))

    async def _fall_asleep(self, mode: str) -> None:
        """Close the gate to new work, then deal with running work as `mode` says."""
        self._gate.clear()
        if mode == "abort":
            self._abort_epoch += 1
        elif mode == "wait":
            await self._idle.wait()
        self._awake.clear()

    async def _vllm_wake(self, req: Request, resp: Responder) -> None:
        """Wake; with ``?tags=`` only those parts: awake once weights and KV cache both are."""
        self.counters.wake_calls += 1
        tags = [v for k, v in req.param_items() if k == "tags"] or None
        async with self._control:
            self._woken.update(tags or VLLM_WAKE_TAGS)
            if self._woken >= VLLM_WAKE_TAGS:
                self._wake()
        resp.send(200, orjson.dumps({"status": "sleeping" if self.asleep else "awake", "tags": tags}))

    def _wake(self) -> None:
        self.asleep, self.sleep_level = False, 0
        self._woken = set()
        self._awake.set()
        self._gate.set()

    async def _vllm_is_sleeping(self, req: Request, resp: Responder) -> None:
        resp.send(200, b'{"is_sleeping":true}' if self.asleep else b'{"is_sleeping":false}')

    # ------------------------------------------------------- SGLang memory API
    def _tags(self, req: Request) -> None:
        body = self._json_body(req, allow_empty=True)
        tags = body.get("tags")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise ApiError(400, "tags must be a list of strings (e.g. [\"weights\", \"kv_cache\"])", param="tags")

    async def _sglang_release(self, req: Request, resp: Responder) -> None:
        self._tags(req)
        self.counters.sleep_calls += 1
        async with self._control:
            if self.counters.running or self.counters.waiting:
                # SGLang asserts the scheduler is idle; we refuse instead of crashing.
                resp.send(400, orjson.dumps({"error": {"message": "release_memory_occupation should be called only when server is idle."}}))
                return
            self.asleep, self.sleep_level = True, 1
            self._gate.clear()
            self._awake.clear()
        resp.send(200, b"null")

    async def _sglang_resume(self, req: Request, resp: Responder) -> None:
        self._tags(req)
        self.counters.wake_calls += 1
        async with self._control:
            self._wake()
        resp.send(200, b"null")

    async def _sglang_server_info(self, req: Request, resp: Responder) -> None:
        o = self.options
        resp.send(200, orjson.dumps({
            "model_path": o.model, "tokenizer_path": o.model, "served_model_name": o.public_name,
            "host": o.host, "port": self.port, "context_length": o.max_model_len,
            "max_running_requests": o.max_concurrency or None, "version": "sim",
            "internal_states": [{"memory_released": self.asleep, "num_running_reqs": self.counters.running,
                                 "num_queue_reqs": self.counters.waiting}],
        }))

    async def _sglang_model_info(self, req: Request, resp: Responder) -> None:
        resp.send(200, orjson.dumps({"model_path": self.options.model, "tokenizer_path": self.options.model,
                                     "is_generation": True}))

    async def _sglang_health_generate(self, req: Request, resp: Responder) -> None:
        if self.asleep:
            resp.send(503, b"")
            return
        if self.options.ttft_ms:
            await asyncio.sleep(self.options.ttft_ms / 1000)
        resp.send(200, b"", b"text/plain; charset=utf-8")

    # -------------------------------------------------------------- generation
    async def _completions(self, req: Request, resp: Responder) -> None:
        await self._generate(req, resp, chat=False)

    async def _chat(self, req: Request, resp: Responder) -> None:
        await self._generate(req, resp, chat=True)

    async def _generate(self, req: Request, resp: Responder, chat: bool) -> None:
        self.counters.requests += 1
        await self.run(self._validate(self._json_body(req), chat), resp)

    async def run(self, gen: Generation, resp: Responder) -> None:
        """Generate `gen` and answer it on `resp`, through the fault knobs, sleep gate and queue."""
        o = self.options
        if self.asleep and not self.dialect.holds_while_asleep:
            raise ApiError(500, "memory is released (release_memory_occupation); call "
                                "/resume_memory_occupation first. Real SGLang has no gate here and "
                                "would run on released GPU memory.", "InternalServerError")
        if o.fail_rate and self._random.random() < o.fail_rate:
            raise ApiError(500, "simulated engine failure (--fail-rate)", "InternalServerError")
        if o.hang:
            await self._until_disconnect(resp)
            return
        if not await self._admit(resp):
            return
        try:
            self.counters.started += 1
            self.counters.prompt_tokens += gen.prompt_tokens
            fatal = o.die_after > 0 and self.counters.started == o.die_after
            self._plan(gen)
            if gen.stream:
                await self._stream(gen, resp, fatal)
            else:
                await self._answer(gen, resp, fatal)
        finally:
            self.counters.running -= 1
            if self._slots is not None:
                self._slots.release()
            if not self.counters.running:
                self._idle.set()

    def _model(self, body: dict[str, Any]) -> str:
        """The request's model: the engine's when absent; 404 where the dialect checks it."""
        o = self.options
        model = body.get("model")
        if model is None:
            return o.public_name
        if not isinstance(model, str):
            raise self._invalid("body.model", "string_type", "Input should be a valid string", model)
        if self.dialect.checks_model and model not in o.names:
            raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {', '.join(o.names)}.",
                           "NotFoundError", "model")
        return model

    def _validate(self, body: dict[str, Any], chat: bool, max_key: Optional[str] = None) -> Generation:
        """A generation from a completions/chat body; `max_key` names its output-token limit where
        another API (Responses: max_output_tokens) spells it otherwise."""
        o = self.options
        model = self._model(body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            try:
                prompts = [textgen.chat_prompt(messages)]
            except ValueError as e:
                raise ApiError(400, str(e), param="messages") from None
        elif not body.get("prompt"):
            raise ApiError(400, "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
                           param="prompt")
        else:
            prompts = self._prompts(body.get("prompt"), "prompt")
        n = self._int(body, "n", 1, 1)
        echo = bool(body.get("echo")) and not chat
        stream = body.get("stream") is True
        stream_options = body.get("stream_options")
        if stream_options is not None and not stream:
            raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        stop = body.get("stop")
        if stop is None:
            stops: list[str] = []
        elif isinstance(stop, str):
            stops = [stop] if stop else []
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = [s for s in stop if s]
        else:
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        counts = [textgen.count_tokens(p) for p in prompts]
        longest = max(counts)
        key = max_key or ("max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens")
        max_tokens = self._int(body, key, None, 1)
        if max_tokens is not None and max_tokens > o.max_model_len:
            raise ApiError(400, f"{key}={max_tokens} cannot be greater than max_model_len={o.max_model_len}. "
                                f"Please request fewer output tokens. (parameter={key}, value={max_tokens})", param=key)
        if longest + (max_tokens or 1) > o.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {o.max_model_len} tokens. However, you "
                                f"requested {longest + (max_tokens or 1)} tokens ({longest} in the input, "
                                f"{max_tokens or 1} in the output). Please reduce the length of the input or output.",
                           param="input_tokens")
        if max_tokens is None:
            max_tokens = o.max_model_len - longest
        return Generation(chat=chat, model=model, prompts=prompts, prompt_tokens=sum(counts), n=n,
                          max_tokens=max_tokens, stop=stops, stream=stream, include_usage=include_usage, echo=echo)

    def _int(self, body: dict[str, Any], key: str, default: Optional[int], least: int) -> Optional[int]:
        value = body.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._invalid(f"body.{key}", "int_parsing",
                                "Input should be a valid integer, unable to parse string as an integer", value)
        if value < least:
            raise ApiError(400, f"{key} must be at least {least}, got {value}.", param=key)
        return value

    @staticmethod
    def _prompts(prompt: Any, key: str) -> list[str]:
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return list(prompt)
            if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                return [" ".join(map(str, prompt))]
            if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
                return [" ".join(map(str, p)) for p in prompt]
        raise ApiError(400, f"{key} must be a string, a list of strings, or a list of token ids", param=key)

    async def _embeddings(self, req: Request, resp: Responder) -> None:
        """One vector per input (textgen.embedding), answered at once: no generation, no queue."""
        body = self._json_body(req)
        model = self._model(body)
        inputs = self._prompts(body.get("input"), "input")
        dims = self._int(body, "dimensions", textgen.EMBEDDING_DIMS, 1) or textgen.EMBEDDING_DIMS
        counts = [textgen.count_tokens(text) for text in inputs]
        if max(counts) > self.options.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {self.options.max_model_len} tokens. "
                                f"However, you requested {max(counts)} tokens in the input.", param="input")
        self.counters.prompt_tokens += sum(counts)
        resp.send(200, self.dialect.embeddings(model, [textgen.embedding(t, dims) for t in inputs], sum(counts)))

    def _plan(self, gen: Generation) -> None:
        """Decide every choice's tokens up front: the rule of textgen, cut at the first stop string."""
        for prompt in gen.prompts:
            seed = textgen.prompt_seed(prompt)
            for j in range(gen.n):
                pieces: list[str] = []
                text = ""
                finish, matched = "length", None
                for i in range(gen.max_tokens):
                    tok = textgen.token(seed, j, i)
                    hit = self._first_stop(text + tok, gen.stop, len(text)) if gen.stop else None
                    if hit is not None:
                        at, matched = hit
                        pieces.append(tok[:max(0, at - len(text))])
                        finish = "stop"
                        break
                    pieces.append(tok)
                    text += tok
                if gen.echo:
                    pieces[0] = prompt + pieces[0]
                gen.choices.append(pieces)
                gen.finish.append(finish)
                gen.stop_reason.append(matched)

    @staticmethod
    def _first_stop(text: str, stops: list[str], since: int) -> Optional[tuple[int, str]]:
        best: Optional[tuple[int, str]] = None
        for s in stops:
            at = text.find(s, max(0, since - len(s) + 1))
            if at >= 0 and (best is None or at < best[0]):
                best = (at, s)
        return best

    # ------------------------------------------------------ admission, waits
    async def _admit(self, resp: Responder) -> bool:
        """Wait for the gate (sleep) and a slot (max concurrency); False if the client left.

        Only slot waits count as waiting in /metrics: real vLLM 0.32 shows a
        request held by sleep in neither its running nor its waiting gauge.
        """
        while True:
            if not self._gate.is_set() and not await self._race(self._gate.wait(), resp):
                return False
            if self._slots is None:
                break
            if self._slots.locked():
                self.counters.waiting += 1
                try:
                    if not await self._race(self._slots.acquire(), resp):
                        return False
                finally:
                    self.counters.waiting -= 1
            else:
                await self._slots.acquire()
            if self._gate.is_set():
                break
            self._slots.release()  # fell asleep while we queued: wait again
        self._enter()
        return True

    def _enter(self) -> None:
        self.counters.running += 1
        self._idle.clear()

    async def _race(self, aw: Awaitable[Any], resp: Responder) -> bool:
        """Await `aw` unless the client disconnects first (then count it, return False)."""
        task = asyncio.ensure_future(aw)
        lost = resp.wait_disconnect()
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                self.counters.disconnects += 1
                return False
        # Done (maybe in the same instant the client left): the caller owns what it got.
        return True

    async def _until_disconnect(self, resp: Responder) -> None:
        await resp.wait_disconnect()
        self.counters.disconnects += 1

    async def _step(self, delay: float, resp: Responder, epoch: int) -> Optional[str]:
        """Wait one token's time; None to go on, else why generation ends."""
        if delay:
            await asyncio.sleep(delay)
        if resp.disconnected:
            self.counters.disconnects += 1
            return "disconnect"
        if epoch != self._abort_epoch:
            return "abort"
        if not self._awake.is_set():  # slept with mode=keep: pause until woken
            if not await self._race(self._awake.wait(), resp):
                return "disconnect"
        return None

    # ----------------------------------------------------------------- output
    async def _answer(self, gen: Generation, resp: Responder, fatal: bool) -> None:
        """Wait the generation time in slices (not token by token: cheaper), then answer."""
        o, epoch = self.options, self._abort_epoch
        ttft, itl = o.ttft_ms / 1000, o.itl_ms / 1000
        steps = max(len(p) for p in gen.choices)
        due = ttft + (steps - 1) * itl  # when the last token is ready
        spent = 0.0  # generation time so far (pauses of sleep mode=keep excluded)
        while True:
            piece = min(due - spent, ANSWER_SLICE_S)
            why = await self._step(piece, resp, epoch)
            spent += piece
            if why == "disconnect":
                return
            if why == "abort" or spent >= due:
                break
        if fatal:
            os._exit(1)
        if why == "abort":
            ready = 0 if spent < ttft else (1 + int((spent - ttft) / itl) if itl else steps)
            produced = [min(ready, len(p)) for p in gen.choices]
        else:
            produced = [len(p) for p in gen.choices]
        choices = []
        for k, pieces in enumerate(gen.choices):
            done = produced[k] == len(pieces)
            choices.append(Choice(k, "".join(pieces[:produced[k]]), gen.finish[k] if done else "abort",
                                  gen.stop_reason[k] if done else None))
        total = sum(produced)
        self.counters.generation_tokens += total
        resp.send(200, self._shape(gen).whole(choices, gen.prompt_tokens, total))

    def _shape(self, gen: Generation) -> Shape:
        return gen.shape or CompletionShape(self.dialect, gen.chat, gen.include_usage, gen.model)

    async def _stream(self, gen: Generation, resp: Responder, fatal: bool) -> None:
        o, epoch = self.options, self._abort_epoch
        sse = self._shape(gen).stream()
        budget = o.stall_after or -1  # chunks left before a stall; -1: no limit
        resp.start_stream()
        out = sse.opening(len(gen.choices))
        if not await self._send(resp, out, budget):
            return
        budget -= len(out)
        steps = max(len(p) for p in gen.choices)
        total = 0
        ended = ""
        for i in range(steps):
            ended = await self._step((o.ttft_ms if i == 0 else o.itl_ms) / 1000, resp, epoch) or ""
            if ended:
                break
            out = []
            for k, pieces in enumerate(gen.choices):
                if i < len(pieces) - 1:
                    out.append(sse.token(k, pieces[i]))
                elif i == len(pieces) - 1:
                    out.append(sse.token(k, pieces[i], gen.finish[k], gen.stop_reason[k]))
            total += len(out)
            self.counters.generation_tokens += len(out)
            if not await self._send(resp, out, budget):
                return
            budget -= len(out)
            if fatal:
                await asyncio.sleep(0)
                os._exit(1)
        if ended == "disconnect":
            return
        out = []
        if ended == "abort":
            out = [sse.token(k, "", "abort") for k, pieces in enumerate(gen.choices) if len(pieces) > i]
        out += sse.closing(gen.prompt_tokens, total)
        if await self._send(resp, out, budget):
            resp.end()

    async def _send(self, resp: Responder, chunks: list[bytes], budget: int) -> bool:
        """Write SSE chunks, stalling forever (until disconnect) once `budget` runs out."""
        if not chunks:
            return True
        if 0 <= budget < len(chunks):
            resp.chunk(b"".join(chunks[:budget]))
            await self._until_disconnect(resp)
            return False
        resp.chunk(b"".join(chunks))
        return True
