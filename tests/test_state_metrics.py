"""The state gauges the alert rules read, on the real app: the wait queue against max_queue, and
the circuit breaker (tests/test_prometheus.py sees supervisord's process states on a stack)."""
from __future__ import annotations

import asyncio
import urllib.request

import aiohttp
from helpers import metric_value, post_json, wait_for
from router_support import Stack, instance, loop, stack  # noqa: F401


def metrics(url: str) -> str:
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        return r.read().decode()


def test_queued_requests_and_the_queue_capacity(stack: Stack) -> None:
    e = stack.engine(interval=5.0)  # each answer takes 5 s: one runs, the others wait for its slot
    r = stack.router([instance("m", e.port, max_concurrency=1, max_queue=3)])
    assert metric_value(metrics(r.url), "router_model_queue_capacity", model="m") == 3
    assert metric_value(metrics(r.url), "router_model_queued_requests", model="m") == 0

    async def three() -> None:
        async with aiohttp.ClientSession() as s:
            await asyncio.gather(*(s.post(f"{r.url}/v1/completions", json={"model": "m", "prompt": "x"})
                                   for _ in range(3)), return_exceptions=True)
    sent = asyncio.run_coroutine_threadsafe(three(), stack.loop.loop)
    try:
        wait_for(lambda: metric_value(metrics(r.url), "router_model_queued_requests", model="m") == 2, 10, "two queued requests")
        assert metric_value(metrics(r.url), "router_in_flight_requests", model="m") == 3
    finally:
        sent.cancel()


def test_the_breaker_state_follows_a_failure_and_the_ejection(stack: Stack) -> None:
    e = stack.engine(behaviour="error503")
    r = stack.router([instance("m", e.port)], eject_seconds=30, health_check_interval_seconds=60)
    labels = {"model": "m", "instance": "m", "endpoint": e.url}
    text = metrics(r.url)
    assert metric_value(text, "router_backend_breaker_state", state="closed", **labels) == 1
    assert metric_value(text, "router_backend_breaker_state", state="open", **labels) == 0
    assert post_json(f"{r.url}/v1/completions", {"model": "m", "prompt": "x"})[0] == 503
    text = metrics(r.url)
    assert metric_value(text, "router_backend_breaker_state", state="open", **labels) == 1
    assert metric_value(text, "router_backend_breaker_state", state="closed", **labels) == 0
    assert metric_value(text, "router_backend_ejected", **labels) == 1
