"""The SGLang dialect's routes: its memory API, weight reload and cache flush, info, and client paths.

``/release_memory_occupation`` then ``/resume_memory_occupation`` (JSON body,
optional ``tags``; answer ``null``). What a release loses depends on the
server's flags (router.sim.memory): nothing without ``--enable-memory-saver``;
with it, the weights, unless ``--enable-weights-cpu-backup`` keeps a host copy
(release takes --sleep-s, resume --wake-s). Lost weights come back with
``POST /update_weights_from_disk {"model_path"}`` (--reload-s), and answers are
right again once ``/flush_cache`` has dropped the stale radix cache too.
"""
from __future__ import annotations

import asyncio
from typing import Optional

import orjson

from .api import EngineApi, Route, RouteTable
from .dialects import SglangDialect
from .errors import ApiError
from .http import Request, Responder

FLUSHED = (b"Cache flushed.\nPlease check backend logs for more details. "
           b"(When there are running or waiting requests, the operation will not be performed.)\n")
BOTH = ("GET", "POST")


class SglangApi(EngineApi):
    wording = SglangDialect

    def routes(self) -> RouteTable:
        p = self.paths
        return {
            **super().routes(),
            **{(m, "/release_memory_occupation"): self.release for m in BOTH},
            **{(m, "/resume_memory_occupation"): self.resume for m in BOTH},
            ("POST", "/update_weights_from_disk"): self.update_weights_from_disk,
            **{(m, "/flush_cache"): self.flush_cache for m in BOTH},
            ("GET", "/get_server_info"): self.server_info,
            ("GET", "/get_model_info"): self.model_info,
            ("GET", "/health_generate"): self.health_generate,
            # SGLang mounts /v1/embeddings whatever the model; the OpenAI shape approximates its answer.
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/v1/responses"): p.responses,
            **{("POST", path): p.tokenize for path in ("/tokenize", "/v1/tokenize")},
            **{("POST", path): p.detokenize for path in ("/detokenize", "/v1/detokenize")},
            ("POST", "/invocations"): p.invocations_chat,
            ("POST", "/v1/score"): p.sglang_score,
            ("POST", "/v1/rerank"): p.sglang_rerank,
            ("POST", "/v1/classify"): p.sglang_classify,
        }

    def prefixed(self, method: str, path: str) -> Optional[Route]:
        return self.paths.prefixed(method, path)

    @property
    def _frees_weights(self) -> bool:
        """A release frees the weights for good: the saver is on and keeps no host copy."""
        o = self.core.options
        return o.memory_saver and not o.weights_cpu_backup

    def _tags(self, req: Request) -> Optional[list[str]]:
        body = self.core.reader.json_body(req, allow_empty=True)
        tags = body.get("tags")
        if tags is not None and (not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)):
            raise ApiError(400, "tags must be a list of strings (e.g. [\"weights\", \"kv_cache\"])", param="tags")
        return tags

    # ------------------------------------------------------------- memory API
    async def release(self, req: Request, resp: Responder) -> None:
        c, o = self.core, self.core.options
        tags = self._tags(req)
        c.counters.sleep_calls += 1
        async with c.control:
            c.calls.append("release_memory_occupation")
            if c.busy:
                # SGLang asserts the scheduler is idle; we refuse instead of crashing.
                resp.send(400, orjson.dumps({"error": {"message": "release_memory_occupation should be called only when server is idle."}}))
                return
            await c.close_gate("keep")  # idle: nothing to abort or wait for
            if o.memory_saver and o.weights_cpu_backup and o.sleep_s and not c.memory.asleep:
                await asyncio.sleep(o.sleep_s)
            c.memory.release(tags, self._frees_weights)
        resp.send(200, b"null")

    async def resume(self, req: Request, resp: Responder) -> None:
        c, o = self.core, self.core.options
        self._tags(req)
        c.counters.wake_calls += 1
        async with c.control:
            c.calls.append("resume_memory_occupation")
            if c.memory.asleep and o.memory_saver and o.weights_cpu_backup and o.wake_s:
                await asyncio.sleep(o.wake_s)
            c.memory.resume()
            c.open_gate()
        resp.send(200, b"null")

    async def update_weights_from_disk(self, req: Request, resp: Responder) -> None:
        """Only this engine's own model path can be read back (the simulator has no other weights)."""
        c = self.core
        body = c.reader.json_body(req)
        path = body.get("model_path")
        if not isinstance(path, str):
            raise c.reader.invalid("body.model_path", "missing" if path is None else "string_type",
                                   "Field required" if path is None else "Input should be a valid string",
                                   f"<dict of {len(body)} items>" if path is None else path)
        async with c.control:
            c.calls.append("update_weights_from_disk")
            if c.memory.asleep:
                message = "memory is released: call /resume_memory_occupation before /update_weights_from_disk"
            elif path != c.options.model:
                message = (f"Failed to get weights iterator: {path!r} is not the model this simulated engine serves "
                           f"({c.options.model!r}).")
            else:
                c.counters.reload_calls += 1
                if c.options.reload_s:
                    await asyncio.sleep(c.options.reload_s)
                c.memory.reload()
                resp.send(200, b'{"success":true,"message":"Succeeded to update model weights.","num_paused_requests":0}')
                return
        resp.send(400, orjson.dumps({"success": False, "message": message, "num_paused_requests": 0}))

    async def flush_cache(self, req: Request, resp: Responder) -> None:
        """Refused (400) while requests run or wait, as SGLang does."""
        c = self.core
        async with c.control:
            c.calls.append("flush_cache")
            if c.busy:
                resp.send(400, FLUSHED, b"text/plain; charset=utf-8")
                return
            c.counters.cache_resets += 1
            c.memory.reset_cache()
        resp.send(200, FLUSHED, b"text/plain; charset=utf-8")

    # ------------------------------------------------------------------- info
    async def server_info(self, req: Request, resp: Responder) -> None:
        c, o = self.core, self.core.options
        resp.send(200, orjson.dumps({
            "model_path": o.model, "tokenizer_path": o.model, "served_model_name": o.public_name,
            "host": o.host, "port": c.port,
            "context_length": o.max_model_len, "max_running_requests": o.max_concurrency or None, "version": "sim",
            "enable_memory_saver": o.memory_saver, "enable_weights_cpu_backup": o.weights_cpu_backup,
            "internal_states": [{"memory_released": c.memory.asleep, "num_running_reqs": c.counters.running,
                                 "num_queue_reqs": c.counters.waiting}],
        }))

    async def model_info(self, req: Request, resp: Responder) -> None:
        o = self.core.options
        resp.send(200, orjson.dumps({"model_path": o.model, "tokenizer_path": o.model, "is_generation": True}))

    async def health_generate(self, req: Request, resp: Responder) -> None:
        if self.core.memory.asleep:
            resp.send(503, b"")
            return
        if self.core.options.ttft_ms:
            await asyncio.sleep(self.core.options.ttft_ms / 1000)
        resp.send(200, b"", b"text/plain; charset=utf-8")
