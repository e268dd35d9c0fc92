"""The vLLM dialect's routes: its sleep API with the three tiers, /version, and its client paths.

vLLM 0.32's dev endpoints (``VLLM_SERVER_DEV_MODE=1``): ``POST /sleep?level=0|1|2&mode=``,
``POST /wake_up`` with optional repeated ``tags=weights|kv_cache``, ``GET /is_sleeping``,
``POST /collective_rpc {"method": "reload_weights"}`` and ``POST /reset_prefix_cache``.
What each tier keeps, and so what a wake must redo, is router.sim.memory; the time
each step takes is the ``--sleep-s``, ``--wake-s`` and ``--reload-s`` knobs.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import orjson

from .api import EngineApi, Route, RouteTable
from .core import SLEEP_MODES
from .dialects import VllmDialect
from .errors import ApiError
from .http import Request, Responder


class VllmApi(EngineApi):
    wording = VllmDialect

    def routes(self) -> RouteTable:
        p = self.paths
        return {
            **super().routes(),
            ("GET", "/version"): self.version,
            ("POST", "/sleep"): self.sleep,
            ("POST", "/wake_up"): self.wake_up,
            ("GET", "/is_sleeping"): self.is_sleeping,
            ("POST", "/collective_rpc"): self.collective_rpc,
            ("POST", "/reset_prefix_cache"): self.reset_prefix_cache,
            ("POST", "/v1/responses"): p.responses,
            ("POST", "/v1/messages"): p.messages,
            ("POST", "/v1/messages/count_tokens"): p.count_tokens,
            ("POST", "/tokenize"): p.tokenize,
            ("POST", "/detokenize"): p.detokenize,
            ("POST", "/v1/chat/completions/batch"): p.chat_batch,
            ("POST", "/invocations"): p.invocations,
            ("POST", "/v1/audio/transcriptions"): p.transcriptions,
            ("POST", "/v1/audio/translations"): p.translations,
        }

    def prefixed(self, method: str, path: str) -> Optional[Route]:
        return self.paths.prefixed(method, path)

    async def version(self, req: Request, resp: Responder) -> None:
        resp.send(200, b'{"version":"0.32.0"}')

    def engine_metrics(self, labels: str) -> list[str]:
        m, name = self.core.memory, "vllm:engine_sleep_state"
        states = {"awake": not m.asleep, "weights_offloaded": m.asleep and m.level == 1,
                  "discard_all": m.asleep and m.level == 2}
        return [f"# HELP {name} Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means "
                "engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
                f"# TYPE {name} gauge",
                *(f'{name}{{{labels},sleep_state="{k}"}} {float(v)}' for k, v in states.items())]

    # -------------------------------------------------------------- sleep API
    def _level(self, text: str) -> int:
        invalid = self.core.reader.invalid
        try:
            level = int(text)
        except ValueError:
            raise invalid("query.level", "int_parsing",
                          "Input should be a valid integer, unable to parse string as an integer", text) from None
        if level > 2:
            raise invalid("query.level", "less_than_equal", "Input should be less than or equal to 2", text,
                          ", 'ctx': {'le': 2}")
        if level < 0:
            raise invalid("query.level", "greater_than_equal", "Input should be greater than or equal to 0", text,
                          ", 'ctx': {'ge': 0}")
        return level

    async def sleep(self, req: Request, resp: Responder) -> None:
        """Level 1 takes --sleep-s (the weights go to host RAM); levels 0 and 2 free nothing worth copying."""
        c = self.core
        params = req.params()
        level, mode = self._level(params.get("level", "1")), params.get("mode", "abort")
        if mode not in SLEEP_MODES:
            raise c.reader.invalid("query.mode", "literal_error", "Input should be 'abort', 'wait' or 'keep'", mode,
                                   ", 'ctx': {'expected': \"'abort', 'wait' or 'keep'\"}")
        c.counters.sleep_calls += 1
        async with c.control:
            c.calls.append(f"sleep level={level}")
            if not c.memory.asleep:
                await c.close_gate(mode)
            if c.memory.sleep(level) and c.options.sleep_s:
                await asyncio.sleep(c.options.sleep_s)
        resp.send(200, orjson.dumps({"status": "sleeping", "level": level}))

    async def wake_up(self, req: Request, resp: Responder) -> None:
        """Wake; with ``?tags=`` only those parts: awake once weights and KV cache both are. Weights
        offloaded at level 1 take --wake-s to come back; level-2 weights come back empty (see reload)."""
        c = self.core
        c.counters.wake_calls += 1
        tags = [v for k, v in req.param_items() if k == "tags"] or None
        async with c.control:
            c.calls.append("wake_up" + (" tags=" + ",".join(tags) if tags else ""))
            if c.memory.restores(tags) and c.options.wake_s:
                await asyncio.sleep(c.options.wake_s)
            awake = c.memory.wake(tags)
            if awake:
                c.open_gate()
        resp.send(200, orjson.dumps({"status": "awake" if awake else "sleeping", "tags": tags}))

    async def is_sleeping(self, req: Request, resp: Responder) -> None:
        resp.send(200, b'{"is_sleeping":true}' if self.core.memory.asleep else b'{"is_sleeping":false}')

    async def collective_rpc(self, req: Request, resp: Responder) -> None:
        """Only ``reload_weights`` is modelled: it reads the weights from disk (--reload-s) into memory
        that must be awake (after ``/wake_up?tags=weights``); vLLM answers each worker's result."""
        c = self.core
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as e:
            resp.send(400, orjson.dumps({"detail": f"JSON decode error: {e}"}))
            return
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            resp.send(400, b'{"detail":"Missing \'method\' in request body"}')
            return
        if method != "reload_weights":
            raise ApiError(500, f"the simulated engine models only collective_rpc method 'reload_weights', "
                                f"not {method!r}", "InternalServerError")
        async with c.control:
            c.calls.append("collective_rpc reload_weights")
            if not c.memory.weights_mapped:
                raise ApiError(500, "reload_weights: the weights' memory is asleep; call /wake_up?tags=weights "
                                    "first (real vLLM fails here on unmapped GPU memory)", "InternalServerError")
            c.counters.reload_calls += 1
            if c.options.reload_s:
                await asyncio.sleep(c.options.reload_s)
            c.memory.reload()
        resp.send(200, b'{"results":[null]}')

    async def reset_prefix_cache(self, req: Request, resp: Responder) -> None:
        c = self.core
        async with c.control:
            c.calls.append("reset_prefix_cache")
            c.counters.cache_resets += 1
            c.memory.reset_cache()
        resp.send(200, b"", None)
