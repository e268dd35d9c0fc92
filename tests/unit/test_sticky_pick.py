"""A model's keyed pick (router/server/fleet/sticky.py in Model.pick/acquire) and the request keys
(router/server/proxy/keys.py), on in-memory replicas: no engine, no socket."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, Optional

import pytest
from fakes import instance

from router.config import SleepSettings
from router.observe.events import Events
from router.observe.metrics import ModelMetrics
from router.server.fleet.models import Model, Overloaded, _reuse
from router.server.fleet.replica import Replica
from router.server.fleet.ring import FLOOR, key_hash
from router.server.fleet.sticky import Sticky
from router.server.proxy.keys import prefix_key, request_key, session_key

NOW = 1000.0


def model(routing: str = "session", n: int = 2, **extra: Any) -> Model:
    events = Events()
    replicas = tuple(Replica(instance(f"m-{i}", routing=routing, **extra), events) for i in range(n))
    # The lifecycle is not under test: a record of what a reload sets on it.
    lifecycle = SimpleNamespace(settings=None, start_timeout=0.0)
    return Model("m", replicas, lambda name, members: lifecycle, ModelMetrics("m"), 1)  # type: ignore[arg-type,return-value]


def keys(n: int) -> list[int]:
    return [key_hash(f"s{i}".encode()) for i in range(n)]


def test_a_least_outstanding_model_has_no_ring_and_ignores_keys() -> None:
    m = model("least_outstanding")
    assert m.sticky is None
    m.replicas[0].outstanding = 3
    assert m.pick(NOW, (), key_hash(b"x")) is m.replicas[1]
    assert (m.metrics.hits, m.metrics.moved) == (0, 0)


def test_one_key_stays_on_one_replica_and_keys_use_both() -> None:
    m = model()
    seen: dict[int, set[str]] = {}
    for _ in range(5):
        for k in keys(16):
            r = m.pick(NOW, (), k)
            seen.setdefault(k, set()).add(r.name)
            m.release(r)
    assert all(len(names) == 1 for names in seen.values())
    assert {n for names in seen.values() for n in names} == {"m-0", "m-1"}
    assert (m.metrics.hits, m.metrics.moved) == (80, 0)


def owned_by(m: Model, index: int) -> int:
    sticky = m.sticky
    assert sticky is not None
    return next(k for k in keys(100) if sticky.owns(m.replicas, k, m.replicas[index]))


def test_an_unroutable_owner_moves_its_key_along_the_ring_and_back() -> None:
    m = model()
    k = owned_by(m, 0)
    m.replicas[0].breaker.opened_for = m.replicas[0].breaker.open_until = NOW + 30  # breaker open
    assert m.pick(NOW, (), k) is m.replicas[1]
    m.replicas[0].breaker.opened_for = m.replicas[0].breaker.open_until = 0.0
    assert m.pick(NOW, (), k) is m.replicas[0]
    # a retry excludes the replica it tried
    assert m.pick(NOW, (m.replicas[0],), k) is m.replicas[1]
    assert (m.metrics.hits, m.metrics.moved) == (1, 2)


def test_bounded_load_moves_a_key_off_a_replica_far_above_the_average() -> None:
    m = model()
    k = owned_by(m, 0)
    m.replicas[0].outstanding = FLOOR
    assert m.pick(NOW, (), k) is m.replicas[0]  # 8 is not more than 8: stays (now 9 there)
    assert m.pick(NOW, (), k) is m.replicas[1]  # 9 against 0: moved
    assert (m.metrics.hits, m.metrics.moved) == (1, 1)


def test_a_full_owner_passes_the_key_on_and_all_full_waits_for_any_slot() -> None:
    async def scenario() -> None:
        m = model(max_concurrency=1, max_queue=4)
        k = owned_by(m, 0)
        first = m.pick(NOW, (), k)
        assert first is m.replicas[0]
        second = m.pick(NOW, (), k)  # its owner is full: the other replica
        assert second is m.replicas[1]
        with pytest.raises(Overloaded):
            m.pick(NOW, (), k)
        waiting = asyncio.ensure_future(m.acquire(NOW, (), 5.0, k))
        await asyncio.sleep(0)
        m.release(second)  # the first free slot is not the key's own: moved
        assert await waiting is m.replicas[1]
        assert (m.metrics.hits, m.metrics.moved) == (1, 2)
    asyncio.run(scenario())


def test_a_reload_that_changes_routing_keeps_the_replicas_and_rebuilds_the_ring() -> None:
    m = model("least_outstanding")
    events = Events()
    old = m.replicas[0]
    old.outstanding = 2
    kept = _reuse(old, instance("m-0", routing="prefix", routing_prefix_chars=64), events)
    assert kept is old and kept.outstanding == 2
    m.reconfigure((kept, _reuse(m.replicas[1], instance("m-1", routing="prefix", routing_prefix_chars=64), events)),
                  SleepSettings(), 1, 60.0)
    assert m.sticky is not None and (m.sticky.routing, m.sticky.prefix_chars) == ("prefix", 64)


def scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"headers": list(headers)}


def test_the_session_key_is_the_header_else_the_user() -> None:
    body = {"user": "alice", "metadata": {"user_id": "bob"}}
    assert session_key(scope((b"x-session-id", b"s1")), body) == key_hash(b"s1")
    assert session_key(scope(), body) == key_hash(b"alice")
    assert session_key(scope(), {"metadata": {"user_id": "bob"}}) == key_hash(b"bob")
    assert session_key(scope(), {"user": ""}) is None
    assert session_key(scope(), None) is None
    assert session_key(scope((b"x-session-id", b"s1")), None) == key_hash(b"s1")  # a form upload


SYSTEM = "You are a careful assistant. " * 40  # 1,160 characters


def chat(*turns: str, system: str = SYSTEM) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "system", "content": system},
                                       *({"role": "user", "content": t} for t in turns)]}


def test_a_shared_long_system_prompt_makes_one_prefix_key() -> None:
    a = prefix_key(chat("what is 2+2?"), 1024)
    assert a is not None
    assert prefix_key({**chat("tell me a story", "and another"), "max_tokens": 9, "user": "x"}, 1024) == a
    assert prefix_key(chat("what is 2+2?", system="Another prompt. " * 80), 1024) != a
    # a prefix longer than the system prompt takes in the turns
    assert prefix_key(chat("what is 2+2?"), 4096) != prefix_key(chat("tell me a story"), 4096)


def test_prefix_keys_of_prompts_and_inputs() -> None:
    long = "x" * 10_000
    assert prefix_key({"prompt": long}, 100) == prefix_key({"prompt": "x" * 100 + "y"}, 100)
    assert prefix_key({"prompt": [long]}, 100) == prefix_key({"prompt": long}, 100)
    assert prefix_key({"input": "hello"}, 100) != prefix_key({"input": "hellO"}, 100)
    assert prefix_key({"prompt": [1, 2, 3]}, 100) == prefix_key({"prompt": [1, 2, 3]}, 100)
    # Anthropic's system comes first; the boundary between fields counts
    assert prefix_key({"system": "ab", "messages": ["c"]}, 100) != prefix_key({"system": "a", "messages": ["bc"]}, 100)
    assert prefix_key({"model": "m"}, 100) is None
    # characters, not bytes: a prompt of wide characters is cut at the same place
    assert prefix_key({"prompt": "é" * 100 + "a"}, 100) == prefix_key({"prompt": "é" * 100 + "b"}, 100)


def test_request_key_follows_the_model_routing() -> None:
    replicas: tuple[Replica, ...] = ()
    body = {"user": "alice", "prompt": "p" * 50}
    session: Optional[int] = request_key(Sticky("session", 10, replicas), scope(), body)
    prefix = request_key(Sticky("prefix", 10, replicas), scope(), body)
    assert session == key_hash(b"alice") and prefix == prefix_key(body, 10) and session != prefix
    assert request_key(Sticky("prefix", 10, replicas), scope(), None) is None
