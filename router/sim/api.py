"""EngineApi: the routes every simulated engine serves; each dialect's subclass adds its own.

A dialect (vllm_api.py, sglang_api.py, openai_api.py) owns its routes and names
the class that words its answers (dialects.py); nothing here asks which engine
it is. The state behind the routes is one `SimCore`.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Awaitable, Callable, Optional

import orjson

from . import textgen
from .core import SimCore
from .dialects import Dialect
from .errors import ApiError
from .http import Request, Responder
from .lora import lora_routes
from .paths import PathApis

Route = Callable[[Request, Responder], Awaitable[None]]
RouteTable = dict[tuple[str, str], Route]
#: The simulator's own state for tests (not an engine path): counters, sleep state, the sleep-API calls in order.
STATE_PATH = "/sim/state"


class EngineApi:
    """OpenAI completions and chat, the model list, /metrics, health and the simulator's state."""

    #: The class that words this dialect's answers.
    wording: type[Dialect] = Dialect

    def __init__(self, core: SimCore):
        self.core = core
        self.paths = PathApis(core)

    def routes(self) -> RouteTable:
        return {
            ("GET", "/v1/models"): self.models,
            ("GET", "/metrics"): self.metrics,
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat,
            ("GET", STATE_PATH): self.state,
            **lora_routes(self.core.options.engine, self.core.adapters, self.wording.lora_text, self.core.options.lora_load_s),
        }

    def prefixed(self, method: str, path: str) -> Optional[Route]:
        """A route whose path carries an id (none here)."""
        return None

    # ------------------------------------------------------------------ routes
    async def health(self, req: Request, resp: Responder) -> None:
        resp.send(200, b"", None)

    async def models(self, req: Request, resp: Responder) -> None:
        c = self.core
        listed = c.dialect.models(c.created)
        if c.adapters.loaded:  # each loaded LoRA adapter too, under its base's name
            body = orjson.loads(listed)
            body["data"] += [{**c.dialect.model_card(name, c.created), "root": path, "parent": c.options.public_name}
                             for name, path in c.adapters.loaded.items()]
            listed = orjson.dumps(body)
        resp.send(200, listed)

    async def completions(self, req: Request, resp: Responder) -> None:
        await self.core.generate(req, resp, chat=False)

    async def chat(self, req: Request, resp: Responder) -> None:
        await self.core.generate(req, resp, chat=True)

    async def embeddings(self, req: Request, resp: Responder) -> None:
        """One vector per input (textgen.embedding), answered at once: no generation, no queue."""
        c = self.core
        body = c.reader.json_body(req)
        model = c.reader.model(body)
        inputs = c.reader.prompts(body.get("input"), "input")
        dims = c.reader.integer(body, "dimensions", textgen.EMBEDDING_DIMS, 1) or textgen.EMBEDDING_DIMS
        counts = [textgen.count_tokens(text) for text in inputs]
        if max(counts) > c.options.max_model_len:
            raise ApiError(400, f"This model's maximum context length is {c.options.max_model_len} tokens. "
                                f"However, you requested {max(counts)} tokens in the input.", param="input")
        c.counters.prompt_tokens += sum(counts)
        resp.send(200, c.dialect.embeddings(model, [textgen.embedding(t, dims) for t in inputs], sum(counts)))

    async def state(self, req: Request, resp: Responder) -> None:
        c, m = self.core, self.core.memory
        resp.send(200, orjson.dumps({
            "asleep": m.asleep, "sleep_level": m.level, "woken": sorted(m.woken), "weights_lost": m.weights_lost,
            "cache_stale": m.cache_stale, "answers_right": m.answers_right, "calls": c.calls,
            "counters": asdict(c.counters), "lora": c.adapters.state()}))

    # ----------------------------------------------------------------- metrics
    async def metrics(self, req: Request, resp: Responder) -> None:
        resp.send(200, self.metrics_text().encode(), b"text/plain; version=1.0.0; charset=utf-8")

    def metrics_text(self) -> str:
        d, c, labels = self.core.dialect, self.core.counters, self.core.dialect.metric_labels()
        rows = [
            (d.metric_running, "gauge", "Number of requests in model execution batches.", c.running),
            (d.metric_waiting, "gauge", "Number of requests waiting to be processed.", c.waiting),
            (d.metric_prompt_tokens, "counter", "Number of prefill tokens processed.", c.prompt_tokens),
            (d.metric_generation_tokens, "counter", "Number of generation tokens processed.", c.generation_tokens),
        ]
        lines = []
        for name, kind, help_text, value in rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{{{labels}}} {float(value)}"]
        lines += self.engine_metrics(labels)
        sim_rows = [
            ("sim_requests_total", "counter", "Generation requests received.", c.requests),
            ("sim_client_disconnects_total", "counter", "Clients that went away before their answer ended.", c.disconnects),
            ("sim_sleep_calls_total", "counter", "Sleep / release_memory_occupation calls received.", c.sleep_calls),
            ("sim_wake_calls_total", "counter", "Wake_up / resume_memory_occupation calls received.", c.wake_calls),
            ("sim_reload_calls_total", "counter", "Weight reloads (reload_weights / update_weights_from_disk).",
             c.reload_calls),
            ("sim_cache_resets_total", "counter", "Prefix-cache resets (reset_prefix_cache / flush_cache).", c.cache_resets),
            ("sim_answers_right", "gauge", "1 while generations produce the right text; 0 while the weights or the "
             "prefix cache are lost (garbage).", int(self.core.memory.answers_right)),
        ]
        for name, kind, help_text, value in sim_rows:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {float(value)}"]
        return "\n".join(lines) + "\n"

    def engine_metrics(self, labels: str) -> list[str]:
        """Lines of the engine's own metrics beyond the four every dialect has."""
        return []
