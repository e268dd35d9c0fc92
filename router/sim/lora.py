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
  not read), else 404 in vLLM's words ("No adapter found for <path>");
- a name already loaded is refused (400) in vLLM's words ("has already been loaded");
- SGLang refuses a load beyond its ``--max-loaded-loras``; vLLM 0.32 does not refuse one
  beyond ``--max-loras`` (measured against the real CPU build), so neither does its
  simulator: keeping within the bound is the router's work;
- vLLM answers a load or unload with plain text, SGLang with JSON;
- a generation for a loaded adapter starts its text with ``[<adapter>]``; one for
  a name that is neither the model nor a loaded adapter gets the engine's 404;
  ``/v1/models`` lists the loaded adapters with ``parent`` and ``root``, as vLLM does.
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
        self.bound_enforced = lora is not None and lora.bound_enforced
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
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                                "in place, set 'load_inplace' to True.", "InvalidUserInput")
        if self.bound_enforced and self.bound is not None and len(self.loaded) >= self.bound:
            raise ApiError(400, f"Failed to load LoRA adapter {name}: the maximum number of loaded LoRA adapters "
                                f"({self.bound}) is reached; unload one first.")
        if not os.path.isdir(path):
            raise ApiError(404, f"Loading lora {name} failed: No adapter found for {path}", "NotFoundError")
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


def lora_routes(engine: str, adapters: Adapters, text: bool, load_s: float = 0.0) -> dict[tuple[str, str], Route]:
    """The engine's load and unload routes (none for an engine without an adapter API); `text`: they
    answer plain text (vLLM), else JSON."""
    lora = ENGINES[engine].lora
    if lora is None:
        return {}

    def done(resp: Responder, name: str, what: str) -> None:
        message = f"Success: LoRA adapter '{name}' {what} successfully."
        if text:
            resp.send(200, message.encode(), None)
        else:
            resp.send(200, orjson.dumps({"success": True, "message": message, "loaded_adapters": adapters.loaded}))

    async def load(req: Request, resp: Responder) -> None:
        body = _body(req)
        if load_s:
            await asyncio.sleep(load_s)
        name = _text(body, "lora_name")
        adapters.load(name, _text(body, "lora_path"))
        done(resp, name, "added")

    async def unload(req: Request, resp: Responder) -> None:
        name = _text(_body(req), "lora_name")
        adapters.unload(name)
        done(resp, name, "removed")

    return {("POST", lora.load_path): load, ("POST", lora.unload_path): unload}
