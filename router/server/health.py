"""Background health probes of every backend, and on-demand probe reports.

Probes hit each engine's health path (from the engine table), never a
generation, so they cost the engine nothing. A model whose engines are asleep
is not probed: asleep is not unhealthy, and some engines hold requests while
asleep.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Optional

import aiohttp

from router.server.replicas import Backend, Model, ModelTable
from router.config import RouterSettings
from router.server.lifecycle import AWAKE

log = logging.getLogger("router.health")


def is_awake(model: Model) -> bool:
    return model.lifecycle.state == AWAKE


async def probe(session: aiohttp.ClientSession, backend: Backend, timeout: float) -> tuple[bool, str]:
    """One GET of the backend's health path: (ok, what happened)."""
    url = backend.url + backend.instance.spec.health_path
    try:
        async with session.get(url, headers=backend.instance.auth_headers,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            await resp.read()
            return resp.status == 200, f"HTTP {resp.status}"
    except asyncio.TimeoutError:
        return False, f"no answer within {timeout:g}s"
    except aiohttp.ClientError as e:
        return False, f"{type(e).__name__}: {e}"


async def probe_and_record(session: aiohttp.ClientSession, model: Model, backend: Backend,
                           settings: RouterSettings) -> tuple[bool, str]:
    """Probe one replica now and record the result; a replica that turned
    routable goes at once to requests queued for a slot (`Model.dispatch`)."""
    ok, detail = await probe(session, backend, settings.health_check_timeout_seconds)
    backend.record_probe(ok, settings)
    model.dispatch()
    return ok, detail


class HealthChecker:
    """Probes every backend each `health_check_interval_seconds`, in one task."""

    def __init__(self, table: ModelTable, settings: RouterSettings):
        self.table = table
        self.settings = settings
        self._task: Optional[asyncio.Task[None]] = None

    def start(self, session: aiohttp.ClientSession) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(session), name="router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self, session: aiohttp.ClientSession) -> None:
        while True:
            try:
                await self.check_all(session)
            except Exception:
                # One bad round must not end health checking for the router's lifetime.
                log.exception("health check round failed")
            await asyncio.sleep(self.settings.health_check_interval_seconds)

    async def check_all(self, session: aiohttp.ClientSession) -> None:
        probes = [probe_and_record(session, m, b, self.settings)
                  for m in self.table if is_awake(m) for b in m.backends]
        if probes:
            await asyncio.gather(*probes)


async def model_report(session: aiohttp.ClientSession, model: Model, settings: RouterSettings) -> dict[str, Any]:
    """Probe a model's backends now and describe them, for /health/{model} and /health/all."""
    if not is_awake(model):
        state = model.lifecycle.state
        return {"model": model.name, "status": state,
                "endpoints": [_endpoint(b, state) for b in model.backends], "sleep": model.lifecycle.status()}
    results = await asyncio.gather(*(probe_and_record(session, model, b, settings) for b in model.backends))
    endpoints = [_endpoint(b, "healthy" if ok else "unhealthy", detail) for b, (ok, detail) in zip(model.backends, results)]
    n_ok = sum(ok for ok, _ in results)
    status = "healthy" if n_ok == len(results) else "degraded" if n_ok else "unhealthy"
    return {"model": model.name, "status": status, "endpoints": endpoints, "sleep": model.lifecycle.status()}


def _endpoint(b: Backend, status: str, detail: Optional[str] = None) -> dict[str, Any]:
    out: dict[str, Any] = {"instance": b.name, "endpoint": b.url, "status": status,
                           "routing_state": b.health, "outstanding": b.outstanding,
                           "ejected": b.ejected_until > time.monotonic()}
    if detail is not None:
        out["detail"] = detail
    return out
