"""Retries before the first byte and the per-replica circuit breaker."""
from __future__ import annotations

import json

import pytest
from helpers import metric_value
from router_support import Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_router_proxy import post
from test_router_streams import sse_events

from router.server.fleet.replica import Breaker

BODY = json.dumps({"model": "m", "prompt": "x", "max_tokens": 2}).encode()


@pytest.mark.parametrize("fault", ["error503", "reset"])
def test_every_request_succeeds_via_the_healthy_replica(stack: Stack, fault: str) -> None:
    bad, good = stack.engine(behaviour=fault), stack.engine()
    r = stack.router([instance("m", bad.port, name="bad"), instance("m", good.port, name="good")])
    statuses = [post(r.url + "/v1/completions", BODY)[0] for _ in range(20)]
    assert statuses == [200] * 20
    assert len(good.bodies) == 20 and len(bad.bodies) == 1  # the breaker kept the bad one out after one failure
    metrics = r.app.state.metrics.render().decode()
    reason = "503" if fault == "error503" else "disconnect"
    assert metric_value(metrics, "router_retries_total", model="m", reason=reason) == 1
    assert r.app.state.table.get("m").replicas[0].breaker.state == "open"


def test_retries_stop_at_router_retries_and_the_engine_answer_is_relayed(stack: Stack) -> None:
    engines = [stack.engine(behaviour="error503") for _ in range(4)]
    r = stack.router([instance("m", e.port, name=f"r{i}") for i, e in enumerate(engines)], retries=2)
    status, _, data = post(r.url + "/v1/completions", BODY)
    assert status == 503 and json.loads(data)["error"]["message"] == "engine overloaded"
    assert sum(len(e.bodies) for e in engines) == 3  # the first try and two retries


def test_a_stream_that_sent_its_first_chunk_is_never_retried(stack: Stack) -> None:
    dying, good = stack.engine(behaviour="die", chunks=10), stack.engine()
    r = stack.router([instance("m", dying.port, name="dying"), instance("m", good.port, name="good")])
    status, _, events = sse_events(r.url, {"model": "m", "prompt": "x", "stream": True})
    assert status == 200 and json.loads(events[-1][1])["error"]["code"] == 502
    assert len(dying.bodies) == 1 and good.bodies == []
    # The broken stream opened the dying replica's breaker: the next request goes to the good one.
    assert r.app.state.table.get("m").replicas[0].breaker.state == "open"
    assert post(r.url + "/v1/completions", BODY)[0] == 200 and len(good.bodies) == 1


def test_a_4xx_is_relayed_at_once_and_does_not_count_against_the_replica(stack: Stack) -> None:
    refusing, good = stack.engine(behaviour="error400"), stack.engine()
    r = stack.router([instance("m", refusing.port, name="refusing"), instance("m", good.port, name="good")])
    status, _, data = post(r.url + "/v1/completions", BODY)
    assert status == 400 and "max_tokens" in json.loads(data)["error"]["message"]
    assert good.bodies == [] and r.app.state.table.get("m").replicas[0].breaker.state == "closed"


def test_one_replica_is_not_retried(stack: Stack) -> None:
    bad = stack.engine(behaviour="error503")
    r = stack.router([instance("m", bad.port)])
    assert post(r.url + "/v1/completions", BODY)[0] == 503 and len(bad.bodies) == 1


def test_per_instance_timeouts_override_the_router_s(stack: Stack) -> None:
    slow = stack.engine(interval=1.0)
    r = stack.router([instance("m", slow.port, request_timeout_seconds=0.3)], request_timeout_seconds=30)
    status, _, data = post(r.url + "/v1/completions", BODY)
    assert status == 504 and "timed out" in json.loads(data)["error"]["message"]


def test_breaker_opens_doubles_and_recovers_half_open_on_a_fake_clock() -> None:
    b = Breaker()
    assert b.admits(0) and b.state == "closed"
    assert b.failure(now=100, base=10, cap=35) == 10 and b.state == "open"
    assert not b.admits(105)
    assert b.failure(now=105, base=10, cap=35) == 5  # a second failure of a request sent before: no doubling
    assert b.admits(110)  # half-open: one trial may go
    b.taken(110)
    assert b.state == "half_open" and not b.admits(110)  # ...and only one
    assert b.failure(now=111, base=10, cap=35) == 20  # the trial failed: open twice as long
    assert not b.admits(130) and b.admits(131)
    b.taken(131)
    assert b.failure(now=131, base=10, cap=35) == 35  # doubling stops at the cap
    b.taken(166)
    b.success()  # the trial succeeded: closed, and the next failure starts from the base again
    assert b.state == "closed" and b.admits(166)
    assert b.failure(now=200, base=10, cap=35) == 10
