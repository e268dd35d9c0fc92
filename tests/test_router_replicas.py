"""Replicas: balancing, failover, ejection, health thresholds, concurrency limits."""
from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

import openai
import orjson
import pytest
from helpers import free_port, metric_value, wait_for
from router_support import Engine, Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_router_proxy import assert_error, client, post


def test_least_outstanding_balances_replicas(stack: Stack) -> None:
    a, b = stack.engine(interval=0.3), stack.engine(interval=0.3)
    r = stack.router([instance("m", a.port, name="a"), instance("m", b.port, name="b")])
    body = orjson.dumps({"model": "m", "prompt": "x"})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [f.result()[0] for f in [pool.submit(post, r.url + "/v1/completions", body) for _ in range(8)]]
    assert statuses == [200] * 8
    assert len(a.bodies) == len(b.bodies) == 4


def test_failover_when_a_replica_refuses_connections(stack: Stack) -> None:
    live = stack.engine()
    dead_port = free_port()  # nothing listens here
    r = stack.router([instance("m", dead_port, name="dead"), instance("m", live.port, name="live")], eject_seconds=30)
    c = client(r.url)
    for _ in range(4):
        assert c.completions.create(model="m", prompt="x").choices[0].text == "hello world"
    assert len(live.bodies) == 4
    dead = r.app.state.table.get("m").replicas[0]
    assert dead.ejected_until > time.monotonic() + 20  # ejected after its first refusal
    metrics = r.app.state.metrics.render().decode()
    assert 'router_upstream_errors_total{kind="connect",model="m"} 1.0' in metrics


def test_all_replicas_refusing_is_502_then_503_while_ejected(stack: Stack) -> None:
    r = stack.router([instance("m", free_port(), name="a"), instance("m", free_port(), name="b")], eject_seconds=30)
    status, _, data = post(r.url + "/v1/completions", b'{"model": "m"}')
    assert_error(status, data, 502, "Could not connect")
    status, headers, data = post(r.url + "/v1/completions", b'{"model": "m"}')
    assert_error(status, data, 503)
    assert 25 <= int(headers["retry-after"]) <= 30


def test_unhealthy_backends_get_503_at_once_and_recover(stack: Stack) -> None:
    e = stack.engine(health=500)
    r = stack.router([instance("m", e.port)], health_check_interval_seconds=0.05, unhealthy_threshold=2,
                     healthy_threshold=3)
    backend = r.app.state.table.get("m").replicas[0]
    wait_for(lambda: backend.health == "unhealthy")
    assert e.health_probes >= 2
    start = time.monotonic()
    status, headers, data = post(r.url + "/v1/chat/completions", b'{"model": "m", "messages": []}')
    assert_error(status, data, 503, "No healthy engine")
    assert time.monotonic() - start < 0.5 and int(headers["retry-after"]) >= 1
    assert e.bodies == []  # probes never send generations either
    e.health_status = 200
    seen = e.health_probes
    wait_for(lambda: backend.health == "healthy")
    assert e.health_probes - seen >= 3
    assert post(r.url + "/v1/completions", b'{"model": "m"}')[0] == 200


def test_max_concurrency_queue_then_429(stack: Stack) -> None:
    e = stack.engine(interval=0.5)
    r = stack.router([instance("m", e.port, max_concurrency=1, max_queue=1)], queue_timeout_seconds=5)
    body = orjson.dumps({"model": "m", "prompt": "x"})
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        first = pool.submit(post, r.url + "/v1/completions", body)
        wait_for(lambda: len(e.bodies) == 1)
        queued = pool.submit(post, r.url + "/v1/completions", body)
        wait_for(lambda: admitted(r.url, "m") == 2, what="the second request to be queued")
        status, headers, data = post(r.url + "/v1/completions", body)
        assert_error(status, data, 429, "concurrency limit")
        assert headers["retry-after"] == "1"
        assert first.result()[0] == 200 and queued.result()[0] == 200
    assert r.app.state.table.get("m").replicas[0].outstanding == 0


def test_queue_timeout_is_429(stack: Stack) -> None:
    e = stack.engine(interval=1.0)
    r = stack.router([instance("m", e.port, max_concurrency=1)], queue_timeout_seconds=0.2)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, r.url + "/v1/completions", b'{"model": "m"}')
        wait_for(lambda: len(e.bodies) == 1)
        with_sdk = client(r.url)
        try:
            with_sdk.completions.create(model="m", prompt="x")
            raise AssertionError("expected 429")
        except openai.RateLimitError as err:
            assert err.status_code == 429
        assert first.result()[0] == 200
    assert len(e.bodies) == 1
    status, _, data = post(r.url + "/metrics", None, method="GET")  # type: ignore[arg-type]
    assert 'router_requests_total{key="anonymous",model="m",status="429"} 1.0' in data.decode()
    assert json.loads(post(r.url + "/v1/completions", b'{"model": "m"}')[2])["choices"]


