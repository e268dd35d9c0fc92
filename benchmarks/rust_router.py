"""The Rust `vllm-router` (PyPI `vllm-router`) as a yardstick for benchmarks/overhead.py.

It routes to the same simulated engines by model: started with ``--enable-igw``
(multi-model mode) and no worker, then each engine is registered with
``POST /workers {"url": ..., "model_id": MODEL}``, so a request naming MODEL
goes to that engine, as with our router. Its policy is ``round_robin`` (its
default, ``cache_aware``, keeps a prefix tree per model: more work per request
than our single-replica choice, so round_robin is the stricter yardstick);
retries, circuit breaker, health checks and its Prometheus exporter stay at
their defaults (on). It runs as ``python -m vllm_router.launch_router``: one
process (the Rust server runs on tokio threads inside it, so /proc/<pid>/stat
holds all of its CPU).
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import sys
from typing import Optional

import aiohttp


class Unavailable(RuntimeError):
    """The Rust router cannot be installed, started or given its engines."""


def version() -> Optional[str]:
    """Installed version of the `vllm-router` wheel, or None when it is not importable."""
    if importlib.util.find_spec("vllm_router") is None:
        return None
    try:
        return importlib.metadata.version("vllm-router")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def argv(port: int, prometheus_port: int) -> list[str]:
    return [sys.executable, "-m", "vllm_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--enable-igw", "--policy", "round_robin", "--prometheus-host", "127.0.0.1",
            "--prometheus-port", str(prometheus_port), "--log-level", "info"]


async def register(session: aiohttp.ClientSession, url: str, engines: dict[str, str], timeout: float = 60.0) -> None:
    """Add each engine (model -> base URL) as a worker for its model, then check /v1/models lists them all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    for model, engine in engines.items():
        while True:
            try:
                async with session.post(f"{url}/workers", json={"url": engine, "model_id": model}) as r:
                    body = await r.text()
                    if r.status < 300:
                        break
                    error = f"HTTP {r.status}: {body[:300]}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                error = repr(e)
            if loop.time() > deadline:
                raise Unavailable(f"could not register {engine} for model {model!r} with the Rust router: {error}")
            await asyncio.sleep(0.2)
    while True:
        with_models: set[str] = set()
        try:
            async with session.get(f"{url}/v1/models") as r:
                if r.status == 200:
                    body = await r.json(content_type=None)
                    # {"models": [...]} in IGW mode; OpenAI's {"data": [{"id": ...}]} otherwise.
                    with_models = set(body.get("models") or [m.get("id") for m in body.get("data", [])])
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            pass
        if set(engines) <= with_models:
            return
        if loop.time() > deadline:
            raise Unavailable(f"the Rust router lists models {sorted(with_models)}, not {sorted(engines)}")
        await asyncio.sleep(0.2)
