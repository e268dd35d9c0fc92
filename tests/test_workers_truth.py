"""One truth across proxy workers (``router.workers: 2``, the real ``python -m router.serve``).

An instance's max_concurrency and max_queue hold for the instance, not per
worker; a breaker one worker opens is open in all of them and shows in
/health/all and the metrics; a reload is acknowledged by every worker with the
table generation it serves.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import urllib.request
from typing import Any

import aiohttp
import psutil
import pytest
from helpers import Streamed, get_json, metric_value, post_json, stream_request, wait_for
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_reload import rewrite

from router.sim import SimEngine, SimOptions

pytestmark = pytest.mark.timeout(120)


class CountingSim(SimEngine):
    """The simulated engine, keeping the most generations it ever ran at once (its own counter, read
    as it rises)."""

    def __init__(self, options: SimOptions):
        super().__init__(options)
        self.peak = 0
        enter = self.core._enter

        def counted() -> None:  # the core's own count, read the moment a generation starts
            enter()
            self.peak = max(self.peak, self.counters.running)
        self.core._enter = counted  # type: ignore[method-assign]


def health_all(url: str) -> dict[str, Any]:
    status, body = get_json(f"{url}/health/all")
    assert status in (200, 503), body
    return body


def breaker_event(url: str, instance: str) -> str:
    """The state of the first breaker event of `instance` in GET /events (its history comes first)."""
    conn = http.client.HTTPConnection(url.split("//")[1], timeout=5)
    try:
        conn.request("GET", "/events")
        for raw in iter(conn.getresponse().readline, b""):
            if raw.startswith(b"data: "):
                event = json.loads(raw[6:])
                if event["kind"] == "breaker" and event["instance"] == instance:
                    return str(event["state"])
        return ""
    finally:
        conn.close()


def test_max_concurrency_holds_for_the_instance_across_workers(stack: Stack) -> None:
    sim = CountingSim(SimOptions(engine="vllm", model="m", itl_ms=30))
    stack.loop.run(sim.start())
    try:
        router = stack.router([instance("m", sim.port, max_concurrency=2, max_queue=20)], workers=2)
        wait_for(lambda: len(health_all(router.url).get("workers", [])) == 2, 20, "both workers to connect")
        body = {"model": "m", "prompt": "x", "max_tokens": 10, "stream": True}

        async def streams() -> list[Streamed]:
            # A connection each: the kernel spreads them over both workers.
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                             timeout=aiohttp.ClientTimeout(total=60)) as http:
                return await asyncio.gather(*(stream_request(http, f"{router.url}/v1/completions", body)
                                              for _ in range(12)))

        results = asyncio.run(streams())
        assert [r.status for r in results] == [200] * 12
        assert all(r.done and len(r.chunks()) == 10 for r in results), [r.failure or r.body for r in results]
        assert sim.counters.requests == 12
        assert sim.peak == 2, f"the engine ran {sim.peak} generations at once"
        # Both workers took streams (each keeps its connections to the engine open).
        assert router.process is not None
        workers = psutil.Process(router.process.pid).children(recursive=True)
        assert sum(any(c.raddr and c.raddr.port == sim.port for c in w.net_connections("tcp"))
                   for w in workers) == 2
        # Every slot came back: the controller's count of the instance is 0 again.
        text = urllib.request.urlopen(f"{router.url}/metrics", timeout=10).read().decode()
        assert metric_value(text, "router_backend_outstanding_requests", instance="m") == 0
    finally:
        stack.loop.run(sim.stop())


def test_a_breaker_one_worker_opens_is_open_in_all(stack: Stack) -> None:
    bad, good = stack.engine(behaviour="error503"), stack.engine()
    router = stack.router([instance("m", bad.port, name="bad"), instance("m", good.port, name="good")],
                          workers=2, eject_seconds=60, health_check_interval_seconds=0.2)
    # Both probed healthy first (a probe that finds a replica healthy again closes its breaker).
    wait_for(lambda: all(e["routing_state"] == "healthy"
                             for e in health_all(router.url)["models"]["m"]["endpoints"]), 20, "both replicas healthy")
    request = {"model": "m", "prompt": "x", "max_tokens": 2}
    # The bad replica comes first in the pick at equal load: the first request meets it, and is
    # retried on the good one.
    while not bad.bodies:
        assert post_json(f"{router.url}/v1/completions", request)[0] == 200
    failed = len(bad.bodies)
    for _ in range(20):  # urllib opens a connection each time: both workers take some
        assert post_json(f"{router.url}/v1/completions", request)[0] == 200
    assert len(bad.bodies) - failed <= 2, f"the failed replica got {len(bad.bodies) - failed} of the next 20"
    endpoints = {e["instance"]: e for e in health_all(router.url)["models"]["m"]["endpoints"]}
    assert endpoints["bad"]["breaker"] == "open" and endpoints["bad"]["ejected"] is True
    assert endpoints["good"]["breaker"] == "closed"
    text = urllib.request.urlopen(f"{router.url}/metrics", timeout=10).read().decode()
    assert metric_value(text, "router_backend_ejected", instance="bad") == 1
    assert metric_value(text, "router_backend_ejected", instance="good") == 0
    assert breaker_event(router.url, "bad") == "open"


def test_every_worker_acknowledges_the_generation_it_serves(stack: Stack) -> None:
    a, b = stack.engine(), stack.engine()
    router = stack.router([instance("a", a.port)], workers=2)
    wait_for(lambda: len(health_all(router.url).get("workers", [])) == 2, 20, "both workers to connect")
    before = health_all(router.url)
    assert {w["generation"] for w in before["workers"]} == {before["generation"]}
    rewrite(stack.tmp / "config.yaml", [instance("a", a.port), instance("b", b.port)], workers=2)
    status, change = post_json(f"{router.url}/action/reload", {})
    assert status == 200 and change["models"]["added"] == ["b"], change
    generation = before["generation"] + 1

    def acknowledged() -> bool:
        report = health_all(router.url)
        return report["generation"] == generation and all(w["generation"] == generation for w in report["workers"])
    wait_for(acknowledged, 10, "every worker to acknowledge the new generation")
    # Acknowledged: every worker serves the new model, whichever takes the request.
    for _ in range(10):
        assert post_json(f"{router.url}/v1/completions", {"model": "b", "prompt": "x", "max_tokens": 2})[0] == 200
    assert all(w["pid"] > 0 for w in health_all(router.url)["workers"])