def test_queued_request_takes_a_replica_back_from_ejection(stack: Stack) -> None:
    busy, back = stack.engine(interval=4.0), stack.engine()
    stack.loop.run(back.stop())  # refuses connections until started again
    r = stack.router([instance("m", back.port, name="back", max_concurrency=1),
                      instance("m", busy.port, name="busy", max_concurrency=1)],
                     eject_seconds=0.5, queue_timeout_seconds=2.5)
    body = orjson.dumps({"model": "m", "prompt": "x"})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, r.url + "/v1/completions", body)  # refused by "back", then held by "busy"
        wait_for(lambda: len(busy.bodies) == 1)
        stack.loop.run(back.start())
        start = time.monotonic()
        status, _, _ = post(r.url + "/v1/completions", body)  # both unavailable: waits in the queue
        # Served by "back" once its ejection ends, not timed out (429) while "busy" is held.
        assert status == 200 and len(back.bodies) == 1
        assert time.monotonic() - start < 2.0
        assert first.result()[0] == 200
    assert [b.outstanding for b in r.app.state.table.get("m").replicas] == [0, 0]


def hold_one_queue_one(pool: concurrent.futures.Executor, url: str, engine: Engine,
                       body: bytes) -> tuple[concurrent.futures.Future, concurrent.futures.Future]:
    """Send a request that `engine` holds, then one that must wait in the router's queue."""
    first = pool.submit(post, url + "/v1/completions", body)
    wait_for(lambda: len(engine.bodies) == 1)
    queued = pool.submit(post, url + "/v1/completions", body)
    wait_for(lambda: admitted(url, "m") == 2, what="the second request to be queued")
    return first, queued


def admitted(url: str, model: str) -> float:
    """Requests the router admitted for `model` and has not finished, queued ones included."""
    return metric_value(post(url + "/metrics", None, method="GET")[2].decode(),  # type: ignore[arg-type]
                        "router_in_flight_requests", model=model)


def test_queued_request_takes_a_replica_that_turned_healthy(stack: Stack) -> None:
    busy, sick = stack.engine(interval=4.0), stack.engine(health=500)
    r = stack.router([instance("m", sick.port, name="sick", max_concurrency=1),
                      instance("m", busy.port, name="busy", max_concurrency=1)],
                     health_check_interval_seconds=0.05, unhealthy_threshold=1, healthy_threshold=2,
                     queue_timeout_seconds=2.5)
    backend = r.app.state.table.get("m").replicas[0]
    wait_for(lambda: backend.health == "unhealthy")
    body = orjson.dumps({"model": "m", "prompt": "x"})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, queued = hold_one_queue_one(pool, r.url, busy, body)
        sick.health_status = 200
        start = time.monotonic()
        assert queued.result()[0] == 200 and len(sick.bodies) == 1
        assert time.monotonic() - start < 1.5
        assert first.result()[0] == 200


def test_queued_requests_get_503_at_once_when_no_replica_is_left(stack: Stack) -> None:
    e = stack.engine(interval=4.0)
    r = stack.router([instance("m", e.port, max_concurrency=1)], health_check_interval_seconds=0.05,
                     unhealthy_threshold=1, queue_timeout_seconds=3)
    body = orjson.dumps({"model": "m", "prompt": "x"})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first, queued = hold_one_queue_one(pool, r.url, e, body)
        e.health_status = 500
        start = time.monotonic()
        status, headers, data = queued.result()
        # As a new request would: 503 with Retry-After, not 429 after the queue timeout.
        assert_error(status, data, 503, "No healthy engine")
        assert int(headers["retry-after"]) >= 1 and time.monotonic() - start < 1.0
        assert first.result()[0] == 200  # the request already on the engine is not cut short
    assert len(e.bodies) == 1


def test_health_checks_go_on_after_an_unexpected_probe_error(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    from router.server.fleet.control import EngineControl
    real_probe = EngineControl.probe
    calls = []

    async def probe_failing_once(*args: Any) -> tuple[bool, str]:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("unexpected")
        return await real_probe(*args)

    monkeypatch.setattr(EngineControl, "probe", probe_failing_once)
    e = stack.engine()
    r = stack.router([instance("m", e.port)], health_check_interval_seconds=0.05)
    backend = r.app.state.table.get("m").replicas[0]
    wait_for(lambda: backend.health == "healthy")  # the checker did not die with the first round
