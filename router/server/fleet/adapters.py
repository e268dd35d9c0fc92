"""Loading LoRA adapters into a model's engines on demand: one load at a time per engine, one per adapter.

The first request for an adapter that no replica holds loads it into the
replica the request was given (`Model.pick` prefers replicas that hold the
adapter or are loading it, so the requests that follow join that load rather
than start another). Loads are single-flight per (replica, adapter): however
many requests wait, the engine gets one load call. Loads and unloads on one
engine run one at a time, so a bounded engine (vLLM ``--max-loras``) never
holds more than its bound: before a load that would exceed it, the least
recently used adapter with no request in flight is unloaded. A failed load is
`AdapterUnavailable` with the engine's words (the proxy answers 502).

Which adapters an engine holds is the replica's state (`Replica.loras`,
router/server/fleet/loras.py); this module only changes it through its methods.
The engines' endpoints and flags are theirs (router/engines/: `LoraApi`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Protocol

from router.engines import Call
from router.server.fleet.control import EngineCallError
from router.server.fleet.replica import Replica

log = logging.getLogger("router.adapters")

#: Longest wait for one load or unload call (an adapter is small, but is read from disk).
LOAD_TIMEOUT_SECONDS = 120.0


class AdapterUnavailable(Exception):
    """The adapter could not be made ready on the replica: `status` 502 (the engine refused or failed)
    or 503 (every adapter slot of the engine is in use; retry later)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Caller(Protocol):
    """What the loader needs of the engine control (router/server/fleet/control.py `EngineControl`)."""

    async def call(self, replica: Replica, call: Call, timeout: float) -> None: ...


class AdapterLoader:
    """A model's adapter loads and unloads (one loader per model: `Model.adapters`)."""

    def __init__(self, control: Caller, clock: Callable[[], float] = time.monotonic,
                 timeout: float = LOAD_TIMEOUT_SECONDS):
        self.control = control
        self.clock = clock
        self.timeout = timeout
        self._loads: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, replica: Replica, name: str) -> None:
        """Return once `replica`'s engine holds adapter `name`, loading it if need be (joining a load
        under way); raise AdapterUnavailable when it cannot."""
        if name in replica.loras.loaded:
            return
        key = (replica.name, name)
        load = self._loads.get(key)
        if load is None:
            replica.loras.load_started(name)
            _changed(replica, "loading", name)
            load = self._loads[key] = asyncio.ensure_future(self._load(replica, name))
            load.add_done_callback(lambda done: self._finished(key, done))
        await asyncio.shield(load)  # a request that leaves does not cancel the others' load

    def _finished(self, key: tuple[str, str], done: asyncio.Future[None]) -> None:
        if self._loads.get(key) is done:
            del self._loads[key]
        if not done.cancelled():
            done.exception()  # retrieved: its waiters, if any are left, raise it

    async def _load(self, replica: Replica, name: str) -> None:
        ok = False
        try:
            async with self._locks.setdefault(replica.name, asyncio.Lock()):
                if name not in replica.loras.loaded:
                    await self._make_room(replica, name)
                    await self._call_load(replica, name)
            ok = True
        finally:
            replica.loras.load_ended(name, ok, self.clock())
            _changed(replica, "loaded" if ok else "failed", name)

    async def _make_room(self, replica: Replica, name: str) -> None:
        """Unload least recently used idle adapters until one more fits the engine's bound."""
        inst = replica.instance
        lora = inst.spec.lora
        assert lora is not None
        bound = lora.capacity(inst.engine_args)
        while bound is not None and len(replica.loras.loaded) >= bound:
            victim = replica.loras.victim()
            if victim is None:
                raise AdapterUnavailable(503, f"Instance {replica.name} holds {bound} LoRA adapters ({lora.max_flag} "
                                              f"{bound}), all serving requests; adapter '{name}' can be loaded when one "
                                              "is idle, retry later.")
            try:
                await self.control.call(replica, lora.unload(victim), self.timeout)
            except EngineCallError as e:
                # Gone already (or the engine is down, and the load below says so): either way not held.
                log.warning("unloading LoRA adapter %s from %s failed: %s", victim, replica.name, e)
            replica.loras.unloaded(victim)
            _changed(replica, "unloaded", victim)
            log.info("unloaded LoRA adapter %s from %s to make room for %s", victim, replica.name, name)

    async def _call_load(self, replica: Replica, name: str) -> None:
        inst = replica.instance
        lora = inst.spec.lora
        adapter = next((a for a in inst.lora_adapters if a.name == name), None)
        if lora is None or adapter is None:
            raise AdapterUnavailable(502, f"Instance {replica.name} does not declare LoRA adapter '{name}'.")
        started = self.clock()
        try:
            await self.control.call(replica, lora.load(name, adapter.path), self.timeout)
        except EngineCallError as e:
            if lora.already_loaded is None or lora.already_loaded not in str(e):
                raise AdapterUnavailable(502, f"Could not load LoRA adapter '{name}' ({adapter.path}): {e}") from None
        log.info("loaded LoRA adapter %s into %s in %.3fs", name, replica.name, self.clock() - started)


def _changed(replica: Replica, what: str, adapter: str) -> None:
    """Tell the replica's listeners (a controller pushes it to its proxy workers: `AdapterState`)."""
    replica.events.publish("lora", what, replica.instance.model, replica.name, adapter=adapter)
