"""Replica routing per model (`routing: session | prefix`) through the real router over loopback:
each engine records the bodies it got, so which replica answered each request is known exactly."""
from __future__ import annotations

import concurrent.futures
import urllib.request
from typing import Any, Optional

import orjson
import pytest
from helpers import metric_value, wait_for
from router_support import Engine, Stack, instance, loop, stack  # noqa: F401  (fixtures)
from test_router_proxy import post

from router.server.fleet.ring import Ring, key_hash

pytestmark = pytest.mark.timeout(120)


def chat(url: str, body: dict[str, Any], headers: Optional[dict[str, str]] = None) -> int:
    return post(url + "/v1/chat/completions", orjson.dumps({"model": "m", **body}), headers)[0]


def where(engines: dict[str, Engine], field: str) -> dict[str, set[str]]:
    """Each value of the body's `field` (a `tag` the test sets) -> the engines that got it."""
    seen: dict[str, set[str]] = {}
    for name, e in engines.items():
        for body in e.bodies:
            seen.setdefault(orjson.loads(body)[field], set()).add(name)
    return seen


def affinity(url: str) -> tuple[float, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return (metric_value(text, "router_affinity_total", model="m", result="hit"),
            metric_value(text, "router_affinity_total", model="m", result="moved"))


def sixteen_sessions(url: str) -> None:
    """16 sessions of 5 requests each, 4 at a time: half name their session in x-session-id, half
    as the body's user."""
    def one(s: int, turn: int) -> int:
        if s % 2:
            return chat(url, {"messages": [{"role": "user", "content": f"turn {turn}"}], "tag": f"s{s}"},
                        {"x-session-id": f"session-{s}"})
        return chat(url, {"messages": [{"role": "user", "content": f"turn {turn}"}], "tag": f"s{s}",
                          "user": f"user-{s}"})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(one, s, turn) for turn in range(5) for s in range(16)]
        assert [j.result() for j in jobs] == [200] * 80


@pytest.mark.parametrize("workers, limit", [
    pytest.param(1, None, id="one-process"),
    # each worker picks on its own ring: no state shared, so with the slow tests
    pytest.param(2, None, id="workers-local-picks", marks=pytest.mark.slow),
    pytest.param(2, 50, id="workers-leased")])
def test_session_routing_keeps_every_session_on_one_replica(stack: Stack, workers: int, limit: Optional[int]) -> None:
    """With proxy workers, each process builds the same ring (a model with a max_concurrency is
    picked by the controller, on the key the lease carries)."""
    a, b = stack.engine(interval=0.02), stack.engine(interval=0.02)
    extra: dict[str, Any] = {"routing": "session"} if limit is None else {"routing": "session", "max_concurrency": limit}
    r = stack.router([instance("m", a.port, name="a", **extra), instance("m", b.port, name="b", **extra)],
                     workers=workers)
    sixteen_sessions(r.url)
    seen = where({"a": a, "b": b}, "tag")
    assert len(seen) == 16 and all(len(engines) == 1 for engines in seen.values()), seen
    assert {e for engines in seen.values() for e in engines} == {"a", "b"}
    assert len(a.bodies) + len(b.bodies) == 80
    wait_for(lambda: affinity(r.url) == (80, 0), what="80 hits counted")


def test_least_outstanding_scatters_the_same_sessions(stack: Stack) -> None:
    """Without session routing the same load spreads sessions over both replicas (so the test above
    shows the routing, not luck)."""
    a, b = stack.engine(interval=0.02), stack.engine(interval=0.02)
    r = stack.router([instance("m", a.port, name="a"), instance("m", b.port, name="b")])
    sixteen_sessions(r.url)
    assert any(len(engines) == 2 for engines in where({"a": a, "b": b}, "tag").values())
    assert affinity(r.url) == (0, 0)


def test_bounded_load_moves_keys_off_a_replica_under_skew(stack: Stack) -> None:
    """16 requests at once, every one of a session that replica `a` owns: `a` takes them until it
    carries more than 8 and 1.25x the average, then they go on to `b`; each later pick is judged
    again, so `a` ends near the bound, not with all 16."""
    a, b = stack.engine(interval=2.0), stack.engine(interval=2.0)
    r = stack.router([instance("m", a.port, name="a", routing="session"),
                      instance("m", b.port, name="b", routing="session")])
    ring = Ring(["a", "b"])
    mine = [f"hot-{i}" for i in range(200) if ring.owner(key_hash(f"hot-{i}".encode())) == 0][:16]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        jobs = [pool.submit(chat, r.url, {"messages": [], "tag": s}, {"x-session-id": s}) for s in mine]
        wait_for(lambda: len(a.bodies) + len(b.bodies) == 16, what="all 16 requests in flight")
        assert [j.result() for j in jobs] == [200] * 16
    hits, moved = len(a.bodies), len(b.bodies)
    assert 9 <= hits <= 11 and moved == 16 - hits  # arriving one by one: 10 and 6
    assert affinity(r.url) == (hits, moved)
    # once the load is gone, every one of those sessions is back on its own replica
    a.interval = b.interval = 0
    for s in mine:
        assert chat(r.url, {"messages": [], "tag": s}, {"x-session-id": s}) == 200
    assert (len(a.bodies), len(b.bodies)) == (hits + 16, moved)
    assert affinity(r.url) == (hits + 16, moved)


SYSTEM = "You are the support assistant of a large shop; follow these rules exactly. " * 40  # ~3,000 characters


def test_prefix_routing_sends_a_shared_system_prompt_to_one_replica(stack: Stack) -> None:
    a, b = stack.engine(interval=0.02), stack.engine(interval=0.02)
    r = stack.router([instance("m", a.port, name="a", routing="prefix"),
                      instance("m", b.port, name="b", routing="prefix")])

    def ask(prompt: int, question: int) -> int:
        system = f"[{prompt}] {SYSTEM}"
        return chat(r.url, {"messages": [{"role": "system", "content": system},
                                         {"role": "user", "content": f"question {question}"}], "tag": f"p{prompt}"})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(ask, p, q) for q in range(6) for p in range(8)]
        assert [j.result() for j in jobs] == [200] * 48
    seen = where({"a": a, "b": b}, "tag")
    assert len(seen) == 8 and all(len(engines) == 1 for engines in seen.values()), seen
    assert {e for engines in seen.values() for e in engines} == {"a", "b"}
    assert affinity(r.url) == (48, 0)


def test_a_replica_that_leaves_moves_only_its_sessions(stack: Stack) -> None:
    """A replica whose engine refuses connections is passed over: its sessions go on along the
    ring, and every other session stays where it was."""
    a, b, c = stack.engine(), stack.engine(), stack.engine()
    engines = {"a": a, "b": b, "c": c}
    r = stack.router([instance("m", e.port, name=n, routing="session") for n, e in engines.items()],
                     eject_seconds=60)
    for s in range(24):
        assert chat(r.url, {"messages": [], "tag": f"s{s}"}, {"x-session-id": f"s{s}"}) == 200
    before = {tag: next(iter(names)) for tag, names in where(engines, "tag").items()}
    assert set(before.values()) == {"a", "b", "c"}
    stack.loop.run(b.stop())
    for e in engines.values():
        e.bodies.clear()
    for s in range(24):
        assert chat(r.url, {"messages": [], "tag": f"s{s}"}, {"x-session-id": f"s{s}"}) == 200
    after = {tag: next(iter(names)) for tag, names in where(engines, "tag").items()}
    assert {t for t in before if before[t] != after[t]} == {t for t in before if before[t] == "b"}
