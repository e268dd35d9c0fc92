"""LoRA adapters in the simulated engine: the engines' load and unload endpoints, their bound, and
answers that show which adapter made them.

The paths and flags are the engine's own (router/engines/: `LoraApi`): vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` with ``--enable-lora``
and ``--max-loras`` (default 1), SGLang's ``/load_lora_adapter`` and
``/unload_lora_adapter`` with ``--enable-lora`` (or ``--lora-paths``) and
``--max-loaded-loras``. Adapters named by ``--lora-modules``/``--lora-paths`` are
loaded at start. The simulator's rules, where the engines' differ or are not
modelled:

- a load needs the adapter's path to exist on disk (a folder; its contents are
  not read), else 400 as vLLM words a missing adapter;
- a load beyond the bound is refused (400), so a router must unload first;
- a name already loaded is refused with vLLM's words ("has already been loaded");
- a generation for a loaded adapter starts its text with ``[<adapter>]``; one for
  a name that is neither the model nor a loaded adapter gets the engine's 404.
"""
from __future__ import annotations

import asyncio
import os
from typing import Awaitable, Callable, Optional

import orjson

from router.engines import ENGINES, has_flag

from .errors import ApiError
from .http import Request, Responder

Route = Callable[[Request, Responder], Awaitable[None]]


class Adapters:
    """The adapters one simulated engine holds (name -> path), and what it was asked."""

    def __init__(self, engine: str, argv: tuple[str, ...]):
        lora = ENGINES[engine].lora
        self.enabled = lora is not None and (has_flag(argv, lora.enable_flag)
                                             or (lora.static_enables and has_flag(argv, lora.static_flag)))
        #: How many it holds at most (None: no bound).
        self.bound: Optional[int] = lora.capacity(argv) if lora is not None else None
        self.loaded: dict[str, str] = dict(lora.preloaded(argv)) if lora is not None else {}
        #: Every load and unload call, in order: ``"load sql"``, ``"unload sql"``.
        self.calls: list[str] = []
        self.loads = 0
        self.unloads = 0

    def mark(self, model: str) -> str:
        """The words a generation for `model` starts with: the adapter's name, for an adapter."""
        return f"[{model}] " if model in self.loaded else ""

    def load(self, name: str, path: str) -> None:
        self.loads += 1
        self.calls.append(f"load {name}")
        if not self.enabled:
            raise ApiError(400, "LoRA is not enabled on this server; start it with --enable-lora.")
        if name in self.loaded:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput")
        if self.bound is not None and len(self.loaded) >= self.bound:
            raise ApiError(400, f"Cannot load lora adapter '{name}': {len(self.loaded)} adapters are loaded, the most "
                                f"this server holds (max loras {self.bound}); unload one first.", "InvalidUserInput")
        if not os.path.isdir(path):
            raise ApiError(400, f"Loading lora {name} failed: No adapter found for {path}", "InvalidUserInput")
        self.loaded[name] = path

    def unload(self, name: str) -> None:
        self.unloads += 1
        self.calls.append(f"unload {name}")
        if self.loaded.pop(name, None) is None:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")

    def state(self) -> dict[str, object]:
        return {"loaded": sorted(self.loaded), "bound": self.bound, "loads": self.loads, "unloads": self.unloads,
                "calls": self.calls}


def _body(req: Request) -> dict[str, object]:
    try:
        body = orjson.loads(req.body or b"{}")
    except orjson.JSONDecodeError as e:
        raise ApiError(400, f"JSON decode error: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.")
    return body


def _text(body: dict[str, object], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{key}' must be a non-empty string.", param=key)
    return value


def lora_routes(engine: str, adapters: Adapters, load_s: float = 0.0) -> dict[tuple[str, str], Route]:
    """The engine's load and unload routes (none for an engine without an adapter API)."""
    lora = ENGINES[engine].lora
    if lora is None:
        return {}

    async def load(req: Request, resp: Responder) -> None:
        body = _body(req)
        if load_s:
            await asyncio.sleep(load_s)
        adapters.load(_text(body, "lora_name"), _text(body, "lora_path"))
        resp.send(200, orjson.dumps({"success": True, "message": f"Success: LoRA adapter '{body['lora_name']}' "
                                                                   "added successfully."}))

    async def unload(req: Request, resp: Responder) -> None:
        adapters.unload(_text(_body(req), "lora_name"))
        resp.send(200, orjson.dumps({"success": True}))

    return {("POST", lora.load_path): load, ("POST", lora.unload_path): unload}
